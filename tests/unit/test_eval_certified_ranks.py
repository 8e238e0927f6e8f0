"""Ranks from the certified int8 filter equal the float32 count (`positive_ranks`) item for item,
and the float64 rule exactly, on random and adversarial embeddings: near ties, exact duplicates,
scores a few float32 ulps either side of the tie threshold, several captions per image,
classification. Small tiles make every path (sparse, rescored, dense fallback) run."""

import numpy as np
import pytest
import torch

from clipkit.eval.certified import int8_matmul_available
from clipkit.eval.certified_ranks import certified_ranks
from clipkit.eval.embed import EmbeddedSet
from clipkit.eval.metrics import TIE_ATOL, exact_ranks, positive_ranks, retrieval_metrics_exact
from clipkit.eval.runner import SearchConfig, evaluate_embedded

pytestmark = pytest.mark.skipif(not int8_matmul_available(), reason="torch has no CPU int8 GEMM here")

SMALL = dict(gallery_block=64, query_block=16)
TILINGS = [SMALL, dict(SMALL, dense_fraction=0.0), dict(SMALL, dense_fraction=1.0), {}]


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _float64_ranks(q, g, pq, pg, tie_atol=TIE_ATOL) -> np.ndarray:
    """The rule in float64: 1 + #{wrong j : float32(q.g_j) >= float32(best - tie_atol)}."""
    s = q.astype(np.float64) @ g.astype(np.float64).T
    best = np.full(len(q), -np.inf)
    np.maximum.at(best, pq, s[pq, pg])
    counted = s.astype(np.float32) >= (best - tie_atol).astype(np.float32)[:, None]
    counted[pq, pg] = False
    return np.where(np.isneginf(best), 0, counted.sum(1) + 1)


def _check(q, g, pq, pg, *, tie_atol=TIE_ATOL, float32_too=True) -> dict:
    """certified == the float64 rule for every tiling; == the float32 count too where asked.

    With tie_atol = 0 the float32 count decides near-equal scores by its own rounding (a GEMM's
    summation order), so it is compared with the float64 rule only at the default tolerance,
    which exists to absorb that noise."""
    want = _float64_ranks(q, g, pq, pg, tie_atol)
    if float32_too and tie_atol > 0:
        np.testing.assert_array_equal(positive_ranks(q, g, pq, pg, tie_atol=tie_atol), want)
    paths: dict = {}
    for tiling in TILINGS:
        stats: dict = {}
        got = certified_ranks(q, g, pq, pg, tie_atol=tie_atol, stats=stats, **tiling)
        np.testing.assert_array_equal(got, want, err_msg=str(tiling))
        assert got.dtype == np.int64
        for key, value in stats.items():
            paths[key] = paths.get(key, 0) + value
    return paths


def _planted(rng, n_query: int, n_gallery: int, dim: int, low: float, high: float):
    """Queries that score their own gallery row by ~U(low, high) over noise: ranks from 1 to the bulk."""
    g = _unit(rng.standard_normal((n_gallery, dim)))
    owner = rng.integers(0, n_gallery, n_query)
    a = rng.uniform(low, high, n_query)[:, None]
    q = _unit(a * g[owner] + np.sqrt(1 - a ** 2) * _unit(rng.standard_normal((n_query, dim))))
    return q, g, owner


@pytest.mark.parametrize("dim", [32, 100])
def test_random_and_planted_ranks_equal_the_float32_count(dim: int) -> None:
    rng = np.random.default_rng(dim)
    for low, high in [(0.0, 0.05), (0.2, 0.9)]:   # ranks in the bulk (crowded tiles) and near the top
        q, g, owner = _planted(rng, 70, 600, dim, low, high)
        paths = _check(q, g, np.arange(70), owner)
        _check(q, g, np.arange(70), owner, tie_atol=0.0)
        if low == 0.0:   # every path ran: refined by the second int8 level, then sparse or dense
            assert paths["refined_tiles"] > 0 and paths["dense_tiles"] > 0 and paths["sparse_tiles"] > 0


def test_sparse_path_rescores_few_pairs_on_planted_data() -> None:
    q, g, owner = _planted(np.random.default_rng(3), 64, 2048, 256, 0.3, 0.9)
    stats: dict = {}
    certified_ranks(q, g, np.arange(64), owner, stats=stats, **SMALL)
    assert stats["sparse_tiles"] > 0 and stats["rescored_pairs"] < 0.1 * 64 * 2048


def test_near_ties_within_the_tolerance_and_exact_duplicates() -> None:
    rng = np.random.default_rng(1)
    base = _unit(rng.standard_normal((30, 48)))
    # Copies of each row nudged by 1-3 float32 ulps in a few coordinates: scores ~1e-8 apart, far
    # inside both the int8 bound and the 1e-6 tolerance; plus exact duplicates, spread over tiles.
    nudged = base.copy()
    cols = rng.integers(0, 48, (30, 3))
    for r in range(30):
        for c in cols[r]:
            nudged[r, c] = np.nextafter(np.nextafter(nudged[r, c], np.float32(2)), np.float32(2))
    gallery = np.concatenate([base, nudged, base[::-1], _unit(rng.standard_normal((100, 48))), base])
    queries = base[:20] + 0  # each query is one of the rows: its own copies tie with it
    _check(queries, gallery, np.arange(20), np.arange(20))
    _check(queries, gallery, np.arange(20), np.arange(20), tie_atol=0.0)


def test_scores_a_few_ulps_either_side_of_the_threshold_follow_the_float64_rule() -> None:
    rng = np.random.default_rng(2)
    q = _unit(rng.standard_normal((8, 64)))
    g = _unit(rng.standard_normal((300, 64)))
    own = g[:8].copy()
    # Wrong rows shifted along the query so their score is best - 1e-6 + k * 3e-8, k in -4..4:
    # straddling the threshold, where only an exact decision is reproducible.
    rows = [own[i] + (k * 3e-8 - TIE_ATOL) * q[i] / float(q[i] @ q[i]) for i in range(8) for k in range(-4, 5)]
    gallery = np.concatenate([g, np.asarray(rows, np.float32)])
    _check(q, gallery, np.arange(8), np.arange(8), float32_too=False)  # the float32 count may differ here


def test_several_captions_per_image_both_directions() -> None:
    rng = np.random.default_rng(4)
    images = _unit(rng.standard_normal((50, 40)))
    owners = np.repeat(np.arange(40), rng.integers(1, 5, 40))  # images 40..49 have no caption
    texts = _unit(0.4 * images[owners] + rng.standard_normal((len(owners), 40)) * 0.05)
    texts = np.concatenate([texts, texts[:7]])  # duplicated captions (same image)
    owners = np.concatenate([owners, owners[:7]])
    captions = np.arange(len(texts))
    _check(texts, images, captions, owners)      # caption -> images
    chunked = certified_ranks(texts, images, captions, owners, max_queries=7, **SMALL)   # queries in passes of 7
    np.testing.assert_array_equal(chunked, _float64_ranks(texts, images, captions, owners))
    _check(images, texts, owners, captions)      # image -> captions: best of its captions; 0 without
    assert (certified_ranks(images, texts, owners, captions)[40:] == 0).all()
    want = retrieval_metrics_exact(texts, images, owners, method="float32")
    assert retrieval_metrics_exact(texts, images, owners, method="certified") == want
    assert retrieval_metrics_exact(texts, images, owners) == want


def test_classification_true_class_among_c() -> None:
    rng = np.random.default_rng(5)
    classes = _unit(rng.standard_normal((10, 32)))
    classes = np.concatenate([classes, classes[:2]])  # two duplicate classes: ties with the true one
    labels = rng.integers(0, 12, 200)
    images = _unit(classes[labels] + 0.3 * rng.standard_normal((200, 32)))
    _check(images, classes, np.arange(200), labels)
    emb = EmbeddedSet(image_emb=torch.from_numpy(images), text_emb=torch.zeros(0, 32),
                      text_image_index=torch.zeros(0, dtype=torch.long), labels=torch.from_numpy(labels))
    clf = torch.from_numpy(classes)
    fast = evaluate_embedded(emb, tasks=["zeroshot_classification"], classifier=clf, search=SearchConfig())
    slow = evaluate_embedded(emb, tasks=["zeroshot_classification"], classifier=clf,
                             search=SearchConfig(ranks="float32"))
    assert fast == slow


def test_exact_ranks_methods_and_bad_input() -> None:
    rng = np.random.default_rng(6)
    q, g, owner = _planted(rng, 20, 100, 16, 0.3, 0.8)
    want = positive_ranks(q, g, np.arange(20), owner)
    for method in ("auto", "certified", "float32"):
        np.testing.assert_array_equal(exact_ranks(q, g, np.arange(20), owner, method=method), want)
    with pytest.raises(ValueError, match="rank method"):
        exact_ranks(q, g, [0], [0], method="int4")
    with pytest.raises(ValueError, match="queries"):
        certified_ranks(q[:, :8], g, [0], [0])
    assert certified_ranks(q, g, [], []).tolist() == [0] * 20
