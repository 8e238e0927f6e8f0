"""Mean/median rank and the pessimistic tie rule (clipkit.eval.metrics) on hand-made ties."""

import numpy as np
import pytest

from clipkit.eval.metrics import (
    TIE_ATOL,
    positive_ranks,
    rank_metrics,
    ranks_from_topk,
    retrieval_metrics,
    retrieval_metrics_exact,
)
from clipkit.eval.search import topk_inner_product


def _unit(rows: list[list[float]]) -> np.ndarray:
    x = np.array(rows, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# 3 images; image 1 is an exact duplicate of image 0. Captions: 0,1 -> image 0, 2 -> image 1, 3 -> image 2.
IMAGES = _unit([[1, 0, 0], [1, 0, 0], [0, 1, 0]])
CAPTIONS = _unit([[1, 0.1, 0], [1, 0, 0.2], [1, 0, 0], [0.2, 1, 0]])
OWNER = np.array([0, 0, 1, 2])


def test_tie_counts_against_the_query_whatever_the_index_order() -> None:
    # Captions 0-2 score images 0 and 1 identically: each ranks its own image 2nd, even caption 0
    # whose own image comes first in index order (index order would give it rank 1).
    ranks = positive_ranks(CAPTIONS, IMAGES, np.arange(4), OWNER)
    assert ranks.tolist() == [2, 2, 2, 1]
    # Swapping the duplicates' order changes nothing.
    perm = np.array([1, 0, 2])
    swapped = positive_ranks(CAPTIONS, IMAGES[perm], np.arange(4), np.argsort(perm)[OWNER])
    assert swapped.tolist() == ranks.tolist()


def test_near_ties_within_atol_count_scores_below_do_not() -> None:
    q = np.array([[1.0, 0.0]], np.float32)
    gallery = np.array([[0.5, 0], [0.5 - TIE_ATOL / 4, 0], [0.5 - 10 * TIE_ATOL, 0], [0.6, 0]], np.float32)
    # correct = row 0 (0.5); row 3 is above, row 1 within atol, row 2 clearly below.
    assert positive_ranks(q, gallery, [0], [0]).tolist() == [3]
    assert positive_ranks(q, gallery, [0], [0], tie_atol=0.0).tolist() == [2]


def test_several_correct_items_use_the_best_one_and_do_not_count_each_other() -> None:
    q = np.array([[1.0, 0.0]], np.float32)
    gallery = np.array([[0.9, 0], [0.9, 0], [0.95, 0], [0.3, 0], [0.9, 0]], np.float32)
    # correct rows 0, 1 and 3: best 0.9; wrong rows 2 (0.95) and 4 (tied 0.9) are ahead.
    assert positive_ranks(q, gallery, [0, 0, 0], [0, 1, 3]).tolist() == [3]


def test_query_without_correct_item_gets_rank_zero() -> None:
    q = np.eye(2, dtype=np.float32)
    assert positive_ranks(q, q, [1], [1]).tolist() == [0, 1]


@pytest.mark.parametrize("chunk,block", [(1, 1), (3, 2), (7, 5), (1000, 1000)])
def test_chunked_ranks_equal_full_matrix_argsort(chunk: int, block: int) -> None:
    rng = np.random.default_rng(chunk)
    q, g = rng.standard_normal((23, 6), dtype=np.float32), rng.standard_normal((31, 6), dtype=np.float32)
    pq = np.repeat(np.arange(23), 2)
    pg = rng.integers(0, 31, len(pq))
    got = positive_ranks(q, g, pq, pg, gallery_chunk=chunk, query_block=block, tie_atol=0.0)
    scores = q.astype(np.float64) @ g.T.astype(np.float64)
    correct = np.zeros_like(scores, bool)
    correct[pq, pg] = True
    order = np.argsort(-scores, axis=1)  # no ties in continuous data: index order is irrelevant
    want = np.argmax(np.take_along_axis(correct, order, 1), axis=1) + 1
    want -= np.array([np.take_along_axis(correct, order, 1)[i, :want[i] - 1].sum() for i in range(23)])
    np.testing.assert_array_equal(got, want)


def test_exact_retrieval_metrics_hand_case() -> None:
    m = retrieval_metrics_exact(CAPTIONS, IMAGES, OWNER, recall_k=(1, 2))
    assert m["image_retrieval_recall@1"] == 0.25 and m["image_retrieval_recall@2"] == 1.0
    assert m["image_retrieval_mean_rank"] == pytest.approx(7 / 4) and m["image_retrieval_median_rank"] == 2.0
    # Image queries: images 0 and 1 are identical, and caption 2 (image 1's) equals image 0 exactly,
    # while captions 0, 1 (image 0's) are not: image 0 ranks caption 2 (wrong) first -> rank 2.
    # Image 1 finds caption 2 at rank 1; image 2 finds caption 3 at rank 1.
    assert m["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert m["text_retrieval_mean_rank"] == pytest.approx(4 / 3) and m["text_retrieval_median_rank"] == 1.0


def test_topk_recall_honest_under_ties_matches_exact_ranks() -> None:
    # FAISS breaks the image-0/image-1 tie by index; with scores the top-k recall follows the tie rule.
    k_lists = 3
    s_t2i, t2i = topk_inner_product(CAPTIONS, IMAGES, k_lists, use_gpu=False)
    s_i2t, i2t = topk_inner_product(IMAGES, CAPTIONS, k_lists + 1, use_gpu=False)
    honest = retrieval_metrics(t2i, i2t, OWNER, recall_k=(1, 2), text_to_image_scores=s_t2i,
                               image_to_text_scores=s_i2t)
    exact = retrieval_metrics_exact(CAPTIONS, IMAGES, OWNER, recall_k=(1, 2))
    assert honest == {key: value for key, value in exact.items() if "recall" in key}


def test_topk_recall_does_not_depend_on_the_order_of_tied_ids() -> None:
    # One caption query whose own image (id 0) ties with a wrong one (id 1): both list orders score alike.
    scores = np.array([[0.7, 0.7, 0.1]])
    firsts = [retrieval_metrics(np.array([ids]), np.array([[0], [0], [0]]), np.array([0]), recall_k=(1, 2),
                                text_to_image_scores=scores, image_to_text_scores=np.ones((3, 1)))
              for ids in ([0, 1, 2], [1, 0, 2])]
    assert firsts[0] == firsts[1] and firsts[0]["image_retrieval_recall@1"] == 0.0
    by_order = retrieval_metrics(np.array([[0, 1, 2]]), np.array([[0], [0], [0]]), np.array([0]), recall_k=(1,))
    assert by_order["image_retrieval_recall@1"] == 1.0  # without scores the list order decides


def test_ranks_from_topk_marks_missing_correct_item_beyond_the_list() -> None:
    scores = np.array([[0.9, 0.8, 0.8], [0.9, 0.8, 0.7]])
    correct = np.array([[False, False, True], [False, False, False]])
    assert ranks_from_topk(scores, correct).tolist() == [3, 4]


def test_rank_metrics_names_and_values() -> None:
    m = rank_metrics(np.array([1, 2, 3, 10]), "image_retrieval", (1, 5))
    assert m == {"image_retrieval_recall@1": 0.25, "image_retrieval_recall@5": 0.75,
                 "image_retrieval_mean_rank": 4.0, "image_retrieval_median_rank": 2.5}


def test_exact_metrics_equal_clip_benchmark_recall_on_tie_free_data() -> None:
    rng = np.random.default_rng(4)
    image = rng.standard_normal((50, 8)).astype(np.float32)
    owner = np.repeat(np.arange(50), rng.integers(1, 5, 50))
    text = (image[owner] + 1.5 * rng.standard_normal((len(owner), 8))).astype(np.float32)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    exact = retrieval_metrics_exact(text, image, owner)
    _, t2i = topk_inner_product(text, image, 10, use_gpu=False)
    _, i2t = topk_inner_product(image, text, 10, use_gpu=False)
    assert {k: v for k, v in exact.items() if "recall" in k} == pytest.approx(retrieval_metrics(t2i, i2t, owner))
    scores = text.astype(np.float64) @ image.T.astype(np.float64)
    own = scores[np.arange(len(owner)), owner]
    ranks = 1 + (scores > own[:, None]).sum(1)
    assert exact["image_retrieval_mean_rank"] == pytest.approx(ranks.mean())
    assert exact["image_retrieval_median_rank"] == pytest.approx(np.median(ranks))
