"""Exact top-k inner-product search over a gallery of any size, with FAISS.

The gallery is indexed in chunks (one `IndexFlatIP` each) and every chunk's top-k is
merged into one running heap, so peak memory is one chunk plus the [Q, k] results no
matter how large the gallery is.
"""

from __future__ import annotations

import functools

import faiss
import numpy as np

from clipkit.errors import ClipkitConfigError


def gpu_faiss_available() -> bool:
    """True when this FAISS build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@functools.lru_cache(maxsize=1)
def _gpu_resources() -> faiss.StandardGpuResources:
    # One per process: each instance reserves a scratch pool on the device.
    return faiss.StandardGpuResources()


def _flat_ip_index(dim: int, use_gpu: bool) -> faiss.Index:
    return faiss.GpuIndexFlatIP(_gpu_resources(), dim) if use_gpu else faiss.IndexFlatIP(dim)


def topk_inner_product(
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int,
    *,
    gallery_chunk: int = 262144,
    use_gpu: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of `queries @ gallery.T` per query row.

    Args:
        queries: [Q, D] float32.
        gallery: [N, D] float32.
        k: results per query; clipped to N.
        gallery_chunk: gallery rows per FAISS index; bounds memory for any N.
        use_gpu: None = faiss-gpu when available, True = require it, False = CPU.

    Returns:
        scores [Q, min(k, N)] float32 and indices [Q, min(k, N)] int64 (rows of
        `gallery`), each row sorted by descending score.
    """
    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"expected [Q, D] and [N, D], got {queries.shape} and {gallery.shape}")
    if k < 1 or gallery_chunk < 1:
        raise ValueError(f"k and gallery_chunk must be >= 1, got {k} and {gallery_chunk}")
    if use_gpu and not gpu_faiss_available():
        raise ClipkitConfigError("use_gpu=True but faiss has no GPU support here; install faiss-gpu or set it to false")
    gpu = gpu_faiss_available() if use_gpu is None else use_gpu
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    n, dim = gallery.shape
    k = min(k, n)
    if k == 0:
        return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)

    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for start in range(0, n, gallery_chunk):
        chunk = np.ascontiguousarray(gallery[start:start + gallery_chunk], dtype=np.float32)
        index = _flat_ip_index(dim, gpu)
        index.add(chunk)
        scores, ids = index.search(queries, min(k, len(chunk)))
        heap.add_result(scores, ids + start)  # chunk-local ids -> gallery row ids
        del index  # frees the chunk's copy (GPU memory included) before the next one
    heap.finalize()  # heap order -> sorted, best first
    return heap.D, heap.I
