"""Zero-shot classifier math, embedding + 2-process gather, task runner and result files."""

import json
import math
import os
import socket
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from clipkit.errors import ClipkitConfigError
from clipkit.eval import (
    EmbeddedSet,
    embed_eval_set,
    evaluate_embedded,
    format_results_table,
    gather_embedded_set,
    write_benchmark_json,
    zeroshot_classifier,
)


@dataclass
class Batch:  # the fields of clipkit.data.eval_reader.EvalBatch
    images: torch.Tensor
    captions: list[list[str]]
    labels: torch.Tensor
    keys: list[str]


DIM = 8
CLASSES = ["cat", "dog", "bird", "fish", "cow", "ant"]
TEMPLATES = ["a photo of a {c}.", "a {c} {in the wild}"]
N_CAPTIONS = [2, 1, 0, 3, 1, 2, 1]  # image 2 has none
# Per scenario, the item ranges of rank 0 and rank 1: uneven shares, and an empty rank.
SPLITS = {"uneven": (range(0, 3), range(3, 7)), "empty_rank0": (range(0, 0), range(0, 7))}


def fake_encode_text(texts: list[str]) -> torch.Tensor:
    """[n, DIM] unnormalized, a fixed function of each string (same in every process)."""
    rows = [torch.randn(DIM, generator=torch.Generator().manual_seed(zlib.crc32(t.encode()))) * (1 + len(t) % 3)
            for t in texts]
    return torch.stack(rows)


_IMAGE_PROJ = torch.randn(3 * 4 * 4, DIM, generator=torch.Generator().manual_seed(0))


def fake_encode_image(images: torch.Tensor) -> torch.Tensor:
    return images.flatten(1) @ _IMAGE_PROJ


def make_batches(items: range, batch_size: int = 2) -> list[Batch]:
    gen = torch.Generator().manual_seed(1)
    all_images = torch.randn(len(N_CAPTIONS), 3, 4, 4, generator=gen)
    out = []
    ids = list(items)
    for s in range(0, len(ids), batch_size):
        chunk = ids[s:s + batch_size]
        out.append(Batch(all_images[chunk], [[f"caption {j} of image {i}" for j in range(N_CAPTIONS[i])] for i in chunk],
                         torch.tensor([i % len(CLASSES) for i in chunk]), [f"{i:06d}" for i in chunk]))
    return out


def test_zeroshot_classifier_normalizes_each_template_then_the_mean() -> None:
    table = {"a x": [3.0, 0.0], "the x {here}": [0.0, 1.0], "a y": [0.0, -2.0], "the y {here}": [0.0, -5.0]}
    weights = zeroshot_classifier(lambda ts: torch.tensor([table[t] for t in ts]), ["x", "y"], ["a {c}", "the {c} {here}"])
    # x: mean([1, 0], [0, 1]) renormalized; without per-template normalization it would lean to [3, 1].
    expected = torch.tensor([[1.0, 1.0], [0.0, -math.sqrt(2)]]) / math.sqrt(2)
    torch.testing.assert_close(weights, expected)
    assert weights.dtype == torch.float32


def test_zeroshot_classifier_matches_manual_ensemble() -> None:
    weights = zeroshot_classifier(fake_encode_text, CLASSES, TEMPLATES)
    assert weights.shape == (len(CLASSES), DIM)
    torch.testing.assert_close(weights.norm(dim=1), torch.ones(len(CLASSES)))
    for row, name in zip(weights, CLASSES):
        per_template = F.normalize(fake_encode_text([t.replace("{c}", name) for t in TEMPLATES]), dim=-1)
        torch.testing.assert_close(row, F.normalize(per_template.mean(0), dim=0))


def test_zeroshot_classifier_rejects_template_without_placeholder() -> None:
    with pytest.raises(ClipkitConfigError, match="{c}"):
        zeroshot_classifier(fake_encode_text, CLASSES, ["a photo of a {}."])


def test_embed_eval_set_shapes_and_caption_owners() -> None:
    emb = embed_eval_set(make_batches(range(7), batch_size=3), fake_encode_image, fake_encode_text)
    assert emb.image_emb.shape == (7, DIM) and emb.text_emb.shape == (sum(N_CAPTIONS), DIM)
    assert emb.image_emb.dtype == emb.text_emb.dtype == torch.float32
    torch.testing.assert_close(emb.image_emb.norm(dim=1), torch.ones(7))
    torch.testing.assert_close(emb.text_emb.norm(dim=1), torch.ones(sum(N_CAPTIONS)))
    assert emb.text_image_index.tolist() == [i for i, n in enumerate(N_CAPTIONS) for _ in range(n)]
    assert emb.labels.tolist() == [i % len(CLASSES) for i in range(7)]
    torch.testing.assert_close(emb.text_emb[3], F.normalize(fake_encode_text(["caption 0 of image 3"]), dim=-1)[0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        classifier = zeroshot_classifier(fake_encode_text, CLASSES, TEMPLATES)
        for name, shares in SPLITS.items():
            local = embed_eval_set(make_batches(shares[rank]), fake_encode_image, fake_encode_text)
            emb = gather_embedded_set(local)
            metrics = evaluate_embedded(emb, tasks=["zeroshot_classification", "retrieval"], classifier=classifier,
                                        use_gpu=False)
            torch.save({"emb": emb.__dict__, "metrics": metrics}, os.path.join(out_dir, f"{name}_{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_gather_equals_one_process(tmp_path: Path) -> None:
    mp.spawn(_gather_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    classifier = zeroshot_classifier(fake_encode_text, CLASSES, TEMPLATES)
    ref = embed_eval_set(make_batches(range(7)), fake_encode_image, fake_encode_text)
    ref_metrics = evaluate_embedded(ref, tasks=["zeroshot_classification", "retrieval"], classifier=classifier,
                                    use_gpu=False)
    for name in SPLITS:
        for rank in range(2):
            got = torch.load(tmp_path / f"{name}_{rank}.pt")
            for field, value in ref.__dict__.items():
                torch.testing.assert_close(got["emb"][field], value, atol=1e-6, rtol=0, msg=f"{name} r{rank} {field}")
            assert got["metrics"] == ref_metrics, (name, rank)


def _separable_set(n: int = 40, dim: int = 16) -> tuple[EmbeddedSet, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    images = F.normalize(torch.randn(n, dim, generator=gen), dim=-1)
    owners = torch.arange(n).repeat_interleave(torch.randint(1, 4, (n,), generator=gen))
    texts = F.normalize(images[owners] + 0.01 * torch.randn(len(owners), dim, generator=gen), dim=-1)
    classifier = F.normalize(torch.randn(5, dim, generator=gen), dim=-1)
    labels = (images @ classifier.T).argmax(1)
    labels[0] = (labels[0] + 1) % 5  # exactly one top-1 mistake
    return EmbeddedSet(images, texts, owners, labels), classifier


def test_evaluate_embedded_known_answers() -> None:
    emb, classifier = _separable_set()
    res = evaluate_embedded(emb, tasks=["zeroshot_classification", "retrieval"], classifier=classifier, use_gpu=False)
    assert res["zeroshot_classification"]["acc1"] == pytest.approx(39 / 40)
    assert res["zeroshot_classification"]["acc5"] == 1.0  # 5 classes: top-5 is everything
    # Captions are near-copies of their image, so both directions are perfect at k=1.
    assert res["retrieval"] == {**{f"{d}_retrieval_recall@{k}": 1.0 for k in (1, 5, 10) for d in ("image", "text")},
                                **{f"{d}_retrieval_{s}_rank": 1.0 for s in ("mean", "median") for d in ("image", "text")}}


def test_evaluate_embedded_rejects_unusable_tasks() -> None:
    emb, classifier = _separable_set()
    with pytest.raises(ClipkitConfigError, match="unknown"):
        evaluate_embedded(emb, tasks=["linear_probe"], classifier=classifier)
    with pytest.raises(ClipkitConfigError, match="classifier"):
        evaluate_embedded(emb, tasks=["zeroshot_classification"], classifier=None)
    emb.labels[3] = -1
    with pytest.raises(ClipkitConfigError, match="label"):
        evaluate_embedded(emb, tasks=["zeroshot_classification"], classifier=classifier)
    no_text = EmbeddedSet(emb.image_emb, emb.image_emb[:0], emb.text_image_index[:0], emb.labels)
    with pytest.raises(ClipkitConfigError, match="captions"):
        evaluate_embedded(no_text, tasks=["retrieval"], classifier=None)


def test_write_benchmark_json_clip_benchmark_layout(tmp_path: Path) -> None:
    path = tmp_path / "results" / "cifar10.json"
    path.parent.mkdir()
    path.write_text("stale")
    metrics = {"acc1": 0.5, "acc5": float("nan"), "mean_per_class_recall": 0.25}
    write_benchmark_json(path, dataset="cifar10", model="ViT-B-32", pretrained="run1/step_100",
                         task="zeroshot_classification", metrics=metrics)
    record = json.loads(path.read_text())
    assert list(record) == ["dataset", "model", "pretrained", "task", "metrics", "language"]
    assert record["dataset"] == "cifar10" and record["task"] == "zeroshot_classification" and record["language"] == "en"
    assert record["metrics"]["acc1"] == 0.5 and math.isnan(record["metrics"]["acc5"])
    assert os.listdir(path.parent) == ["cifar10.json"]  # no temp file left behind


def test_format_results_table() -> None:
    table = format_results_table({"cifar10": {"zeroshot_classification": {"acc1": 0.91234, "acc5": float("nan")}},
                                  "flickr30k": {"retrieval": {"image_retrieval_recall@1": 0.5}}})
    lines = table.splitlines()
    assert lines[0].split() == ["dataset", "task", "metric", "value"]
    assert lines[2].split() == ["cifar10", "zeroshot_classification", "acc1", "0.9123"]
    assert lines[3].split() == ["cifar10", "zeroshot_classification", "acc5", "nan"]
    assert lines[4].split() == ["flickr30k", "retrieval", "image_retrieval_recall@1", "0.5000"]
    assert len({len(line) for line in lines}) == 1  # aligned columns


def test_result_folders_keep_models_apart() -> None:
    from clipkit.evaluate import result_folder

    assert result_folder("ViT-B-32-laion2b.pt") == "ViT-B-32-laion2b.pt"
    assert result_folder("local-dir:/x/export") == "local-dir_x_export"
    assert result_folder("ViT-B-32-a.pt") != result_folder("ViT-B-32-b.pt")
    assert result_folder("..") == "model"


def test_eval_tie_tolerance_decides_a_near_tie():
    """A wrong class scoring 5e-7 below the true one: ahead of it within the default 1e-6
    tolerance (a miss), behind it at `eval.tie_tolerance=0` (a hit, as CLIP_benchmark counts)."""
    from omegaconf import OmegaConf

    from clipkit.eval.runner import SearchConfig
    from clipkit.eval.suite import build_search_config

    angle = math.acos(1 - 5e-7)
    image = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    classifier = torch.tensor([[1.0, 0.0], [math.cos(angle), math.sin(angle)]], dtype=torch.float64)
    emb = EmbeddedSet(image.float(), torch.empty(0, 2), torch.empty(0, dtype=torch.long), torch.tensor([0]))
    tasks = ["zeroshot_classification"]
    default = evaluate_embedded(emb, tasks=tasks, classifier=classifier.float(), search=SearchConfig())
    strict = build_search_config(OmegaConf.create({"tie_tolerance": 0.0}))
    exact = evaluate_embedded(emb, tasks=tasks, classifier=classifier.float(), search=strict)
    assert default["zeroshot_classification"]["acc1"] == 0.0 and exact["zeroshot_classification"]["acc1"] == 1.0
    with pytest.raises(ClipkitConfigError, match="eval.tie_tolerance must be >= 0"):
        build_search_config(OmegaConf.create({"tie_tolerance": -1.0}))
