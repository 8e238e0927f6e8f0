"""Turns a gathered EmbeddedSet into CLIP_benchmark metrics, JSON files and a summary table."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from clipkit.errors import ClipkitConfigError
from clipkit.eval.embed import EmbeddedSet
from clipkit.eval.metrics import classification_metrics, retrieval_metrics
from clipkit.eval.search import topk_inner_product

TASKS = ("zeroshot_classification", "retrieval")
RECALL_K = (1, 5, 10)


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()


def evaluate_embedded(
    emb: EmbeddedSet,
    *,
    tasks: Sequence[str],
    classifier: torch.Tensor | None,
    use_gpu: bool | None = None,
) -> dict[str, dict[str, float]]:
    """Runs each task's exact FAISS search and metrics on one embedded set.

    Args:
        emb: the whole set (gathered), image_emb [N, D] and text_emb [M, D] unit-norm.
        tasks: names from TASKS. "zeroshot_classification" needs every label >= 0 and
            `classifier`; "retrieval" needs at least one caption.
        classifier: [C, D] float class embeddings (`zeroshot_classifier`), or None.
        use_gpu: passed to `topk_inner_product`.

    Returns:
        {task: {metric: value}} with CLIP_benchmark's metric names.
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ClipkitConfigError(f"unknown eval task(s) {unknown}; choose from {list(TASKS)}")
    images = _np(emb.image_emb.float())
    results: dict[str, dict[str, float]] = {}
    if "zeroshot_classification" in tasks:
        labels = _np(emb.labels)
        if classifier is None:
            raise ClipkitConfigError("zeroshot_classification needs class names and templates to build a classifier")
        if len(labels) == 0 or labels.min() < 0 or labels.max() >= len(classifier):
            raise ClipkitConfigError(f"zeroshot_classification needs a label in [0, {len(classifier)}) for every image; "
                                     "drop the task for sets without class labels")
        _, top = topk_inner_product(images, _np(classifier.float()), 5, use_gpu=use_gpu)
        results["zeroshot_classification"] = classification_metrics(top, labels, len(classifier))
    if "retrieval" in tasks:
        if len(emb.text_emb) == 0:
            raise ClipkitConfigError("retrieval needs captions; drop the task for sets without them")
        texts, k = _np(emb.text_emb.float()), max(RECALL_K)
        _, text_to_image = topk_inner_product(texts, images, k, use_gpu=use_gpu)
        _, image_to_text = topk_inner_product(images, texts, k, use_gpu=use_gpu)
        results["retrieval"] = retrieval_metrics(text_to_image, image_to_text, _np(emb.text_image_index), RECALL_K)
    return results


def write_benchmark_json(
    path: str | os.PathLike,
    *,
    dataset: str,
    model: str,
    pretrained: str,
    task: str,
    metrics: dict[str, float],
) -> None:
    """Writes one result in CLIP_benchmark's JSON layout, atomically.

    A temp file in the target directory plus os.replace means a reader (or a crash)
    never sees a half-written file. NaN (acc5 with < 5 classes) is written as `NaN`,
    as CLIP_benchmark's json.dump does.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"dataset": dataset, "model": model, "pretrained": pretrained, "task": task,
              "metrics": metrics, "language": "en"}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def format_results_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """{dataset: {task: {metric: value}}} -> aligned plain-text table, one metric per line."""
    rows = [("dataset", "task", "metric", "value")]
    for dataset, tasks in results.items():
        for task, metrics in tasks.items():
            for metric, value in metrics.items():
                rows.append((dataset, task, metric, "nan" if math.isnan(value) else f"{value:.4f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3].rjust(widths[3]) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
