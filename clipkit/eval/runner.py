"""Turns a gathered EmbeddedSet into CLIP_benchmark metrics, JSON files and a summary table."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clipkit.errors import ClipkitConfigError
from clipkit.eval.embed import EmbeddedSet
from clipkit.eval.metrics import (
    RANK_METHODS,
    TIE_ATOL,
    classification_metrics,
    exact_ranks,
    pooled_own_scores,
    retrieval_metrics,
    retrieval_metrics_exact,
    selection_groups,
    selection_metrics,
)
from clipkit.eval.search import (
    APPROX_INDEXES,
    approximate_topk,
    build_index,
    recall_vs_exact,
    set_search_params,
    topk_inner_product,
)

TASKS = ("zeroshot_classification", "retrieval", "selection")
RECALL_K = (1, 5, 10)
# The `task` a result JSON names, where clipkit's task name differs from CLIP_benchmark's.
BENCHMARK_TASK_NAMES = {"selection": "image_caption_selection"}


@dataclass(frozen=True)
class SearchConfig:
    """`eval.search`: how retrieval finds neighbours.

    index: "flat" (exact; recall@k, mean and median rank) or an approximate index,
        one of APPROX_INDEXES or a raw FAISS factory string (recall@k only, reported
        with `*_search_recall_vs_exact@k` on `sample_for_recall` seeded queries).
    nprobe: IVF lists probed per query. ef_search: HNSW's search breadth.
    tie_tolerance: (`eval.tie_tolerance`) a wrong item scoring at least the correct one's score
        minus this counts as ahead of it; 0 counts exact ties only (see `clipkit.eval.metrics`).
    ranks: how exact ranks (flat retrieval, zero-shot classification) are counted: "auto"
        (the certified int8 filter where torch has a CPU int8 GEMM, else float32), "certified"
        or "float32" (every score in a float32 GEMM: `clipkit.eval.metrics.exact_ranks`).
    """

    index: str = "flat"
    nprobe: int = 16
    ef_search: int = 64
    sample_for_recall: int = 1000
    seed: int = 0
    tie_tolerance: float = TIE_ATOL
    ranks: str = "auto"

    def __post_init__(self) -> None:
        if self.index != "flat" and self.index not in APPROX_INDEXES and "," not in self.index \
                and not self.index.startswith(("HNSW", "IVF", "PQ")):
            raise ClipkitConfigError(f"eval.search.index={self.index!r}: choose flat, {', '.join(APPROX_INDEXES)} "
                                     "or a FAISS factory string such as 'IVF256,Flat'")
        if self.nprobe < 1 or self.ef_search < 1 or self.sample_for_recall < 1:
            raise ClipkitConfigError("eval.search.nprobe, ef_search and sample_for_recall must be >= 1")
        if self.ranks not in RANK_METHODS:
            raise ClipkitConfigError(f"eval.search.ranks={self.ranks!r}: choose from {list(RANK_METHODS)}")
        if not self.tie_tolerance >= 0:
            raise ClipkitConfigError(f"eval.tie_tolerance must be >= 0, got {self.tie_tolerance}")


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()


def evaluate_embedded(
    emb: EmbeddedSet,
    *,
    tasks: Sequence[str],
    classifier: torch.Tensor | None,
    use_gpu: bool | None = None,
    search: SearchConfig | None = None,
) -> dict[str, dict[str, float]]:
    """Runs each task's exact FAISS search and metrics on one embedded set.

    Args:
        emb: the whole set (gathered), image_emb [N, D] and text_emb [M, D] unit-norm.
        tasks: names from TASKS. "zeroshot_classification" needs every label >= 0 and
            `classifier`; "retrieval" needs at least one caption. "selection" needs each image's
            texts as [true caption, hard negatives...] (`clipkit.eval.metrics.selection_groups`);
            retrieval on such a set then ranks the true captions only.
        classifier: [C, D] float class embeddings (`zeroshot_classifier`), or None.
        use_gpu: passed to `topk_inner_product`.
        search: retrieval's index; None is exact ("flat").

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
        search_cfg = search or SearchConfig()
        ranks = exact_ranks(images, _np(classifier.float()), np.arange(len(images)), labels,
                            tie_atol=search_cfg.tie_tolerance, method=search_cfg.ranks)
        results["zeroshot_classification"] = classification_metrics(ranks, labels, len(classifier))
    texts, owners = _np(emb.text_emb.float()), _np(emb.text_image_index)
    if "selection" in tasks:
        try:
            is_true, _ = selection_groups(owners, len(images))
        except ValueError as err:
            raise ClipkitConfigError(f"selection: {err}") from None
        results["selection"] = selection_metrics(pooled_own_scores(images, texts, owners), owners, len(images),
                                                 tie_atol=(search or SearchConfig()).tie_tolerance)
        texts, owners = texts[is_true], owners[is_true]   # retrieval ranks the true captions only
    if "retrieval" in tasks:
        if len(texts) == 0:
            raise ClipkitConfigError("retrieval needs captions; drop the task for sets without them")
        search = search or SearchConfig()
        if search.index == "flat":
            results["retrieval"] = retrieval_metrics_exact(texts, images, owners, RECALL_K,
                                                           tie_atol=search.tie_tolerance, method=search.ranks)
        else:
            results["retrieval"] = approximate_retrieval(texts, images, owners, search, use_gpu=use_gpu)
    return results


def approximate_retrieval(texts: np.ndarray, images: np.ndarray, owners: np.ndarray, search: SearchConfig,
                          *, use_gpu: bool | None = None) -> dict[str, float]:
    """Recall@k from an approximate index per direction, plus its recall against exact search.

    Args:
        texts: [M, D] float32 captions. images: [N, D] float32. owners: [M] caption -> image.

    Returns:
        CLIP_benchmark's recall@k keys (tie rule applied to the returned scores), and
        `{image,text}_retrieval_search_recall_vs_exact@{max k}`: the index's top-k overlap
        with exact top-k on up to `search.sample_for_recall` seeded queries.
    """
    k = max(RECALL_K)
    most_captions = int(np.bincount(owners).max())
    out: dict[str, float] = {}
    lists = {}
    for name, queries, gallery, width in (("image_retrieval", texts, images, k),
                                          ("text_retrieval", images, texts, k + most_captions - 1)):
        index = build_index(gallery, search.index, seed=search.seed)
        set_search_params(index, nprobe=search.nprobe, ef_search=search.ef_search)
        scores, ids = approximate_topk(queries, index, width)
        lists[name] = (scores, ids)
        rows = np.random.default_rng(search.seed).choice(len(queries), min(len(queries), search.sample_for_recall),
                                                          replace=False)
        _, exact = topk_inner_product(queries[rows], gallery, k, use_gpu=use_gpu)
        out[f"{name}_search_recall_vs_exact@{k}"] = recall_vs_exact(ids[rows], exact, k)
    (s_t2i, t2i), (s_i2t, i2t) = lists["image_retrieval"], lists["text_retrieval"]
    metrics = retrieval_metrics(t2i, i2t, owners, RECALL_K, text_to_image_scores=s_t2i, image_to_text_scores=s_i2t,
                                tie_atol=search.tie_tolerance)
    return {**metrics, **out}


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


SUMMARY_COLUMNS = ("model", "dataset", "task", "metric", "value")


def write_summary(out_dir: str | os.PathLike, model: str, results: dict[str, dict[str, dict[str, float]]]) -> None:
    """`summary.csv` (one row per model, dataset, task, metric) and `summary.md` (a markdown table) in out_dir.

    A CSV already there from other models is kept: rows of this `model` are replaced,
    so several `clipkit-eval` runs into one out_dir build one table across models.
    """
    import csv

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "summary.csv"
    rows = []
    if csv_path.exists():
        with open(csv_path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("model") != model]
    rows += [{"model": model, "dataset": d, "task": t, "metric": m, "value": "nan" if math.isnan(v) else f"{v:.6g}"}
             for d, tasks in results.items() for t, metrics in tasks.items() for m, v in metrics.items()]
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "summary.md").write_text(format_markdown_table(rows))


def format_markdown_table(rows: list[dict[str, str]]) -> str:
    """Summary rows -> a markdown table: one row per (model, dataset, task), one column per metric."""
    groups: dict[tuple[str, str, str], dict[str, str]] = {}
    metrics: list[str] = []
    for r in rows:
        groups.setdefault((r["model"], r["dataset"], r["task"]), {})[r["metric"]] = r["value"]
        if r["metric"] not in metrics:
            metrics.append(r["metric"])
    head = ["model", "dataset", "task", *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (model, dataset, task), values in groups.items():
        cells = [model, dataset, task, *(values.get(m, "") for m in metrics)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
