"""Chunked FAISS top-k equals one IndexFlatIP and numpy brute force; the GPU path needs faiss-gpu."""

import faiss
import numpy as np
import pytest

from clipkit.errors import ClipkitConfigError
from clipkit.eval.search import gpu_faiss_available, topk_inner_product


def _data(q: int, n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((q, d), dtype=np.float32), rng.standard_normal((n, d), dtype=np.float32)


@pytest.mark.parametrize("chunk", [7, 64, 1000])  # many uneven chunks, a few, and one
def test_chunked_equals_single_index_and_bruteforce(chunk: int) -> None:
    queries, gallery = _data(40, 333, 16, seed=chunk)
    scores, ids = topk_inner_product(queries, gallery, 10, gallery_chunk=chunk, use_gpu=False, method="faiss")
    assert scores.shape == ids.shape == (40, 10) and scores.dtype == np.float32 and ids.dtype == np.int64

    index = faiss.IndexFlatIP(16)
    index.add(gallery)
    ref_scores, ref_ids = index.search(queries, 10)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-6)
    np.testing.assert_array_equal(ids, ref_ids)  # continuous random data: no ties

    full = queries.astype(np.float64) @ gallery.T.astype(np.float64)
    np_ids = np.argsort(-full, axis=1)[:, :10]
    np.testing.assert_array_equal(ids, np_ids)
    np.testing.assert_allclose(scores, np.take_along_axis(full, np_ids, 1), atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 0)


@pytest.mark.parametrize("method", ["faiss", "certified"])
def test_k_clipped_to_gallery_size(method: str) -> None:
    queries, gallery = _data(5, 6, 8, seed=1)
    scores, ids = topk_inner_product(queries, gallery, 50, gallery_chunk=4, use_gpu=False, method=method)
    assert scores.shape == ids.shape == (5, 6)
    np.testing.assert_array_equal(np.sort(ids, axis=1), np.tile(np.arange(6), (5, 1)))
    np.testing.assert_array_equal(ids, np.argsort(-(queries @ gallery.T), axis=1))


def test_chunk_smaller_than_k() -> None:
    # Every chunk holds fewer rows than k, so the heap must merge partial results.
    queries, gallery = _data(3, 20, 4, seed=2)
    _, ids = topk_inner_product(queries, gallery, 9, gallery_chunk=2, use_gpu=False, method="faiss")
    np.testing.assert_array_equal(ids, np.argsort(-(queries @ gallery.T), axis=1)[:, :9])


def test_rejects_mismatched_dims() -> None:
    with pytest.raises(ValueError):
        topk_inner_product(np.zeros((2, 3), np.float32), np.zeros((4, 5), np.float32), 1)


def test_gpu_path_is_never_taken_without_faiss_gpu() -> None:
    if gpu_faiss_available():
        pytest.skip("faiss-gpu and a GPU are present here")
    queries, gallery = _data(4, 50, 8, seed=3)
    with pytest.raises(ClipkitConfigError, match="install faiss-gpu"):
        topk_inner_product(queries, gallery, 3, use_gpu=True)
    # use_gpu=None (what evals pass) quietly means CPU here, with the CPU result.
    for method in ("auto", "faiss"):
        auto = topk_inner_product(queries, gallery, 3, method=method)
        np.testing.assert_array_equal(auto[1], topk_inner_product(queries, gallery, 3, use_gpu=False, method=method)[1])
