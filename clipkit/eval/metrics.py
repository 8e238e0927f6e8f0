"""CLIP_benchmark's zero-shot classification and retrieval metrics, from top-k ids.

Metric names and definitions follow CLIP_benchmark, so clipkit's numbers are directly
comparable with its published tables. Everything here works on top-k index arrays
(what `clipkit.eval.search.topk_inner_product` returns), never on full score matrices.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def classification_metrics(top_indices: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """`acc1`, `acc5` and `mean_per_class_recall` of ranked class predictions.

    Args:
        top_indices: [N, k] int, predicted class ids best first; k >= min(5, num_classes).
        labels: [N] int, true class ids in [0, num_classes).
        num_classes: C, the number of candidate classes.

    Returns:
        `acc5` is NaN when C < 5 (top-5 would be trivially 1), as in CLIP_benchmark.
        `mean_per_class_recall` is top-1 recall averaged over the classes that occur in
        `labels` (sklearn's balanced accuracy), which differs from `acc1` when classes
        are imbalanced.
    """
    labels = np.asarray(labels)
    if top_indices.ndim != 2 or len(top_indices) != len(labels) or len(labels) == 0:
        raise ValueError(f"expected [N, k] ids and [N] labels with N > 0, got {top_indices.shape} and {labels.shape}")
    if top_indices.shape[1] < min(5, num_classes):
        raise ValueError(f"need top-{min(5, num_classes)} predictions, got {top_indices.shape[1]}")
    hit1 = top_indices[:, 0] == labels
    acc5 = float(np.mean((top_indices[:, :5] == labels[:, None]).any(axis=1))) if num_classes >= 5 else float("nan")
    classes = np.unique(labels)
    per_class = [np.mean(hit1[labels == c]) for c in classes]
    return {"acc1": float(np.mean(hit1)), "acc5": acc5, "mean_per_class_recall": float(np.mean(per_class))}


def retrieval_metrics(
    text_to_image: np.ndarray,
    image_to_text: np.ndarray,
    text_image_index: np.ndarray,
    recall_k: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Image- and text-retrieval recall@k with multi-caption images.

    Args:
        text_to_image: [M, >= min(max k, N)] int, image ids per caption query, best first.
        image_to_text: [N, >= min(max k, M)] int, caption ids per image query, best first.
        text_image_index: [M] int, the image each caption belongs to.
        recall_k: the k values to report.

    Returns:
        `image_retrieval_recall@k`: mean over captions of "its own image is in the top k".
        `text_retrieval_recall@k`: mean over images of "any of its captions is in the
        top k". Images without captions have nothing to retrieve and are left out of
        this mean (CLIP_benchmark's sets always have captions, so it agrees there).
    """
    n_text, n_image = len(text_image_index), len(image_to_text)
    if len(text_to_image) != n_text or n_text == 0 or n_image == 0:
        raise ValueError(f"expected M > 0 caption rows and N > 0 image rows, got {text_to_image.shape}, {image_to_text.shape}")
    need = max(recall_k)
    if text_to_image.shape[1] < min(need, n_image) or image_to_text.shape[1] < min(need, n_text):
        raise ValueError(f"top-k arrays too narrow for recall@{need}: {text_to_image.shape}, {image_to_text.shape}")
    text_image_index = np.asarray(text_image_index)
    image_hit = text_to_image == text_image_index[:, None]  # [M, k]: own image at that rank
    caption_hit = text_image_index[image_to_text] == np.arange(n_image)[:, None]  # [N, k]: own caption at that rank
    has_caption = np.bincount(text_image_index, minlength=n_image) > 0
    out: dict[str, float] = {}
    for k in recall_k:
        out[f"image_retrieval_recall@{k}"] = float(np.mean(image_hit[:, :k].any(axis=1)))
        out[f"text_retrieval_recall@{k}"] = float(np.mean(caption_hit[:, :k].any(axis=1)[has_caption]))
    return out
