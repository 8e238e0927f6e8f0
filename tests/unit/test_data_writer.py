import hashlib
import io
import json
import subprocess
import sys
import tarfile

import PIL.Image
import pytest

from clipkit.data.digits import DIGIT_CLASSNAMES, DIGIT_TEMPLATES, write_digits_shards
from clipkit.data.writer import samples_from_csv, samples_from_folder, write_shards
from clipkit.errors import ClipkitConfigError


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}


def _members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    return out, write_digits_shards(out)


def test_digits_counts_layout_and_labels(digits_dir):
    out, stats = digits_dir
    assert stats["count"] == stats["train"]["count"] + stats["test"]["count"] == 1797
    assert len(stats["train"]["shards"]) == 8 and len(stats["test"]["shards"]) >= 2
    assert stats["train"]["failures"] == stats["test"]["failures"] == 0
    assert (out / "train" / "nshards.txt").read_text().strip() == "8"
    assert json.loads((out / "test" / "stats.json").read_text()) == stats["test"]
    assert (out / "classnames.txt").read_text().split("\n")[:10] == DIGIT_CLASSNAMES
    assert (out / "zeroshot_classification_templates.txt").read_text().splitlines() == DIGIT_TEMPLATES
    assert not list(out.rglob("*.tmp"))
    members = _members(out / "test" / "00000.tar")
    key = sorted(members)[0].split(".")[0]
    label = int(members[f"{key}.cls"])
    caption = members[f"{key}.txt"].decode()
    assert caption in {t.format(c=DIGIT_CLASSNAMES[label]) for t in DIGIT_TEMPLATES}
    assert PIL.Image.open(io.BytesIO(members[f"{key}.png"])).size == (32, 32)


def test_digits_are_deterministic_and_refuse_overwrite(digits_dir, tmp_path):
    out, _ = digits_dir
    again = tmp_path / "again"
    write_digits_shards(again)
    for split in ("train", "test"):
        assert _digests(again / split) == _digests(out / split)
    with pytest.raises(ClipkitConfigError, match="overwrite"):
        write_digits_shards(again)
    write_digits_shards(again, seed=1, overwrite=True)
    assert _digests(again / "train") != _digests(out / "train")


def _image(path, size=(40, 20), fmt="PNG"):
    PIL.Image.new("RGB", size, (200, 10, 10)).save(path, format=fmt)


def test_folder_source_with_labels_resize_and_failures(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    _image(src / "a.png")
    (src / "a.txt").write_text("a red box\n")
    (src / "a.cls").write_text("3\n")
    _image(src / "sub" / "b.jpg", fmt="JPEG")
    (src / "sub" / "b.txt").write_text("another box")
    (src / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    (src / "broken.txt").write_text("never written")
    _image(src / "nocaption.png")
    stats = write_shards(samples_from_folder(src, max_side=10), tmp_path / "out", shard_size=1)
    assert stats["count"] == 2 and stats["failures"] == 2
    assert [s["name"] for s in stats["shards"]] == ["00000.tar", "00001.tar"]
    first, second = (_members(tmp_path / "out" / name) for name in ("00000.tar", "00001.tar"))
    assert first["00000000.cls"] == b"3" and first["00000000.txt"] == b"a red box"
    assert PIL.Image.open(io.BytesIO(first["00000000.png"])).size == (10, 5)
    assert set(second) == {"00000003.jpg", "00000003.txt"}
    assert PIL.Image.open(io.BytesIO(second["00000003.jpg"])).size == (10, 5)


def test_csv_source_resolves_relative_paths(tmp_path):
    (tmp_path / "img").mkdir()
    _image(tmp_path / "img" / "x.png")
    (tmp_path / "img" / "bad.png").write_bytes(b"nope")
    csv_path = tmp_path / "list.csv"
    csv_path.write_text('path,caption,label\nimg/x.png,"a box, red",1\nimg/bad.png,broken,2\nimg/gone.png,missing,\n')
    stats = write_shards(samples_from_csv(csv_path), tmp_path / "out", shard_size=10)
    assert stats["count"] == 1 and stats["failures"] == 2
    members = _members(tmp_path / "out" / "00000.tar")
    assert members["00000000.txt"] == b"a box, red" and members["00000000.cls"] == b"1"
    (tmp_path / "nocol.csv").write_text("file,text\n")
    with pytest.raises(ClipkitConfigError, match="caption"):
        samples_from_csv(tmp_path / "nocol.csv")


def test_write_shards_refuses_existing_tars(tmp_path):
    samples = [{"__key__": f"{i}", "txt": "t", "png": b"x"} for i in range(5)]
    write_shards(samples, tmp_path, shard_size=2)
    with pytest.raises(ClipkitConfigError, match="3 .tar shards"):
        write_shards(samples, tmp_path, shard_size=2)
    stats = write_shards(samples, tmp_path, shard_size=5, overwrite=True)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["00000.tar"] and stats["count"] == 5


def test_cli_digits_and_error_exit(tmp_path):
    out = tmp_path / "d"
    cmd = [sys.executable, "-m", "clipkit.shards", "digits", str(out), "--image-size", "16", "--shard-size", "500"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "1797" in done.stdout and len(done.stdout.strip().splitlines()) == 1
    assert len(list((out / "train").glob("*.tar"))) == 3
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 1
    assert again.stderr.strip().startswith("clipkit-shards: error:") and "overwrite" in again.stderr
