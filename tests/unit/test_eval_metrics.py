"""CLIP_benchmark metric definitions on hand-made cases and against its formulas."""

import math

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

from clipkit.eval.metrics import classification_metrics, retrieval_metrics
from clipkit.eval.search import topk_inner_product


def _ranked(scores: np.ndarray) -> np.ndarray:
    return np.argsort(-scores, axis=1, kind="stable")


def test_classification_imbalanced_hand_case() -> None:
    labels = np.array([0, 0, 0, 0, 1, 2, 1])
    top = np.array([
        [0, 1, 2, 3, 4, 5],
        [0, 1, 2, 3, 4, 5],
        [0, 1, 2, 3, 4, 5],
        [0, 1, 2, 3, 4, 5],
        [3, 4, 5, 1, 0, 2],  # label 1 at rank 4: top-5 hit, top-1 miss
        [2, 0, 1, 3, 4, 5],
        [5, 4, 3, 2, 0, 1],  # label 1 at rank 6: miss even at top-5
    ])
    m = classification_metrics(top, labels, num_classes=6)
    assert m["acc1"] == pytest.approx(5 / 7)
    assert m["acc5"] == pytest.approx(6 / 7)
    # Per-class top-1 recall: class 0 4/4, class 1 0/2, class 2 1/1 -> 2/3, not acc1's 5/7.
    assert m["mean_per_class_recall"] == pytest.approx(2 / 3)


def test_classification_acc5_nan_below_five_classes() -> None:
    m = classification_metrics(np.array([[0, 1, 2], [2, 1, 0]]), np.array([0, 1]), num_classes=3)
    assert math.isnan(m["acc5"]) and m["acc1"] == 0.5 and m["mean_per_class_recall"] == 0.5


def test_classification_matches_sklearn_and_topk_on_random_logits() -> None:
    rng = np.random.default_rng(0)
    logits, labels = rng.standard_normal((500, 12)), rng.choice(12, 500, p=np.linspace(1, 3, 12) / 24)
    m = classification_metrics(_ranked(logits)[:, :5], labels, num_classes=12)
    top5 = np.argsort(-logits, axis=1)[:, :5]
    assert m["acc1"] == pytest.approx(np.mean(logits.argmax(1) == labels))
    assert m["acc5"] == pytest.approx(np.mean((top5 == labels[:, None]).any(1)))
    assert m["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(labels, logits.argmax(1)))


# 4 captions x 3 images; image 0 owns captions 0 and 1, image 1 caption 2, image 2 caption 3.
_TEXT_IMAGE = np.array([0, 0, 1, 2])
_SCORES = np.array([  # text @ image.T
    [0.1, 0.9, 0.5],  # own image ranked 3rd
    [0.9, 0.2, 0.1],  # 1st
    [0.3, 0.8, 0.1],  # 1st
    [0.7, 0.1, 0.2],  # 2nd
])


def test_retrieval_hand_case_any_caption_counts() -> None:
    m = retrieval_metrics(_ranked(_SCORES), _ranked(_SCORES.T), _TEXT_IMAGE, recall_k=(1, 2, 5))
    assert m["image_retrieval_recall@1"] == 0.5
    assert m["image_retrieval_recall@2"] == 0.75
    assert m["image_retrieval_recall@5"] == 1.0
    # Image 0's best caption is its 2nd one, caption 0 ranks last: "any caption" gives a hit.
    assert m["text_retrieval_recall@1"] == pytest.approx(1 / 3)
    assert m["text_retrieval_recall@2"] == 1.0
    assert m["text_retrieval_recall@5"] == 1.0


def test_retrieval_skips_images_without_captions_as_text_queries() -> None:
    scores = np.hstack([_SCORES, np.full((4, 1), -1.0)])  # image 3: a distractor with no caption
    m = retrieval_metrics(_ranked(scores), _ranked(scores.T), _TEXT_IMAGE, recall_k=(1,))
    assert m == {"image_retrieval_recall@1": 0.5, "text_retrieval_recall@1": pytest.approx(1 / 3)}


def _clip_benchmark_retrieval(text: np.ndarray, image: np.ndarray, text_image: np.ndarray, ks) -> dict:
    """CLIP_benchmark's zeroshot_retrieval formulas on the full score matrix."""
    scores = text @ image.T
    positive = np.zeros_like(scores, dtype=bool)
    positive[np.arange(len(scores)), text_image] = True

    def recall(s: np.ndarray, pos: np.ndarray, k: int) -> float:
        topk = np.argsort(-s, axis=1)[:, :k]
        return float(np.mean(np.take_along_axis(pos, topk, 1).sum(1) > 0))

    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = recall(scores, positive, k)
        out[f"text_retrieval_recall@{k}"] = recall(scores.T, positive.T, k)
    return out


def test_retrieval_matches_clip_benchmark_formulas() -> None:
    rng = np.random.default_rng(1)
    n_img, dim = 60, 8
    image = rng.standard_normal((n_img, dim)).astype(np.float32)
    text_image = np.repeat(np.arange(n_img), rng.integers(1, 5, n_img))  # 1-4 captions each
    text = (image[text_image] + 1.5 * rng.standard_normal((len(text_image), dim))).astype(np.float32)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    _, t2i = topk_inner_product(text, image, 10, gallery_chunk=16, use_gpu=False)
    _, i2t = topk_inner_product(image, text, 10, gallery_chunk=16, use_gpu=False)
    got = retrieval_metrics(t2i, i2t, text_image)
    want = _clip_benchmark_retrieval(text.astype(np.float64), image.astype(np.float64), text_image, (1, 5, 10))
    assert got == pytest.approx(want)
    assert 0 < got["text_retrieval_recall@1"] < 1 and 0 < got["image_retrieval_recall@1"] < 1
