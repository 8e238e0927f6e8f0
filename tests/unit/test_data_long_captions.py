"""Several texts per row in the shard writer, and the long-caption retrieval sets from tiny copies
of their published layouts (Urban-1k, DCI, DOCCI, ShareGPT4V), read back by the eval reader and
by a text role of the training reader."""

import json
import tarfile
from collections import Counter

import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipkit.data.eval_reader import DATASET_TYPE_FILE
from clipkit.data.long_captions import (
    rows_dci,
    rows_docci,
    rows_sharegpt4v,
    rows_urban1k,
    write_retrieval_set,
)
from clipkit.data.tar_reader import ShardReader
from clipkit.data.texts import make_role
from clipkit.data.writer import rows_from_folder, rows_from_table, write_rows
from clipkit.errors import ClipkitConfigError
from clipkit.shards import main


def _image(path, value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.new("RGB", (12, 10), (value, 10, 10)).save(path)


def _samples(folder):
    """{key: {ext: bytes}} over the folder's tars, in shard order."""
    out = {}
    for shard in sorted(folder.glob("*.tar"), key=lambda p: int(p.stem)):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return out


# -- several text columns --------------------------------------------------------------------

def test_csv_text_columns_become_members_and_list_cells_go_to_the_json(tmp_path):
    for name in ("a.png", "b.png"):
        _image(tmp_path / name)
    (tmp_path / "t.csv").write_text(
        "path,caption,long_caption,rewrites\n"
        'a.png,a cat,"A cat. It sleeps.","[""a kitten"", ""a pet""]"\n'
        "b.png,a dog,,\n")
    rows = rows_from_table(tmp_path / "t.csv", text_columns=["caption", "long_caption", "rewrites"])
    assert rows[0].texts == {"long_caption": "A cat. It sleeps.", "rewrites": ["a kitten", "a pet"]}
    assert rows[1].texts == {}
    write_rows(rows, tmp_path / "out")
    samples = _samples(tmp_path / "out")
    first, second = samples["000000000"], samples["000000001"]
    assert first["txt"] == b"a cat" and first["long_caption.txt"] == b"A cat. It sleeps."
    assert json.loads(first["json"])["rewrites"] == ["a kitten", "a pet"]
    assert "long_caption.txt" not in second and "rewrites" not in json.loads(second["json"])
    # The training reader finds them as roles: a member and a json list.
    roles = [make_role("alt", ["txt"]), make_role("long", ["long_caption.txt"], required=False),
             make_role("more", ["json:rewrites"], required=False)]
    read = list(ShardReader(Counter(), roles=roles).samples(str(tmp_path / "out" / "00000.tar"), 0))
    assert [s.texts for s in read] == [{"alt": (("a cat",),), "long": (("A cat. It sleeps.",),),
                                        "more": (("a kitten", "a pet"),)},
                                       {"alt": (("a dog",),), "long": ((),), "more": ((),)}]


def test_parquet_lists_and_texts_in_json(tmp_path):
    _image(tmp_path / "a.png")
    pq.write_table(pa.table({"path": ["a.png"], "caption": ["c"], "long": ["L one. L two."],
                             "negatives": [["n1", "n2"]]}), tmp_path / "t.parquet")
    rows = rows_from_table(tmp_path / "t.parquet", text_columns=["long", "negatives"])
    write_rows(rows, tmp_path / "out", texts_in="json")
    sample = _samples(tmp_path / "out")["000000000"]
    assert set(sample) == {"png", "txt", "json"}
    doc = json.loads(sample["json"])
    assert doc["long"] == "L one. L two." and doc["negatives"] == ["n1", "n2"]


def test_folder_sidecars_and_bad_text_columns(tmp_path):
    _image(tmp_path / "src" / "a.png")
    (tmp_path / "src" / "a.txt").write_text("short")
    (tmp_path / "src" / "a.long.txt").write_text("A long one.\nTwo lines.")
    rows = rows_from_folder(tmp_path / "src", text_columns=["long"])
    assert rows[0].caption == "short" and rows[0].texts == {"long": "A long one.\nTwo lines."}
    write_rows(rows, tmp_path / "out")
    assert _samples(tmp_path / "out")["000000000"]["long.txt"] == b"A long one.\nTwo lines."
    for bad, message in [(["a/b"], "letters, digits"), (["width"], "would overwrite"), (["x", "X"], "twice")]:
        with pytest.raises(ClipkitConfigError, match=message):
            rows_from_folder(tmp_path / "src", text_columns=bad)
    with pytest.raises(ClipkitConfigError, match="lacks column"):
        rows_from_table(_csv(tmp_path), text_columns=["missing"])


def _csv(tmp_path):
    (tmp_path / "x.csv").write_text("path,caption\na.png,x\n")
    return tmp_path / "x.csv"


def test_cli_text_columns_stay_backward_compatible(tmp_path, capsys):
    _image(tmp_path / "a.png")
    (tmp_path / "t.csv").write_text("path,caption,long\na.png,c,L\n")
    main(["csv", str(tmp_path / "t.csv"), str(tmp_path / "old")])
    assert set(_samples(tmp_path / "old" / "train")["000000000"]) == {"png", "txt", "json"}
    main(["csv", str(tmp_path / "t.csv"), str(tmp_path / "new"), "--text-columns", "caption", "long"])
    assert _samples(tmp_path / "new" / "train")["000000000"]["long.txt"] == b"L"
    main(["csv", str(tmp_path / "t.csv"), str(tmp_path / "js"), "--text-columns", "long", "--texts-in", "json"])
    assert json.loads(_samples(tmp_path / "js" / "train")["000000000"]["json"])["long"] == "L"
    assert "wrote 1 of 1 rows" in capsys.readouterr().out


# -- the long-caption sets -------------------------------------------------------------------

def urban1k(root):
    """Urban-1k's layout: image/<i>.jpg and caption/<i>.txt (Long-CLIP reads the first line)."""
    for i in (1, 2, 10):
        _image(root / "image" / f"{i}.jpg", value=i)
        (root / "caption").mkdir(parents=True, exist_ok=True)
        (root / "caption" / f"{i}.txt").write_text(f"Street {i}, with   cars.  Sky {i}.\nsecond line\n")
    return root


def dci(root):
    """DCI's layout: densely_captioned_images/{splits.json, annotations/<name>.json, photos/<image>}."""
    base = root / "densely_captioned_images"
    (base / "annotations").mkdir(parents=True)
    splits = {"train": ["sa_1.json"], "valid": ["sa_2.json"], "test": ["sa_3.json"]}
    (base / "splits.json").write_text(json.dumps(splits))
    for i in (1, 2, 3):
        _image(base / "photos" / f"sa_{i}.jpg", value=i)
        (base / "annotations" / f"sa_{i}.json").write_text(json.dumps({
            "image": f"sa_{i}.jpg", "short_caption": f"Photo {i}.", "extra_caption": f"Detail {i}.\nMore {i}.",
            "mask_data": {}}))
    return root


def docci(root):
    """DOCCI's layout: docci_descriptions.jsonlines (example_id, split, image_file, description) + images/."""
    lines = []
    for i, split in enumerate(["train", "test", "test", "qual_dev"]):
        name = f"{split}_{i:05d}.jpg"
        _image(root / "images" / name, value=i)
        lines.append(json.dumps({"example_id": f"{split}_{i:05d}", "split": split, "image_file": name,
                                 "description": f"Scene {i}. Objects {i}."}))
    (root / "docci_descriptions.jsonlines").write_text("\n".join(lines) + "\n")
    return root


def sharegpt4v(root, n=5):
    """The ShareGPT4V caption json: [{"id", "image", "conversations": [human, gpt]}], images under a data root."""
    entries = []
    for i in range(n):
        _image(root / "data" / "sam" / f"sa_{i}.jpg", value=i)
        entries.append({"id": f"sa_{i}", "image": f"sam/sa_{i}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nDescribe this image in detail."},
            {"from": "gpt", "value": f"Caption {i}.\n\nMore {i}."}]})
    (root / "share-captioner.json").write_text(json.dumps(entries))
    return root / "share-captioner.json"


def test_each_readers_rows_follow_its_published_layout(tmp_path):
    rows = rows_urban1k(urban1k(tmp_path / "u"))
    assert [(r.image.rsplit("/", 1)[1], r.caption) for r in rows] == [
        (f"{i}.jpg", f"Street {i}, with cars. Sky {i}.") for i in (1, 2, 10)]
    rows = rows_dci(dci(tmp_path / "d"))
    assert [r.caption for r in rows] == [f"Photo {i}. Detail {i}. More {i}." for i in (1, 2, 3)]
    assert [r.caption for r in rows_dci(tmp_path / "d" / "densely_captioned_images", "test")] == ["Photo 3. Detail 3. More 3."]
    with pytest.raises(ClipkitConfigError, match="DCI split 'val' is not in"):
        rows_dci(tmp_path / "d", "val")
    rows = rows_docci(docci(tmp_path / "o"))
    assert [(r.extra["source_id"], r.caption) for r in rows] == [("test_00001", "Scene 1. Objects 1."),
                                                                ("test_00002", "Scene 2. Objects 2.")]
    assert len(rows_docci(tmp_path / "o", "qual_dev")) == 1
    path = sharegpt4v(tmp_path / "s")
    rows = rows_sharegpt4v(path, tmp_path / "s" / "data", count=3)
    assert [r.caption for r in rows] == [f"Caption {i}. More {i}." for i in range(3)]
    assert rows[2].image == str(tmp_path / "s" / "data" / "sam" / "sa_2.jpg")
    with pytest.raises(ClipkitConfigError, match="not found"):
        rows_urban1k(tmp_path / "nothing")


@pytest.mark.parametrize("name", ["urban1k", "dci", "docci", "sharegpt4v"])
def test_cli_writes_a_retrieval_set_the_eval_reader_reads(tmp_path, name, capsys):
    import torch

    from clipkit.data.eval_reader import clip_benchmark_set, iter_eval_batches

    src = {"urban1k": urban1k, "dci": dci, "docci": docci, "sharegpt4v": sharegpt4v}[name](tmp_path / "src")
    extra = ["--image-root", str(tmp_path / "src" / "data"), "--count", "4"] if name == "sharegpt4v" else []
    main([name, str(src), str(tmp_path / "out"), "--shard-size", "2", *extra])
    assert f"wrote {name}:" in capsys.readouterr().out
    out = tmp_path / "out"
    assert (out / DATASET_TYPE_FILE).read_text().strip() == "retrieval"
    nshards = int((out / "test" / "nshards.txt").read_text())
    assert sorted(p.name for p in (out / "test").glob("*.tar")) == [f"{i}.tar" for i in range(nshards)]
    urls, dataset_type = clip_benchmark_set(str(out), "test")
    assert dataset_type == "retrieval" and len(urls) == nshards
    batches = list(iter_eval_batches(urls, preprocess=lambda im: torch.zeros(3, 2, 2), batch_size=8))
    captions = [c for batch in batches for c in batch.captions]
    expected = {"urban1k": 3, "dci": 3, "docci": 2, "sharegpt4v": 4}[name]
    assert len(captions) == expected and all(len(c) == 1 and "\n" not in c[0] for c in captions)


def test_write_retrieval_set_counts_missing_images(tmp_path):
    root = urban1k(tmp_path / "u")
    (root / "image" / "2.jpg").unlink()
    stats = write_retrieval_set(rows_urban1k(root), tmp_path / "out")
    assert stats["count"] == 2 and stats["failures_by_reason"] == {"image not found": 1}
