"""CLIP_benchmark's zero-shot classification and retrieval metrics, with a tie rule.

Metric names and definitions follow CLIP_benchmark, so clipkit's numbers are directly
comparable with its published tables. Nothing here builds a full [queries, gallery]
score matrix: metrics come from top-k arrays (`clipkit.eval.search`) or from ranks
counted chunk by chunk (`positive_ranks`), for classification (the true class among the
class embeddings) as for retrieval.

Rank and ties. The rank of a query is the 1-based rank of its best-scoring correct
item (for text retrieval: the best of the image's captions). Ties count against the
query ("pessimistic" rank): every wrong item whose score is >= the correct item's
score minus TIE_ATOL is ranked ahead of it,

    rank = 1 + #{wrong items j : s_j >= s_correct - TIE_ATOL}.

So a correct item tied with k wrong ones has rank k + 1 whatever their index order,
and recall@k = mean(rank <= k). TIE_ATOL (1e-6) absorbs float32 summation-order noise
(BLAS and FAISS may sum a dot product in a different order than another kernel), so
bit-identical embeddings are ties no matter which kernel scored them. CLIP_benchmark
and open_clip break ties by index order instead, which favours whichever item happens
to come first in the set; on tie-free data the two agree exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from clipkit.eval.certified_ranks import certified_ranks, certified_ranks_available

TIE_ATOL = 1e-6
RANK_METHODS = ("auto", "certified", "float32")


def classification_metrics(ranks: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """`acc1`, `acc5` and `mean_per_class_recall` from each image's rank of its true class.

    Args:
        ranks: [N] int, the pessimistic rank (module docstring) of the true class among the
            C class scores: a class tied with the true one counts as ahead of it, so a tie
            at the top is a miss whatever the class order. `positive_ranks` gives them.
        labels: [N] int, true class ids in [0, num_classes).
        num_classes: C, the number of candidate classes.

    Returns:
        `acc1` = mean(rank == 1), `acc5` = mean(rank <= 5), NaN when C < 5 (top-5 would be
        trivially 1), as in CLIP_benchmark. `mean_per_class_recall` is top-1 recall averaged
        over the classes that occur in `labels` (sklearn's balanced accuracy), which differs
        from `acc1` when classes are imbalanced.
    """
    ranks, labels = np.asarray(ranks), np.asarray(labels)
    if ranks.ndim != 1 or len(ranks) != len(labels) or len(labels) == 0:
        raise ValueError(f"expected [N] ranks and [N] labels with N > 0, got {ranks.shape} and {labels.shape}")
    if ranks.min() < 1 or ranks.max() > num_classes:
        raise ValueError(f"class ranks must lie in [1, {num_classes}], got [{ranks.min()}, {ranks.max()}]")
    hit1 = ranks == 1
    acc5 = float(np.mean(ranks <= 5)) if num_classes >= 5 else float("nan")
    per_class = [np.mean(hit1[labels == c]) for c in np.unique(labels)]
    return {"acc1": float(np.mean(hit1)), "acc5": acc5, "mean_per_class_recall": float(np.mean(per_class))}


def retrieval_metrics(
    text_to_image: np.ndarray,
    image_to_text: np.ndarray,
    text_image_index: np.ndarray,
    recall_k: Sequence[int] = (1, 5, 10),
    *,
    text_to_image_scores: np.ndarray | None = None,
    image_to_text_scores: np.ndarray | None = None,
    tie_atol: float = TIE_ATOL,
) -> dict[str, float]:
    """Image- and text-retrieval recall@k with multi-caption images, from top-k lists.

    Args:
        text_to_image: [M, K] int, image ids per caption query, best first (-1: none).
        image_to_text: [N, K'] int, caption ids per image query, best first (-1: none).
        text_image_index: [M] int, the image each caption belongs to.
        recall_k: the k values to report; K >= min(max k, N) and
            K' >= min(max k + most captions per image - 1, M) keep recall exact.
        text_to_image_scores, image_to_text_scores: the lists' scores. Given, ties follow
            the module's rule (a hit at k needs fewer than k wrong items scoring within
            tie_atol of the best correct one); None takes the lists' order as the ranking.

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
    image_hit = text_to_image == text_image_index[:, None]  # [M, K]: own image at that rank
    owner = np.append(text_image_index, -1)  # id -1 (FAISS "not found") owns nothing
    caption_hit = owner[image_to_text] == np.arange(n_image)[:, None]  # [N, K']: own caption at that rank
    has_caption = np.bincount(text_image_index, minlength=n_image) > 0
    image_ranks = _list_ranks(image_hit, text_to_image, text_to_image_scores, tie_atol)
    text_ranks = _list_ranks(caption_hit, image_to_text, image_to_text_scores, tie_atol)[has_caption]
    out: dict[str, float] = {}
    for k in recall_k:
        out[f"image_retrieval_recall@{k}"] = float(np.mean(image_ranks <= k))
        out[f"text_retrieval_recall@{k}"] = float(np.mean(text_ranks <= k))
    return out


def _list_ranks(hit: np.ndarray, ids: np.ndarray, scores: np.ndarray | None, tie_atol: float) -> np.ndarray:
    if scores is None:  # list order is the ranking: rank of the first hit, K + 1 without one
        return np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, hit.shape[1] + 1)
    return ranks_from_topk(np.where(ids >= 0, scores, -np.inf), hit, tie_atol=tie_atol)


def positive_ranks(
    queries: np.ndarray,
    gallery: np.ndarray,
    pair_query: np.ndarray,
    pair_gallery: np.ndarray,
    *,
    tie_atol: float = TIE_ATOL,
    gallery_chunk: int = 16384,
    query_block: int = 4096,
) -> np.ndarray:
    """Exact pessimistic rank (module docstring) of each query's best correct item.

    Scores are `queries @ gallery.T` in float32, computed [query_block, gallery_chunk]
    at a time, so memory is bounded for any sizes; every score is compared once.

    Args:
        queries: [Q, D] float32. gallery: [N, D] float32.
        pair_query, pair_gallery: [P] int, the correct (query, gallery row) pairs.
        tie_atol: wrong items within this of the correct score count as ahead.

    Returns:
        [Q] int64 ranks in [1, N]; 0 for a query with no correct item.
    """
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    g = torch.from_numpy(np.ascontiguousarray(gallery, dtype=np.float32))
    # A pair listed twice is still one correct item (it is taken back out of the count once).
    pairs = np.unique(np.stack([np.asarray(pair_query, np.int64), np.asarray(pair_gallery, np.int64)], 1), axis=0)
    pair_query, pair_gallery = pairs[:, 0], pairs[:, 1]
    n_q = len(q)
    # Best correct score in float64; the tolerance covers its difference from the GEMM's float32.
    pair_scores = np.einsum("pd,pd->p", queries[pair_query].astype(np.float64), gallery[pair_gallery].astype(np.float64))
    best = np.full(n_q, -np.inf)
    np.maximum.at(best, pair_query, pair_scores)
    threshold = torch.from_numpy((best - tie_atol).astype(np.float32))
    ahead = torch.zeros(n_q, dtype=torch.long)  # items (correct ones included) scoring >= threshold
    # Pairs grouped by gallery chunk, then by query, so each block finds its pairs by bisection.
    order = np.lexsort((pair_query, pair_gallery // gallery_chunk))
    pq, pg = pair_query[order], pair_gallery[order]
    chunk_bounds = np.searchsorted(pg // gallery_chunk, np.arange(0, (len(g) - 1) // gallery_chunk + 2))
    for c, start in enumerate(range(0, len(g), gallery_chunk)):
        gc = g[start:start + gallery_chunk]
        cq, cg = pq[chunk_bounds[c]:chunk_bounds[c + 1]], pg[chunk_bounds[c]:chunk_bounds[c + 1]]
        for qs in range(0, n_q, query_block):
            scores = q[qs:qs + query_block] @ gc.T  # [b, c]
            thr = threshold[qs:qs + query_block]
            ahead[qs:qs + query_block] += (scores >= thr[:, None]).sum(1)
            lo, hi = np.searchsorted(cq, [qs, qs + query_block])
            if hi > lo:  # correct items are not "ahead" of themselves: take them back out
                bq, bg = torch.from_numpy(cq[lo:hi] - qs), torch.from_numpy(cg[lo:hi] - start)
                hit = (scores[bq, bg] >= thr[bq]).long()
                ahead.index_add_(0, bq + qs, -hit)
    ranks = ahead.numpy() + 1
    ranks[np.isneginf(best)] = 0
    return ranks


def exact_ranks(
    queries: np.ndarray,
    gallery: np.ndarray,
    pair_query: np.ndarray,
    pair_gallery: np.ndarray,
    *,
    tie_atol: float = TIE_ATOL,
    method: str = "auto",
) -> np.ndarray:
    """[Q] int64 pessimistic ranks of each query's best correct item (as `positive_ranks`), by `method`.

    "certified" (`clipkit.eval.certified_ranks`): the int8 GEMM filters and float64 decides what
    it cannot, ~4x less work than the float32 count, and queries without a correct item cost
    nothing. "float32": `positive_ranks`, every pair in a float32 GEMM. "auto" is certified
    where torch has a working CPU int8 GEMM, else float32. The two agree except for a wrong item
    within float32 summation noise of the tie threshold, which certified decides in float64.
    """
    if method not in RANK_METHODS:
        raise ValueError(f"rank method {method!r}: choose from {list(RANK_METHODS)}")
    dim = np.shape(gallery)[1]
    if method != "float32" and certified_ranks_available(dim):
        return certified_ranks(queries, gallery, pair_query, pair_gallery, tie_atol=tie_atol)
    if method == "certified":
        raise ValueError(f"certified ranks need torch's CPU int8 GEMM and D <= 133144 (D={dim}); use float32")
    return positive_ranks(queries, gallery, pair_query, pair_gallery, tie_atol=tie_atol)


def ranks_from_topk(top_scores: np.ndarray, is_correct: np.ndarray, *, tie_atol: float = TIE_ATOL) -> np.ndarray:
    """Pessimistic rank from a top-K list: 1 + wrong items in the list within tie_atol of the best correct one.

    Args:
        top_scores: [Q, K] float, best first (ids of -1, FAISS's "not found", must be
            marked not correct and given -inf).
        is_correct: [Q, K] bool.

    Returns:
        [Q] int64; K + 1 ("beyond the list") when the list holds no correct item. For an
        exact list with K >= k + (most correct items of any query) - 1, rank <= k is
        exactly the rule of `positive_ranks`: any wrong item cut off the list scores no
        higher than K - (correct ones) >= k wrong items that are in it.
    """
    best = np.where(is_correct, top_scores, -np.inf).max(axis=1) if top_scores.shape[1] else np.full(len(top_scores), -np.inf)
    ahead = ((top_scores >= (best - tie_atol)[:, None]) & ~is_correct).sum(axis=1)
    return np.where(np.isneginf(best), top_scores.shape[1] + 1, ahead + 1).astype(np.int64)


def rank_metrics(ranks: np.ndarray, prefix: str, recall_k: Sequence[int], *, with_rank_stats: bool = True) -> dict[str, float]:
    """`{prefix}_recall@k` = mean(rank <= k), plus `{prefix}_mean_rank` and `{prefix}_median_rank`.

    Args:
        ranks: [Q] int, 1-based (queries without a correct item already left out).
        with_rank_stats: False when ranks past the top-K list are unknown (K + 1 sentinels).
    """
    ranks = np.asarray(ranks)
    out = {f"{prefix}_recall@{k}": float(np.mean(ranks <= k)) for k in recall_k}
    if with_rank_stats:
        out[f"{prefix}_mean_rank"] = float(np.mean(ranks))
        out[f"{prefix}_median_rank"] = float(np.median(ranks))
    return out


def retrieval_metrics_exact(
    text_emb: np.ndarray,
    image_emb: np.ndarray,
    text_image_index: np.ndarray,
    recall_k: Sequence[int] = (1, 5, 10),
    *,
    tie_atol: float = TIE_ATOL,
    method: str = "auto",
) -> dict[str, float]:
    """Retrieval recall@k, mean rank and median rank in both directions, exact, with the tie rule.

    Args:
        text_emb: [M, D] float32 unit-norm captions. image_emb: [N, D] float32 unit-norm.
        text_image_index: [M] int, the image each caption belongs to.
        method: how ranks are counted (`exact_ranks`): auto, certified or float32.

    Returns:
        `image_retrieval_*`: every caption queries the images (its own is correct).
        `text_retrieval_*`: every image with at least one caption queries the captions;
        its best-ranked caption counts. Keys: `_recall@k`, `_mean_rank`, `_median_rank`.
    """
    text_image_index = np.asarray(text_image_index, np.int64)
    n_text, n_image = len(text_emb), len(image_emb)
    if n_text == 0 or n_image == 0 or len(text_image_index) != n_text:
        raise ValueError(f"expected M > 0 captions with owners and N > 0 images, got {text_emb.shape}, {image_emb.shape}")
    captions = np.arange(n_text)
    image_ranks = exact_ranks(text_emb, image_emb, captions, text_image_index, tie_atol=tie_atol, method=method)
    text_ranks = exact_ranks(image_emb, text_emb, text_image_index, captions, tie_atol=tie_atol, method=method)
    has_caption = np.bincount(text_image_index, minlength=n_image) > 0
    return {**rank_metrics(image_ranks, "image_retrieval", recall_k),
            **rank_metrics(text_ranks[has_caption], "text_retrieval", recall_k)}


def selection_groups(text_image_index: np.ndarray, n_images: int) -> tuple[np.ndarray, np.ndarray]:
    """(is_true [M] bool, group [M] int) of a selection set's texts, checked.

    A selection set lists each image's texts together, the true caption first and its hard
    negatives after it (CLIP_benchmark's image_caption_selection order); the gather keeps that
    order. Every image needs its true caption and at least one negative.
    """
    owners = np.asarray(text_image_index, np.int64)
    if len(owners) == 0 or np.any(np.diff(owners) < 0):
        raise ValueError("selection needs each image's texts together, in image order")
    is_true = np.r_[True, owners[1:] != owners[:-1]]
    counts = np.bincount(owners, minlength=n_images)
    if len(counts) != n_images or counts.min() < 2:
        raise ValueError(f"selection needs a true caption and >= 1 negative for each of the {n_images} images; "
                         f"texts per image range over [{counts.min()}, {counts.max()}]")
    return is_true, np.cumsum(is_true) - 1


def selection_metrics(own_scores: np.ndarray, text_image_index: np.ndarray, n_images: int, *,
                      tie_atol: float = TIE_ATOL) -> dict[str, float]:
    """Image-caption selection accuracy (SugarCrepe, CLIP_benchmark's `image_caption_selection`).

    Args:
        own_scores: [M] float, each text's score against its own image (cosine of the
            unit-norm embeddings, or a late-interaction score).
        text_image_index: [M] int, the image of each text; each image's texts together, its
            true caption first, then its negatives (`selection_groups`).
        n_images: N.
        tie_atol: a negative scoring >= the true caption's score minus this counts as ahead.

    Returns:
        `acc`: the share of images whose true caption scores strictly highest, with the module's
        pessimistic tie rule: a negative tied with the true caption (within tie_atol) makes the
        image a miss. CLIP_benchmark takes `argmax`, which gives ties to the true caption (index
        0); on tie-free scores the two agree.
    """
    is_true, group = selection_groups(text_image_index, n_images)
    scores = np.asarray(own_scores, np.float64)
    true_score = scores[is_true]                                   # [N]
    ahead = ~is_true & (scores >= true_score[group] - tie_atol)    # [M]
    ranks = 1 + np.bincount(group, weights=ahead, minlength=n_images)
    return {"acc": float(np.mean(ranks == 1))}


def pooled_own_scores(image_emb: np.ndarray, text_emb: np.ndarray, text_image_index: np.ndarray) -> np.ndarray:
    """[M] float64 cosine of each text with its own image: image_emb [N, D], text_emb [M, D] unit-norm.

    float64 sums, so the score of a text does not depend on which kernel or batch computed it."""
    owners = np.asarray(text_image_index, np.int64)
    return np.einsum("md,md->m", text_emb.astype(np.float64), image_emb[owners].astype(np.float64))


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) of two embeddings of the same n items, [n, d1] and [n, d2]:
    ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) with Xc, Yc centred over the items; in float64.
    1 for embeddings equal up to rotation and isotropic scale, near 0 for unrelated ones."""
    x = x.double() - x.double().mean(dim=0)
    y = y.double() - y.double().mean(dim=0)
    cross = (y.T @ x).square().sum()
    return float(cross / ((x.T @ x).square().sum().sqrt() * (y.T @ y).square().sum().sqrt()))
