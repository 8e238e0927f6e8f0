import functools
import hashlib
import http.server
import io
import json
import logging
import subprocess
import sys
import tarfile
import threading

import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from clipkit.data.digits import DIGIT_CLASSNAMES, DIGIT_TEMPLATES, write_digits_shards
from clipkit.data.writer import Row, rows_from_folder, rows_from_table, write_rows, write_shards
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
    members = _members(out / "test" / "0.tar")  # eval split: CLIP_benchmark's shard names
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
    stats = write_rows(rows_from_folder(src), tmp_path / "out", shard_size=1, max_side=10)
    assert stats["count"] == 2 and stats["rows"] == 4 and stats["failures"] == 2
    assert stats["failures_by_reason"] == {"missing caption": 1, "undecodable image": 1}
    # Rows 1 and 2 failed; the shards are numbered without gaps.
    assert stats["shards"] == [{"name": "00000.tar", "count": 1}, {"name": "00001.tar", "count": 1}]
    first, second = (_members(tmp_path / "out" / name) for name in ("00000.tar", "00001.tar"))
    assert first["000000000.cls"] == b"3" and first["000000000.txt"] == b"a red box"
    assert PIL.Image.open(io.BytesIO(first["000000000.png"])).size == (10, 5)
    assert set(second) == {"000000003.jpg", "000000003.txt", "000000003.json"}
    assert PIL.Image.open(io.BytesIO(second["000000003.jpg"])).size == (10, 5)
    meta = json.loads(second["000000003.json"])
    assert meta["path"] == "sub/b.jpg" and (meta["original_width"], meta["width"]) == (40, 10)


def test_a_failed_row_is_reported_with_its_file(tmp_path, caplog):
    src = tmp_path / "src"
    src.mkdir()
    (src / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    (src / "broken.txt").write_text("never written")
    _image(src / "nocaption.png")
    with caplog.at_level(logging.WARNING, logger="clipkit.data.writer"), pytest.raises(ClipkitConfigError):
        write_rows(rows_from_folder(src), tmp_path / "out", shard_size=1)
    warnings = [r.getMessage() for r in caplog.records]
    assert any("undecodable image: " + str(src / "broken.jpg") in w for w in warnings), warnings
    assert any("missing caption: " + str(src / "nocaption.png") in w for w in warnings), warnings


def test_csv_source_resolves_relative_paths(tmp_path):
    (tmp_path / "img").mkdir()
    _image(tmp_path / "img" / "x.png")
    (tmp_path / "img" / "bad.png").write_bytes(b"nope")
    csv_path = tmp_path / "list.csv"
    csv_path.write_text('path,caption,label\nimg/x.png,"a box, red",1\nimg/bad.png,broken,2\nimg/gone.png,missing,\n')
    stats = write_rows(rows_from_table(csv_path), tmp_path / "out", shard_size=10)
    assert stats["count"] == 1 and stats["failures_by_reason"] == {"image not found": 1, "undecodable image": 1}
    members = _members(tmp_path / "out" / "00000.tar")
    assert members["000000000.txt"] == b"a box, red" and members["000000000.cls"] == b"1"
    (tmp_path / "nocol.csv").write_text("file,text\nx.png,hello\n")
    with pytest.raises(ClipkitConfigError, match="lacks column"):
        rows_from_table(tmp_path / "nocol.csv")


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


@pytest.fixture
def http_root(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/www (no network leaves the machine)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _parquet_rows(tmp_path, http_root):
    www, base = http_root
    (tmp_path / "img").mkdir()
    _image(tmp_path / "img" / "local.png", size=(64, 48))
    _image(tmp_path / "img" / "file.jpg", size=(30, 30), fmt="JPEG")
    _image(www / "served.png", size=(20, 10))
    table = pa.table({
        "url": ["img/local.png", f"file://{tmp_path / 'img' / 'file.jpg'}", f"{base}/served.png",
                f"{base}/missing.png", "img/local.png", "img/local.png"],
        "caption": ["a local box", "a file url box", "a served box", "404", "   ", "again"],
        "label": [0, 1, 2, 3, 4, None],
        "license": ["cc-by", "cc0", "cc-by", "cc0", "cc0", "cc-by"],
        "score": [0.5, 0.25, 1.0, 0.0, 0.0, 0.75],
    })
    pq.write_table(table, tmp_path / "pairs.parquet")
    return tmp_path / "pairs.parquet"


def test_parquet_urls_labels_and_extra_columns_in_parallel(tmp_path, http_root):
    table = _parquet_rows(tmp_path, http_root)
    rows = rows_from_table(table, extra_columns=["license", "score"])
    stats = write_rows(rows, tmp_path / "par", shard_size=2, processes=2, max_side=32)
    assert stats["rows"] == 6 and stats["count"] == 4
    assert stats["failures_by_reason"] == {"download failed": 1, "empty caption": 1}
    assert stats["shards"] == [{"name": "00000.tar", "count": 2}, {"name": "00001.tar", "count": 1},
                               {"name": "00002.tar", "count": 1}]
    assert json.loads((tmp_path / "par" / "stats.json").read_text()) == stats
    assert (tmp_path / "par" / "nshards.txt").read_text() == "3\n"
    members = _members(tmp_path / "par" / "00001.tar")
    meta = json.loads(members["000000002.json"])
    assert members["000000002.txt"] == b"a served box" and members["000000002.cls"] == b"2"
    assert meta["license"] == "cc-by" and meta["score"] == 1.0 and meta["url"].startswith("http://127.0.0.1")
    last = _members(tmp_path / "par" / "00002.tar")
    assert "000000005.cls" not in last   # a null label is no label
    assert PIL.Image.open(io.BytesIO(last["000000005.png"])).size == (32, 24)
    # The output does not depend on the number of processes.
    write_rows(rows, tmp_path / "serial", shard_size=2, processes=1, max_side=32)
    assert _digests(tmp_path / "serial") == _digests(tmp_path / "par")


def test_refuses_existing_shards_and_cleans_a_killed_writers_temp_files(tmp_path):
    _image(tmp_path / "x.png")
    rows = [Row(0, str(tmp_path / "x.png"), "a box")]
    out = tmp_path / "out"
    write_rows(rows, out)
    (out / ".part00007.tar.tmp").write_bytes(b"half a tar")   # as a killed run leaves it
    with pytest.raises(ClipkitConfigError, match="already holds 1 .tar shards; pass --overwrite"):
        write_rows(rows, out)
    write_rows(rows * 3, out, shard_size=1, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "00001.tar", "00002.tar", "nshards.txt", "stats.json"]


def test_cli_writes_an_eval_set_in_clip_benchmark_layout(tmp_path, http_root, capsys):
    from clipkit.data.eval_reader import iter_eval_batches, read_set_metadata
    from clipkit.shards import main

    table = _parquet_rows(tmp_path, http_root)
    (tmp_path / "names.txt").write_text("\n".join(f"class{i}" for i in range(5)) + "\n")
    (tmp_path / "templates.txt").write_text("a photo of a {c}.\nit is a {c}.\n")
    out = tmp_path / "evalset"
    argv = ["parquet", str(table), str(out), "--split", "test", "--shard-size", "2", "--processes", "2",
            "--classnames", str(tmp_path / "names.txt"), "--templates", str(tmp_path / "templates.txt"),
            "--extra-cols", "license"]
    main(argv)
    assert capsys.readouterr().out.strip() == (f"wrote 4 of 6 rows in 3 shards to {out}/test (2 failed: 1 download failed, "
                                   f"1 empty caption; see {out}/test/stats.json)")
    classnames, templates = read_set_metadata(str(out / "test"))
    assert classnames == [f"class{i}" for i in range(5)] and templates == ["a photo of a {c}.", "it is a {c}."]
    assert sorted(p.name for p in (out / "test").glob("*.tar")) == ["0.tar", "1.tar", "2.tar"]
    assert not (out / "dataset_type.txt").exists()  # labelled: CLIP_benchmark's default, classification
    urls = [str(out / "test" / f"{i}.tar") for i in range(3)]
    batches = list(iter_eval_batches(urls, preprocess=lambda im: torch.zeros(3, 4, 4), batch_size=8))
    assert batches[0].labels.tolist() == [0, 1, 2, -1] and batches[0].captions[0] == ["a local box"]
    (tmp_path / "names.txt").write_text("other\n")
    with pytest.raises(SystemExit, match="^clipkit-shards: error: .*pass --overwrite"):
        main(argv)
    assert read_set_metadata(str(out / "test"))[0] == classnames  # a refused run rewrites nothing


def test_clip_benchmark_reads_the_written_eval_splits(digits_dir, tmp_path):
    """CLIP_benchmark 1.6.2's own loader (`build_wds_dataset`) on a classification and a retrieval split."""
    builder = pytest.importorskip(
        "clip_benchmark.datasets.builder",
        reason="clip-benchmark is installed by `make setup` (pip install --no-deps clip-benchmark==1.6.2)")
    from clipkit.shards import main

    out, stats = digits_dir
    digits = builder.build_wds_dataset("wds/digits", transform=lambda im: im.size, split="test", data_dir=str(out))
    samples = list(digits)
    assert len(samples) == stats["test"]["count"] and samples[0][0] == (32, 32)
    assert digits.classes == DIGIT_CLASSNAMES and digits.templates == DIGIT_TEMPLATES
    assert {label for _, label in samples} == set(range(10))

    (tmp_path / "img").mkdir()
    for i in range(3):
        _image(tmp_path / "img" / f"{i}.png", size=(8 + i, 8))
    rows = "".join(f'img/{i}.png,"box {i}\nsquare {i}"\n' for i in range(3))  # two captions per image
    (tmp_path / "pairs.csv").write_text("path,caption\n" + rows)
    main(["csv", str(tmp_path / "pairs.csv"), str(tmp_path / "coco"), "--split", "test", "--shard-size", "2"])
    assert (tmp_path / "coco" / "dataset_type.txt").read_text().strip() == "retrieval"
    captions = builder.build_wds_dataset("wds/coco", transform=lambda im: im.size, split="test",
                                         data_dir=str(tmp_path / "coco"))
    assert [c for _, c in captions] == [[f"box {i}", f"square {i}"] for i in range(3)]
