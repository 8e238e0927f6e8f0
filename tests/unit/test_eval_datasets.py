"""CSV/JSONL caption sets and class folders read without shards, through specs, the suite and the cache."""

import csv
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from clipkit.errors import ClipkitConfigError
from clipkit.eval.cache import cache_path, load_embedded
from clipkit.eval.datasets import folder_classes, iter_item_batches, read_caption_items, read_folder_items
from clipkit.eval.runner import SearchConfig, write_summary
from clipkit.eval.suite import EvalSuite, build_eval_specs

COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def preprocess(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.resize((4, 4)), dtype=np.float32) / 255).permute(2, 0, 1)


def _png(path: Path, rgb: tuple[int, int, int]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 6), rgb).save(path)
    return path.name


@pytest.fixture()
def caption_sets(tmp_path: Path) -> Path:
    for name, rgb in COLORS.items():
        _png(tmp_path / "img" / f"{name}.png", rgb)
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows([["img/red.png", "red"], ["img/green.png", "green"], ["img/red.png", "a red square"],
                     ["img/blue.png", json.dumps(["blue", "a blue square"])]])
    with open(tmp_path / "pairs.jsonl", "w") as f:
        f.write(json.dumps({"image": "img/red.png", "captions": ["red", "a red square"]}) + "\n")
        f.write(json.dumps({"image": "img/green.png", "caption": "green"}) + "\n\n")
        f.write(json.dumps({"image": "img/blue.png", "captions": ["blue", "a blue square"]}) + "\n")
    return tmp_path


@pytest.fixture()
def folder_set(tmp_path: Path) -> Path:
    root = tmp_path / "folder"
    for name, rgb in COLORS.items():
        for i in range(2):
            _png(root / f"c_{name}" / f"{i}.png", rgb)
    (root / "classnames.txt").write_text("blue\ngreen\nred\n")  # sorted dirs: c_blue, c_green, c_red
    (root / "notes.txt").write_text("not a class")
    return root


def test_csv_groups_rows_by_image_and_parses_json_lists(caption_sets: Path) -> None:
    items = read_caption_items(str(caption_sets / "pairs.csv"))
    assert [(Path(p).name, caps, label) for p, caps, label in items] == [
        ("red.png", ["red", "a red square"], -1), ("green.png", ["green"], -1),
        ("blue.png", ["blue", "a blue square"], -1)]
    jsonl = read_caption_items(str(caption_sets / "pairs.jsonl"))
    assert [(p, c) for p, c, _ in jsonl] == [(p, c) for p, c, _ in items]


def test_caption_file_errors_are_one_line_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ClipkitConfigError, match="not found"):
        read_caption_items(str(tmp_path / "missing.csv"))
    (tmp_path / "bad.csv").write_text("path,caption\na.png,x\n")
    with pytest.raises(ClipkitConfigError, match="'image'"):
        read_caption_items(str(tmp_path / "bad.csv"))


def test_folder_classes_from_classnames_file_in_sorted_dir_order(folder_set: Path) -> None:
    assert folder_classes(str(folder_set)) == (["c_blue", "c_green", "c_red"], ["blue", "green", "red"])
    items = read_folder_items(str(folder_set))
    assert [label for _, _, label in items] == [0, 0, 1, 1, 2, 2] and all(caps == [] for _, caps, _ in items)
    (folder_set / "classnames.txt").write_text("only one\n")
    with pytest.raises(ClipkitConfigError, match="1 names for 3"):
        folder_classes(str(folder_set))


def test_item_batches_split_over_ranks_like_the_shard_reader(folder_set: Path) -> None:
    items = read_folder_items(str(folder_set))
    whole = [k for b in iter_item_batches(items, preprocess=preprocess, batch_size=4) for k in b.keys]
    shares = [[k for b in iter_item_batches(items, preprocess=preprocess, batch_size=2, rank=r, world_size=2)
               for k in b.keys] for r in range(2)]
    assert shares == [whole[0::2], whole[1::2]]
    batch = next(iter_item_batches(items, preprocess=preprocess, batch_size=4))
    assert batch.images.shape == (4, 3, 4, 4) and batch.labels.dtype == torch.long


def test_specs_pick_the_reader_by_key(caption_sets: Path, folder_set: Path) -> None:
    specs = build_eval_specs({"coco": {"csv": str(caption_sets / "pairs.csv")},
                              "flickr": {"jsonl": str(caption_sets / "pairs.jsonl")},
                              "colors": {"folder": str(folder_set), "templates": ["a {c} square"]}})
    assert [(s.source, s.tasks) for s in specs] == [("csv", ["retrieval"]), ("jsonl", ["retrieval"]),
                                                    ("folder", ["zeroshot_classification"])]
    assert specs[2].classnames == ["blue", "green", "red"]
    with pytest.raises(ClipkitConfigError, match="exactly one of"):
        build_eval_specs({"x": {"csv": "a.csv", "folder": "b"}})
    with pytest.raises(ClipkitConfigError, match="templates"):
        build_eval_specs({"colors": {"folder": str(folder_set)}})  # no templates file, none in config


class ColorObjective(nn.Module):
    """Image: mean colour; text: the colour named in it. Perfect zero-shot and retrieval."""

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.float()


def tokenizer(texts: list[str]) -> torch.Tensor:
    def vec(t: str) -> list[float]:
        hit = [float(c in t) for c in ("red", "green", "blue")]
        return hit if any(hit) else [zlib.crc32(t.encode()) % 7 / 7.0, 0.1, 0.1]
    return torch.tensor([vec(t) for t in texts])


def test_suite_scores_file_sets_caches_embeddings_and_writes_summary(caption_sets, folder_set, tmp_path) -> None:
    specs = build_eval_specs({"coco": {"csv": str(caption_sets / "pairs.csv")},
                              "colors": {"folder": str(folder_set), "templates": ["a {c} square", "{c}"]}})
    cache = tmp_path / "cache"
    suite = EvalSuite(specs, preprocess=preprocess, tokenizer=tokenizer, batch_size=2, out_dir=tmp_path / "out",
                      model_name="color", search=SearchConfig(), cache_dir=cache)
    metrics = suite.run(ColorObjective(), device="cpu", tag="v1")
    assert metrics["coco/image_retrieval_recall@1"] == 1.0 and metrics["coco/text_retrieval_median_rank"] == 1.0
    assert metrics["colors/acc1"] == 1.0 and np.isnan(metrics["colors/acc5"])
    cached = load_embedded(cache_path(cache, "color", "coco", "v1"))
    assert cached is not None and cached.text_emb.shape == (5, 3) and cached.text_image_index.tolist() == [0, 0, 1, 2, 2]

    class Exploding(ColorObjective):
        def encode_image(self, images):  # a second run of the same tag must not embed images again
            raise AssertionError("re-embedded despite the cache")
    again = EvalSuite(specs, preprocess=preprocess, tokenizer=tokenizer, batch_size=2, out_dir=None,
                      model_name="color", cache_dir=cache).run(Exploding(), device="cpu", tag="v1")
    assert again == pytest.approx(metrics, nan_ok=True)

    write_summary(tmp_path / "out", "color", suite.last_results)
    write_summary(tmp_path / "out", "other", {"coco": {"retrieval": {"image_retrieval_recall@1": 0.5}}})
    with open(tmp_path / "out" / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["model", "dataset", "task", "metric", "value"]
    assert {r["model"] for r in rows} == {"color", "other"}
    assert {"model": "color", "dataset": "coco", "task": "retrieval", "metric": "image_retrieval_recall@1",
            "value": "1"} in rows
    md = (tmp_path / "out" / "summary.md").read_text().splitlines()
    assert md[0].startswith("| model | dataset | task | ") and md[1].startswith("|---|")
    assert len(md) == 2 + 3  # color/coco, color/colors, other/coco


def test_clip_benchmark_root_reads_nshards_dataset_type_and_metadata(tmp_path: Path) -> None:
    from clipkit.data.writer import write_eval_metadata, write_shards

    def sample(i: int, label: bool) -> dict:
        image = _png(tmp_path / "src" / f"{i}.png", list(COLORS.values())[i % 3])
        return {"__key__": f"{i:09d}", "png": (tmp_path / "src" / image).read_bytes(), "txt": f"caption {i}",
                **({"cls": i % 3} if label else {})}

    classes = tmp_path / "classes"
    write_shards((sample(i, True) for i in range(5)), classes / "test", shard_size=2, naming="clip_benchmark")
    write_eval_metadata(classes, {"classnames.txt": list(COLORS), "zeroshot_classification_templates.txt": ["a {c}."]})
    captions = tmp_path / "captions"
    write_shards((sample(i, False) for i in range(3)), captions / "val", shard_size=2, naming="clip_benchmark")
    write_eval_metadata(captions, {}, dataset_type="retrieval")

    spec, = build_eval_specs({"colors": {"clip_benchmark": str(classes)}})  # split defaults to test
    assert spec.urls == [str(classes / "test" / f"{i}.tar") for i in range(3)]
    assert spec.tasks == ["zeroshot_classification"] and spec.classnames == list(COLORS)
    spec, = build_eval_specs({"coco": {"clip_benchmark": str(captions), "split": "val"}})
    assert spec.tasks == ["retrieval"] and len(spec.urls) == 2
    with pytest.raises(ClipkitConfigError, match="nshards.txt is missing"):
        build_eval_specs({"coco": {"clip_benchmark": str(captions)}})  # no test split there
    (classes / "test" / "1.tar").unlink()
    with pytest.raises(ClipkitConfigError, match="shard not found"):
        build_eval_specs({"colors": {"clip_benchmark": str(classes)}})
