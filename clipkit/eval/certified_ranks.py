"""Exact pessimistic ranks with the int8 filter of `clipkit.eval.certified`: the count of
`clipkit.eval.metrics.positive_ranks` at the cost of an int8 GEMM.

The rank of query q (module docstring of `clipkit.eval.metrics`) is

    rank = 1 + #{wrong items j : s_j >= T},   T = float32(best correct score - tie_atol),

so every pair is one comparison against a per-query threshold known before the scan (unlike the
top-k, whose k-th score rises as it goes). With the int8 GEMM's integer A and the bound E_q of
`clipkit.eval.certified` (|s - s_q s_g A| <= E_q, plus slack), a pair is

- surely counted when s_q s_g A >= T + E_q + slack (then s64 >= T, so float32(s64) >= T),
- surely not counted when s_q s_g A < P - E_q - slack, P the float32 just below T (then
  float32(s64) <= P < T),
- and rescored in float64 otherwise, then counted when float32(s64) >= T.

The correct items are masked out of the tile before the comparison (their int32 set to the
minimum), so only wrong items are counted. A tile where more than `dense_fraction` of the pairs
fall between the two bounds (the threshold sits in the bulk of the scores, e.g. an untrained
model) falls back to a float32 GEMM, today's full count, whose own error bound
gamma_D ||q|| ||g|| (Higham eq. 3.5, any summation order) decides all but a narrow band, which is
rescored in float64 the same way. Both paths therefore decide every pair by float32(s64) >= T.

`positive_ranks` decides by the float32 GEMM's own score instead, so the two differ only for a
wrong item whose score lies within float32 summation noise (~1e-7 for unit vectors at D = 512)
of T itself: there the float32 count depends on the BLAS kernel, and this one does not.
Queries without a correct item are not scanned at all (rank 0), so text retrieval over a
gallery where few images have captions costs only those images.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from clipkit.eval.certified import (
    MAX_DIM,
    SLACK,
    _as_tensor,
    _Block,
    _Queries,
    int8_matmul_available,
)

INT32_MIN = -2 ** 31
LOWEST = INT32_MIN + 1  # bounds are clipped above the mask value, so a masked pair is never kept


def certified_ranks_available(dim: int) -> bool:
    """True when the int8 path can run for D = dim here (torch's CPU int8 GEMM, D <= MAX_DIM)."""
    return dim <= MAX_DIM and int8_matmul_available()


def _unique_pairs(pair_query: np.ndarray, pair_gallery: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pairs = np.unique(np.stack([np.asarray(pair_query, np.int64), np.asarray(pair_gallery, np.int64)], 1), axis=0)
    return pairs[:, 0], pairs[:, 1]


def _int_bounds(threshold: np.ndarray, below: np.ndarray, err: np.ndarray, unit: np.ndarray,
                slack: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """[qb] int32 (hi, lo): A >= hi is surely counted, A < lo surely not (module docstring)."""
    hi = np.ceil((threshold + err + slack) / unit)
    lo = np.floor((below - err - slack) / unit)
    clip = (LOWEST, 2.0 ** 31 - 1)
    return (torch.from_numpy(np.clip(hi, *clip).astype(np.int32)),
            torch.from_numpy(np.clip(lo, *clip).astype(np.int32)))


def certified_ranks(
    queries: np.ndarray,
    gallery: np.ndarray,
    pair_query: np.ndarray,
    pair_gallery: np.ndarray,
    *,
    tie_atol: float = 1e-6,
    gallery_block: int = 16384,
    query_block: int = 4096,
    dense_fraction: float = 0.05,
    stats: dict[str, int] | None = None,
) -> np.ndarray:
    """Exact pessimistic rank of each query's best correct item (module docstring), on CPU.

    Args:
        queries: [Q, D] float32. gallery: [N, D] float32, read block by block (a memmap works).
        pair_query, pair_gallery: [P] int, the correct (query, gallery row) pairs.
        tie_atol: wrong items scoring >= best correct - tie_atol count as ahead.
        gallery_block, query_block: the int8 GEMM's tile (its int32 output is the main memory
            beyond the inputs: 256 MiB at the defaults).
        dense_fraction: a tile with more undecided pairs than this share is counted by a
            float32 GEMM (plus float64 for its narrow undecided band) instead.
        stats: if given, receives counts of rescored pairs, sparse and dense tiles.

    Returns:
        [Q] int64 ranks in [1, N]; 0 for a query with no correct item. Equal to
        `positive_ranks` except where a wrong score lies within float32 noise of the threshold.
    """
    n, dim = gallery.shape
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ValueError(f"expected [Q, {dim}] queries, got {queries.shape}")
    if dim > MAX_DIM:
        raise ValueError(f"D={dim} > {MAX_DIM} would overflow the int32 accumulation")
    n_all = len(queries)
    pair_query, pair_gallery = _unique_pairs(pair_query, pair_gallery)
    ranks = np.zeros(n_all, np.int64)
    counts = {"rescored_pairs": 0, "sparse_tiles": 0, "dense_tiles": 0, "surely_counted": 0}
    if len(pair_query) == 0 or n == 0:
        if stats is not None:
            stats.update(counts)
        return ranks
    # Only queries with a correct item are scanned: local ids 0..Q'-1.
    active, local_query = np.unique(pair_query, return_inverse=True)
    q32 = _as_tensor(np.asarray(queries)[active])
    q = _Queries(q32)
    n_q = len(active)
    pair_scores = np.einsum("pd,pd->p", q.exact.numpy()[local_query],
                            np.asarray(gallery[pair_gallery], np.float64))
    best = np.full(n_q, -np.inf)
    np.maximum.at(best, local_query, pair_scores)
    t32 = (best - tie_atol).astype(np.float32)
    threshold = t32.astype(np.float64)                                   # T
    below = np.nextafter(t32, np.float32(-np.inf)).astype(np.float64)    # P, the float32 below T
    ahead = np.zeros(n_q, np.int64)
    # Pairs grouped by gallery block, then by query, so each tile finds its own by bisection.
    order = np.lexsort((local_query, pair_gallery // gallery_block))
    pq, pg = local_query[order], pair_gallery[order]
    block_bounds = np.searchsorted(pg // gallery_block, np.arange(0, (n - 1) // gallery_block + 2))
    tile_rows, tile_cols = min(query_block, n_q), min(gallery_block, n)
    approx_buffer = torch.empty(tile_rows * tile_cols, dtype=torch.int32)
    mask_buffers = [torch.empty(tile_rows * tile_cols, dtype=torch.bool) for _ in range(2)]
    exact_buffer = torch.empty(tile_cols * dim, dtype=torch.float64)
    for b, start in enumerate(range(0, n, gallery_block)):
        rows32 = _as_tensor(gallery[start:start + gallery_block])
        block = _Block(rows32, exact_buffer)
        bq_all, bg_all = pq[block_bounds[b]:block_bounds[b + 1]], pg[block_bounds[b]:block_bounds[b + 1]] - start
        for qs in range(0, n_q, query_block):
            rows = slice(qs, min(qs + query_block, n_q))
            lo_p, hi_p = np.searchsorted(bq_all, [qs, qs + query_block])
            own_q = torch.from_numpy(bq_all[lo_p:hi_p] - qs)
            own_g = torch.from_numpy(bg_all[lo_p:hi_p])
            size = (rows.stop - qs) * len(rows32)
            approx = torch._int_mm(q.values[rows], block.values_t,
                                   out=approx_buffer[:size].view(rows.stop - qs, len(rows32)))  # exact int32
            approx[own_q, own_g] = INT32_MIN  # correct items are never "ahead" of their query
            norm = q.norm[rows]
            err = norm * block.resid_max + q.resid[rows] * block.dequant_max
            unit = q.scale_np[rows] * block.scale
            slack = SLACK * (norm * (block.norm_max + block.dequant_max + block.resid_max) + np.abs(threshold[rows]))
            hi, lo = _int_bounds(threshold[rows], below[rows], err, unit, slack)
            sure = torch.ge(approx, hi[:, None], out=mask_buffers[0][:size].view(approx.shape))
            maybe = torch.ge(approx, lo[:, None], out=mask_buffers[1][:size].view(approx.shape))
            n_sure = _row_counts(sure)
            undecided = _row_counts(maybe).sum() - n_sure.sum()
            if undecided > dense_fraction * size:
                ahead[rows] += _dense_count(q32[rows], q.exact[rows], rows32, block, own_q, own_g,
                                            threshold[rows], below[rows], counts)
                counts["dense_tiles"] += 1
                continue
            counts["sparse_tiles"] += 1
            ahead[rows] += n_sure
            counts["surely_counted"] += int(n_sure.sum())
            if undecided:
                torch.logical_xor(maybe, sure, out=maybe)  # lo <= A < hi
                ahead[rows] += _rescored_count(maybe, q.exact[rows], block, threshold[rows], counts)
    ranks[active] = ahead + 1
    if stats is not None:
        stats.update(counts)
    return ranks


def _row_counts(mask: torch.Tensor) -> np.ndarray:
    """[qb] int64 True entries per row of a [qb, nb] bool mask; numpy on its bytes, ~40x faster
    here than torch's bool sum (which widens every entry to int64 first)."""
    return mask.numpy().view(np.uint8).sum(1, dtype=np.int32).astype(np.int64)  # a row < 2^31


def _rescored_count(undecided: torch.Tensor, q64: torch.Tensor, block: _Block, threshold: np.ndarray,
                    counts: dict[str, int]) -> np.ndarray:
    """[qb] int64: per query, the undecided pairs (mask [qb, nb]) with float32(s64) >= T.

    The pairs are rescored grouped by gallery row (a CSR pattern over the block's rows): each
    float64 gallery row is read once for all of its queries, which sit in cache, instead of once
    per pair: the gallery block does not fit in cache and is most of the memory traffic.
    """
    flat = np.flatnonzero(undecided.numpy())
    counts["rescored_pairs"] += len(flat)
    nb = undecided.shape[1]
    order = np.argsort(flat % nb, kind="stable")
    r, c = flat[order] // nb, flat[order] % nb
    crow = torch.zeros(nb + 1, dtype=torch.int64)
    crow[1:] = torch.from_numpy(np.bincount(c, minlength=nb)).cumsum(0)
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(crow, torch.from_numpy(r), torch.zeros(len(r), dtype=torch.float64),
                                          size=(nb, len(q64)))
        scores = torch.sparse.sampled_addmm(pattern, block.exact[:nb], q64.T, beta=0.0).values().float().numpy()
    return np.bincount(r, weights=scores >= threshold[r], minlength=len(q64)).astype(np.int64)


def _dense_count(q32: torch.Tensor, q64: torch.Tensor, rows32: torch.Tensor, block: _Block, own_q: torch.Tensor,
                 own_g: torch.Tensor, threshold: np.ndarray, below: np.ndarray,
                 counts: dict[str, int]) -> np.ndarray:
    """[qb] int64 wrong items with float32(s64) >= T, from a float32 GEMM of the tile: its error is at
    most gamma_D ||q|| max||g|| in any summation order, and only pairs within that of T are rescored."""
    dim = q32.shape[1]
    gamma = dim * 2.0 ** -24 / (1 - dim * 2.0 ** -24)
    norm = q64.norm(dim=1).numpy()
    band = gamma * norm * block.norm_max * (1 + 2.0 ** -20) + SLACK * (norm * block.norm_max + np.abs(threshold))
    s32 = q32 @ rows32.T  # [qb, nb]
    s32[own_q, own_g] = -np.inf
    up = torch.from_numpy((threshold + band).astype(np.float32))
    down = torch.from_numpy((below - band).astype(np.float32))
    # float32 rounding of the bounds: round outward so the band only grows.
    up = torch.nextafter(up, torch.tensor(np.inf, dtype=torch.float32))
    down = torch.nextafter(down, torch.tensor(-np.inf, dtype=torch.float32))
    sure = s32 > up[:, None]
    undecided = (s32 >= down[:, None]) & ~sure
    return _row_counts(sure) + _rescored_count(undecided, q64, block, threshold, counts)
