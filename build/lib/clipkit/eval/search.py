"""Exact top-k inner-product search over a gallery of any size, on CPU or with faiss-gpu.

Three exact kernels, one contract (`topk_inner_product`):
- CPU, `method="certified"` (the CPU default where torch's int8 GEMM works): an int8 GEMM
  filters with a proven error bound and float64 rescoring decides
  (`clipkit.eval.certified`); ties go to the lower gallery row.
- CPU, `method="faiss"`: `faiss.knn` (IndexFlatIP's float32 BLAS search) per gallery chunk,
  reading the gallery in place.
- GPU (faiss-gpu installed and a GPU visible, or `use_gpu=True`): one `GpuIndexFlatIP` per
  chunk. faiss-cpu has no GPU support, so this path is only taken when faiss-gpu is there.
Chunks' top-k are merged into one running heap, so memory beyond the gallery is bounded
(the [Q, k] results plus one tile) however large the gallery is.
"""

from __future__ import annotations

import contextlib
import functools

import faiss
import numpy as np

from clipkit.errors import ClipkitConfigError
from clipkit.eval.certified import certified_topk, int8_matmul_available

EXACT_METHODS = ("auto", "certified", "faiss")


def gpu_faiss_available() -> bool:
    """True when this FAISS build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@functools.lru_cache(maxsize=1)
def _gpu_resources() -> faiss.StandardGpuResources:
    # One per process: each instance reserves a scratch pool on the device.
    return faiss.StandardGpuResources()


# Gallery rows per BLAS call in faiss.knn (FAISS's default is 1024). 16384 ran 1.45x faster
# on a 2-core AVX-512 CPU (benchmarks/eval_bench.py); scratch is 4096 queries x 16384 x 4 B
# = 256 MiB.
KNN_DATABASE_BLOCK = 16384


@contextlib.contextmanager
def _knn_database_block(rows: int):
    old = faiss.cvar.distance_compute_blas_database_bs
    faiss.cvar.distance_compute_blas_database_bs = rows
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_database_bs = old


def _flat_ip_index(dim: int, use_gpu: bool) -> faiss.Index:
    return faiss.GpuIndexFlatIP(_gpu_resources(), dim) if use_gpu else faiss.IndexFlatIP(dim)


def topk_inner_product(
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int,
    *,
    gallery_chunk: int = 262144,
    use_gpu: bool | None = None,
    method: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of `queries @ gallery.T` per query row.

    Args:
        queries: [Q, D] float32.
        gallery: [N, D] float32.
        k: results per query; clipped to N.
        gallery_chunk: gallery rows per FAISS index; bounds memory for any N.
        use_gpu: None = faiss-gpu when available, True = require it, False = CPU.
        method: the CPU kernel (module docstring): "auto" is "certified" when torch's int8
            GEMM works here, else "faiss". "certified" never runs on GPU.

    Returns:
        scores [Q, min(k, N)] float32 and indices [Q, min(k, N)] int64 (rows of
        `gallery`), each row sorted by descending score.
    """
    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"expected [Q, D] and [N, D], got {queries.shape} and {gallery.shape}")
    if k < 1 or gallery_chunk < 1:
        raise ValueError(f"k and gallery_chunk must be >= 1, got {k} and {gallery_chunk}")
    if method not in EXACT_METHODS:
        raise ValueError(f"method={method!r}: choose from {EXACT_METHODS}")
    if use_gpu and not gpu_faiss_available():
        raise ClipkitConfigError("use_gpu=True but faiss has no GPU support here; install faiss-gpu or set it to false")
    if use_gpu and method == "certified":
        raise ValueError("method='certified' runs on CPU; pass use_gpu=False or method='auto'/'faiss'")
    gpu = (gpu_faiss_available() and method != "certified") if use_gpu is None else use_gpu
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    n, dim = gallery.shape
    k = min(k, n)
    if k == 0:
        return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
    if not gpu and (method == "certified" or (method == "auto" and int8_matmul_available())):
        return certified_topk(queries, gallery, k)

    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for start in range(0, n, gallery_chunk):
        # A view when the gallery is C-contiguous float32: no copy at all on CPU.
        chunk = np.ascontiguousarray(gallery[start:start + gallery_chunk], dtype=np.float32)
        if gpu:
            index = _flat_ip_index(dim, gpu)
            index.add(chunk)
            scores, ids = index.search(queries, min(k, len(chunk)))
            del index  # frees the chunk's device copy before the next one
        else:  # the flat index's BLAS search, minus the index's own copy of the chunk
            with _knn_database_block(KNN_DATABASE_BLOCK):
                scores, ids = faiss.knn(queries, chunk, min(k, len(chunk)), metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, ids + start)  # chunk-local ids -> gallery row ids
    heap.finalize()  # heap order -> sorted, best first
    return heap.D, heap.I


# Approximate search: opt-in, and always reported with its recall against exact search.
APPROX_INDEXES = ("ivf_flat", "hnsw", "ivf_pq")


def factory_string(index: str, n: int, dim: int) -> str:
    """FAISS `index_factory` string for a named index sized for an n-row gallery.

    Args:
        index: "flat", one of APPROX_INDEXES, or a raw factory string (e.g. "IVF256,PQ16").
        n: gallery rows; IVF lists (~4 sqrt(n), at most n // 39 so k-means has its 39
            points per centroid) and PQ bits (2^bits <= n) scale with it.
        dim: D.
    """
    nlist = max(1, min(int(4 * n ** 0.5), n // 39))
    if index == "flat":
        return "Flat"
    if index == "ivf_flat":
        return f"IVF{nlist},Flat"
    if index == "hnsw":
        return "HNSW32,Flat"
    if index == "ivf_pq":
        m = next(m for m in (dim // 8, dim // 4, dim // 2, dim) if m >= 1 and dim % m == 0)
        bits = max(1, min(8, int(np.log2(max(n, 2)))))
        return f"IVF{nlist},PQ{m}x{bits}"
    return index  # a raw factory string, passed through


def build_index(gallery: np.ndarray, index: str, *, train_sample: int = 262144, seed: int = 0) -> faiss.Index:
    """Trained and filled CPU index over gallery [N, D] float32, inner-product metric.

    Training uses at most `train_sample` rows, drawn with `seed`, so builds are repeatable.
    """
    n, dim = gallery.shape
    idx = faiss.index_factory(dim, factory_string(index, n, dim), faiss.METRIC_INNER_PRODUCT)
    if not idx.is_trained:
        rows = np.sort(np.random.default_rng(seed).choice(n, min(n, train_sample), replace=False))
        idx.train(np.ascontiguousarray(gallery[rows], dtype=np.float32))
    for start in range(0, n, 262144):  # add in chunks: no second full-size copy of the gallery
        idx.add(np.ascontiguousarray(gallery[start:start + 262144], dtype=np.float32))
    return idx


def set_search_params(idx: faiss.Index, *, nprobe: int, ef_search: int) -> None:
    """nprobe for IVF indexes, efSearch for HNSW; other indexes are left as they are."""
    ivf = faiss.try_extract_index_ivf(idx)
    if ivf is not None:
        ivf.nprobe = nprobe
    hnsw = getattr(faiss.downcast_index(idx), "hnsw", None)
    if hnsw is not None:
        hnsw.efSearch = max(ef_search, 1)


def approximate_topk(queries: np.ndarray, idx: faiss.Index, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k from a built index: scores [Q, k] float32 and ids [Q, k] int64 (-1 past the found)."""
    return idx.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, idx.ntotal))


def recall_vs_exact(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """Mean over queries of |approx top-k ∩ exact top-k| / k (ann-benchmarks' recall@k).

    Args:
        approx_ids, exact_ids: [Q, >= k] int, best first, for the same queries.
    """
    k = min(k, exact_ids.shape[1])
    a, e = approx_ids[:, :k], exact_ids[:, :k]
    found = (a[:, :, None] == e[:, None, :]).any(axis=2)  # [Q, k]: approx result is among the exact ones
    return float(found.sum() / (len(e) * k)) if len(e) else float("nan")
