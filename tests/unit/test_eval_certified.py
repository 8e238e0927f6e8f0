"""The certified exact search (int8 filter + float64 rescoring) equals brute force bit for bit,
on easy data and on data built to break the filter: near-ties, duplicates, rows of any norm,
collapsed embeddings, zero rows. Small tiles make every path (seed, sparse, raised, dense) run."""

import faiss
import numpy as np
import pytest

from clipkit.eval.certified import MAX_DIM, certified_topk, int8_matmul_available, reference_topk
from clipkit.eval.search import topk_inner_product

pytestmark = pytest.mark.skipif(not int8_matmul_available(), reason="torch has no CPU int8 GEMM here")

SMALL = dict(gallery_block=64, query_block=16, seed_rows=32, crowded=4.0)  # many tiles on small data


def _unit(n: int, d: int, rng) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _check(queries, gallery, k, **kwargs) -> dict:
    stats: dict = {}
    scores, ids = certified_topk(queries, gallery, k, stats=stats, **kwargs)
    ref_scores, ref_ids = reference_topk(queries, gallery, k)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(scores, ref_scores)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    return stats


@pytest.mark.parametrize("k", [1, 5, 10])
def test_random_unit_rows_equal_brute_force_and_faiss(k: int) -> None:
    rng = np.random.default_rng(k)
    queries, gallery = _unit(50, 32, rng), _unit(2000, 32, rng)
    stats = _check(queries, gallery, k, **SMALL)
    assert stats["sparse_tiles"] > 0  # the filter ran, not only dense fallbacks
    assert stats["raised_tiles"] > 0 or k == 1  # with k = 1 the seed's best is already a tight floor
    assert stats["rescored_pairs"] < 0.2 * 50 * 2000
    index = faiss.IndexFlatIP(32)
    index.add(gallery)
    faiss_scores, faiss_ids = index.search(queries, k)
    np.testing.assert_array_equal(certified_topk(queries, gallery, k)[1], faiss_ids)  # default tiles
    np.testing.assert_allclose(certified_topk(queries, gallery, k)[0], faiss_scores, atol=1e-6)


def test_duplicates_and_exact_ties_go_to_the_lower_row_across_tiles() -> None:
    rng = np.random.default_rng(0)
    base = _unit(40, 16, rng)
    # Every base row appears 5 times, spread over the seed, several sparse blocks and one block twice.
    gallery = np.concatenate([base, base, base[::-1], base, base[:20], base[20:]])
    queries = np.concatenate([base[:10], _unit(10, 16, rng)])
    _check(queries, gallery, 7, **SMALL)


def test_near_ties_one_ulp_apart() -> None:
    rng = np.random.default_rng(1)
    g = _unit(1, 64, rng)[0]
    # Copies of one row nudged by one float32 ulp in a single coordinate, shuffled: scores differ
    # by ~1e-9, far inside the int8 bound, so only the float64 rescoring can order them.
    copies = np.repeat(g[None], 300, axis=0)
    for i in range(300):
        j = i % 64
        copies[i, j] = np.nextafter(copies[i, j], np.float32(np.inf) if i % 2 else np.float32(-np.inf))
    gallery = np.concatenate([_unit(500, 64, rng) * 0.5, copies[rng.permutation(300)]])
    queries = np.concatenate([g[None], copies[:5], _unit(4, 64, rng)])
    stats = _check(queries, gallery, 10, **SMALL)
    assert stats["rescored_pairs"] > 0


def test_rows_of_very_different_norms() -> None:
    rng = np.random.default_rng(2)
    gallery = _unit(1500, 24, rng) * np.exp(rng.uniform(-7, 7, (1500, 1))).astype(np.float32)
    queries = _unit(30, 24, rng) * np.exp(rng.uniform(-5, 5, (30, 1))).astype(np.float32)
    _check(queries, gallery, 10, **SMALL)


def test_collapsed_embeddings_fall_back_to_dense_tiles() -> None:
    rng = np.random.default_rng(3)
    centre = _unit(1, 32, rng)
    # Every score within ~1e-4 of every other: far below the int8 bound, so the filter keeps all.
    gallery = centre + 1e-4 * rng.standard_normal((600, 32), dtype=np.float32)
    queries = centre + 1e-4 * rng.standard_normal((20, 32), dtype=np.float32)
    stats = _check(queries, gallery, 5, **SMALL)
    assert stats["dense_tiles"] > stats["sparse_tiles"]


def test_zero_rows_small_k_edges_and_a_memmap(tmp_path) -> None:
    rng = np.random.default_rng(4)
    gallery = _unit(300, 8, rng)
    gallery[[5, 77, 250]] = 0.0
    queries = np.concatenate([np.zeros((1, 8), np.float32), _unit(6, 8, rng)])
    _check(queries, gallery, 300, **SMALL)  # k = N: the whole ranking, zero rows tied at 0
    path = tmp_path / "gallery.npy"
    np.save(path, gallery)
    _check(queries, np.load(path, mmap_mode="r"), 3, **SMALL)


def test_bad_input_is_refused() -> None:
    gallery = np.ones((10, 4), np.float32)
    with pytest.raises(ValueError, match="NaN or inf"):
        certified_topk(np.full((2, 4), np.nan, np.float32), gallery, 1)
    gallery[3, 1] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        certified_topk(np.ones((2, 4), np.float32), gallery, 1, seed_rows=1)
    with pytest.raises(ValueError, match="1 <= k <= N"):
        certified_topk(np.ones((2, 4), np.float32), gallery, 11)
    assert MAX_DIM * 127 ** 2 < 2 ** 31 <= (MAX_DIM + 1) * 127 ** 2


def test_topk_inner_product_methods_agree() -> None:
    rng = np.random.default_rng(5)
    queries, gallery = _unit(20, 16, rng), _unit(700, 16, rng)
    auto = topk_inner_product(queries, gallery, 8, use_gpu=False)
    np.testing.assert_array_equal(auto[1], reference_topk(queries, gallery, 8)[1])
    plain = topk_inner_product(queries, gallery, 8, use_gpu=False, method="faiss", gallery_chunk=100)
    np.testing.assert_array_equal(auto[1], plain[1])
    np.testing.assert_allclose(auto[0], plain[0], atol=1e-6)
    with pytest.raises(ValueError, match="method"):
        topk_inner_product(queries, gallery, 8, method="bf16")
