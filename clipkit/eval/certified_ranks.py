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
- and scored exactly otherwise (below), then counted when float32(s64) >= T.

The correct items are masked out of the tile before the comparison (their int32 set to the
minimum), so only wrong items are counted. The undecided pairs are scored in float32 (a sampled
GEMM grouped by gallery row), which decides all but those within float32's own error bound
gamma_D ||q|| ||g|| (Higham eq. 3.5, any summation order) of T; those are scored in float64.

Where the threshold sits in the bulk of the scores (a correct item ranked far down), the int8
bound (~0.015 for unit vectors at D = 512) leaves a large share of the tile undecided. Queries
are scanned in order of threshold, so such queries share tiles, and a crowded tile first adds a
second int8 level on the quantization residuals (`_FineQueries`: two more int8 GEMMs whose
integers add to the first's), which narrows the bound about 100-fold; only if that still leaves
more than `dense_fraction` undecided is the tile counted by a float32 GEMM (today's full count),
its narrow band again in float64. Every path decides every pair by float32(s64) >= T.

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
    INT8_MAX,
    MAX_DIM,
    SLACK,
    _as_tensor,
    _Block,
    _Queries,
    int8_matmul_available,
)

INT32_MIN = -2 ** 31
LOWEST = INT32_MIN + 1  # bounds are clipped above the mask value, so a masked pair is never kept
FINE = 128              # the second int8 level's scale is the first's / FINE: the levels add as integers
# 128 A1 + A2 + A3 stays in int32: (FINE + 2) 127^2 D < 2^31.
REFINE_MAX_DIM = (2 ** 31 - 1) // ((FINE + 2) * INT8_MAX ** 2)


class _FineQueries:
    """The queries' second int8 level: r_q = q - s_q q' = (s_q / FINE) q'' + r_q2.

    With the gallery's likewise (`_FineBlock`),
        q.g = (s_q s_g / FINE) (FINE A1 + q'.g'' + q''.g') + q^.r_g2 + r_q2.g^ + r_q.r_g,
    so the three int8 GEMMs add up as integers and the bound falls to
        ||q^|| R_g2 + ||r_q2|| G^ + ||r_q|| R_g,
    about FINE times smaller than the first level's ||q|| R_g + ||r_q|| G^.
    """

    def __init__(self, q: _Queries):
        hat = q.values.double() * q.scale[:, None]            # exact: float32 scale x small integer
        resid = q.exact - hat                                  # exact in float64 (Sterbenz-like: spans <= 53 bits)
        scale = (q.scale / FINE)[:, None]                      # a power of two apart: exact
        values = torch.round(resid / scale).clamp_(-INT8_MAX, INT8_MAX)
        self.values = values.to(torch.int8)
        grow = 1 + 2.0 ** -30                                  # float64 norms of D <= 2^20 terms
        self.hat_norm = hat.norm(dim=1).numpy() * grow
        self.resid = (resid - values * scale).norm(dim=1).numpy() * grow


class _FineBlock:
    """A gallery block's second int8 level (`_FineQueries`): g'' [D, n] and R_g2 >= max ||r_g2||.

    In float32, like the first level: r1 = fl(g - s_g g') (the block's kept residual) and
    r2 = fl(r1 - s_g2 g'') are each off by at most 2^-24 (|product| + |result|) per entry, so
    ||r_g2|| <= ||r2|| (1 + D 2^-23) + 2^-22 (G^ + 3 R_g): a bound that cannot shrink.
    """

    def __init__(self, block: _Block):
        scale = block.scale / FINE                               # a power of two apart: exact
        values = torch.mul(block.residual, 1.0 / scale).round_().clamp_(-INT8_MAX, INT8_MAX)
        self.values_t = values.to(torch.int8).T.contiguous()
        r2 = torch.add(block.residual, values, alpha=-scale)
        dim = values.shape[1]
        self.resid_max = (float(torch.linalg.vector_norm(r2, dim=1).max()) * (1 + dim * 2.0 ** -23)
                          + 2.0 ** -22 * (block.dequant_max + 3 * block.resid_max))


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
    max_queries: int = 65536,
    stats: dict[str, int] | None = None,
) -> np.ndarray:
    """Exact pessimistic rank of each query's best correct item (module docstring), on CPU.

    Args:
        queries: [Q, D] float32. gallery: [N, D] float32, read block by block (a memmap works).
        pair_query, pair_gallery: [P] int, the correct (query, gallery row) pairs.
        tie_atol: wrong items scoring >= best correct - tie_atol count as ahead.
        gallery_block, query_block: the int8 GEMM's tile (its int32 output is the main memory
            beyond the inputs: 256 MiB at the defaults).
        dense_fraction: a tile with more undecided pairs than this share is refined by the
            second int8 level, and if still crowded counted by a float32 GEMM (plus float64 for
            its narrow undecided band) instead.
        max_queries: queries are scanned this many at a time (each pass reads the whole gallery),
            so memory beyond the inputs stays bounded (~1 GiB at the default and D = 512).
        stats: if given, receives counts of rescored pairs, surely counted pairs, and sparse,
            refined and dense tiles.

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
    counts = {"rescored_pairs": 0, "sparse_tiles": 0, "dense_tiles": 0, "refined_tiles": 0, "surely_counted": 0}
    if len(pair_query) == 0 or n == 0:
        if stats is not None:
            stats.update(counts)
        return ranks
    # Only queries with a correct item are scanned: local ids 0..Q'-1.
    active, local_query = np.unique(pair_query, return_inverse=True)
    if len(active) > max_queries:   # a million caption queries: float64 copies of all would be GBs
        for lo in range(0, len(active), max_queries):
            ids = active[lo:lo + max_queries]
            take = (local_query >= lo) & (local_query < lo + max_queries)
            part: dict[str, int] = {}
            ranks[ids] = certified_ranks(queries[ids], gallery, local_query[take] - lo, pair_gallery[take],
                                         tie_atol=tie_atol, gallery_block=gallery_block, query_block=query_block,
                                         dense_fraction=dense_fraction, max_queries=max_queries, stats=part)
            for key, value in part.items():
                counts[key] += value
        if stats is not None:
            stats.update(counts)
        return ranks
    best = np.full(len(active), -np.inf)
    for lo in range(0, len(local_query), max_queries):   # in pieces: a million pairs would be 8 GB in float64
        lq, pg_ = local_query[lo:lo + max_queries], pair_gallery[lo:lo + max_queries]
        np.maximum.at(best, lq, np.einsum("pd,pd->p", np.asarray(queries[active[lq]], np.float64),
                                          np.asarray(gallery[pg_], np.float64)))
    # Queries by threshold, highest first: those whose threshold sits in the bulk of the scores
    # (a correct item ranked far down) share tiles, and the others' tiles stay sparse.
    order = np.argsort(-best, kind="stable")
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    active, best, local_query = active[order], best[order], position[local_query]
    q32 = _as_tensor(np.asarray(queries)[active])
    q = _Queries(q32)
    fine = _FineQueries(q) if dim <= REFINE_MAX_DIM else None
    n_q = len(active)
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
    extra_buffer = torch.empty(tile_rows * tile_cols, dtype=torch.int32) if fine is not None else None
    mask_buffer = torch.empty(tile_rows * tile_cols, dtype=torch.bool)
    extra_mask = torch.empty(tile_rows * tile_cols, dtype=torch.bool)
    for b, start in enumerate(range(0, n, gallery_block)):
        rows32 = _as_tensor(gallery[start:start + gallery_block])
        block = _Block(rows32, None, keep_residual=fine is not None)
        fine_block = None   # the block's second int8 level, built when a tile first needs it
        bq_all, bg_all = pq[block_bounds[b]:block_bounds[b + 1]], pg[block_bounds[b]:block_bounds[b + 1]] - start
        for qs in range(0, n_q, query_block):
            rows = slice(qs, min(qs + query_block, n_q))
            lo_p, hi_p = np.searchsorted(bq_all, [qs, qs + query_block])
            own = (torch.from_numpy(bq_all[lo_p:hi_p] - qs), torch.from_numpy(bg_all[lo_p:hi_p]))
            tile = _Tile(q32[rows], q.exact[rows], q.norm[rows], rows32, block, threshold[rows], below[rows])
            size = tile.n_q * len(rows32)
            approx = torch._int_mm(q.values[rows], block.values_t,
                                   out=approx_buffer[:size].view(tile.n_q, len(rows32)))  # exact int32
            approx[own] = INT32_MIN  # correct items are never "ahead" of their query
            slack = SLACK * (q.norm[rows] * (block.norm_max + block.dequant_max + block.resid_max)
                             + np.abs(threshold[rows]))
            err = q.norm[rows] * block.resid_max + q.resid[rows] * block.dequant_max
            hi, lo = _int_bounds(threshold[rows], below[rows], err, q.scale_np[rows] * block.scale, slack)
            # One pass keeps every pair that may count (A >= lo); the surely counted among them
            # (A >= hi) are few where the model ranks well.
            maybe = torch.ge(approx, lo[:, None], out=mask_buffer[:size].view(approx.shape))
            if _row_counts(maybe).sum() <= dense_fraction * size:
                counts["sparse_tiles"] += 1
                flat = np.flatnonzero(maybe.numpy())
                r, c = flat // approx.shape[1], flat % approx.shape[1]
                sure = approx.view(-1)[torch.from_numpy(flat)].numpy() >= hi.numpy()[r]
                counts["surely_counted"] += int(sure.sum())
                ahead[rows] += np.bincount(r[sure], minlength=tile.n_q)
                ahead[rows] += tile.rescored_count(r[~sure], c[~sure], counts)
                continue
            if fine is not None:
                # Crowded: two more int8 GEMMs on the residuals narrow the bound ~100x (`_FineQueries`).
                fine_block = fine_block or _FineBlock(block)
                approx[own] = 0
                approx.mul_(FINE)
                approx.add_(torch._int_mm(q.values[rows], fine_block.values_t, out=extra_buffer[:size].view(approx.shape)))
                approx.add_(torch._int_mm(fine.values[rows], block.values_t, out=extra_buffer[:size].view(approx.shape)))
                approx[own] = INT32_MIN
                err = (fine.hat_norm[rows] * fine_block.resid_max + fine.resid[rows] * block.dequant_max
                       + q.resid[rows] * block.resid_max)
                hi, lo = _int_bounds(threshold[rows], below[rows], err, q.scale_np[rows] * block.scale / FINE, slack)
                counts["refined_tiles"] += 1
            # Here many pairs count surely (a threshold in the bulk): count them per row, and list
            # only the undecided ones.
            sure = torch.ge(approx, hi[:, None], out=mask_buffer[:size].view(approx.shape))
            n_sure = _row_counts(sure)
            maybe = torch.ge(approx, lo[:, None], out=extra_mask[:size].view(approx.shape))
            if _row_counts(maybe).sum() - n_sure.sum() > dense_fraction * size:
                ahead[rows] += tile.dense_count(own, counts)
                counts["dense_tiles"] += 1
                continue
            counts["sparse_tiles"] += 1
            counts["surely_counted"] += int(n_sure.sum())
            ahead[rows] += n_sure
            torch.logical_xor(maybe, sure, out=maybe)   # lo <= A < hi
            flat = np.flatnonzero(maybe.numpy())
            ahead[rows] += tile.rescored_count(flat // approx.shape[1], flat % approx.shape[1], counts)
    ranks[active] = ahead + 1
    if stats is not None:
        stats.update(counts)
    return ranks


def _row_counts(mask: torch.Tensor) -> np.ndarray:
    """[qb] int64 True entries per row of a [qb, nb] bool mask; numpy on its bytes, ~40x faster
    here than torch's bool sum (which widens every entry to int64 first)."""
    return mask.numpy().view(np.uint8).sum(1, dtype=np.int32).astype(np.int64)  # a row < 2^31


class _Tile:
    """One (query rows, gallery block) tile's exact decisions beyond the int8 filter.

    A float32 dot product of D terms is off by at most gamma_D ||q|| ||g|| (Higham eq. 3.5, any
    summation order, FMA or not), so a float32 score decides every pair outside a band of that
    half-width around the threshold; the pairs inside it are scored in float64.
    """

    def __init__(self, q32: torch.Tensor, q64: torch.Tensor, q_norm: np.ndarray, rows32: torch.Tensor,
                 block: _Block, threshold: np.ndarray, below: np.ndarray):
        self.q32, self.q64, self.rows32 = q32, q64, rows32
        self.n_q = len(q32)
        self.threshold, self.below = threshold, below
        dim = q32.shape[1]
        gamma = dim * 2.0 ** -24 / (1 - dim * 2.0 ** -24)
        self.band = (gamma * q_norm * block.norm_max * (1 + 2.0 ** -20)
                     + SLACK * (q_norm * block.norm_max + np.abs(threshold)))

    def _decide(self, r: np.ndarray, c: np.ndarray, s32: np.ndarray) -> np.ndarray:
        """[qb] int64 per query: pairs (r, c) with float32 score s32 [P] that count (float32(s64) >= T)."""
        s = s32.astype(np.float64)
        counted = s >= self.threshold[r] + self.band[r]
        close = ~counted & (s >= self.below[r] - self.band[r])
        if close.any():  # within float32 error of the threshold: the float64 score decides
            rc, cc = r[close], c[close]
            s64 = torch.einsum("pd,pd->p", self.q64[torch.from_numpy(rc)],
                               self.rows32[torch.from_numpy(cc)].double()).float().numpy()
            counted[close] = s64 >= self.threshold[rc]
        return np.bincount(r[counted], minlength=self.n_q)

    def rescored_count(self, r: np.ndarray, c: np.ndarray, counts: dict[str, int]) -> np.ndarray:
        """[qb] int64: the undecided pairs (r, c) that count, scored in float32 grouped by gallery
        row (a CSR pattern over the block's rows): each gallery row is read once for all of its
        queries, which sit in cache, instead of once per pair."""
        counts["rescored_pairs"] += len(r)
        if len(r) == 0:
            return np.zeros(self.n_q, np.int64)
        nb = len(self.rows32)
        # A stable sort of 16-bit keys is a radix sort in numpy: linear, ~4x faster than on int64.
        order = np.argsort(c.astype(np.int16) if nb <= 2 ** 15 else c, kind="stable")
        r, c = r[order], c[order]
        crow = torch.zeros(nb + 1, dtype=torch.int64)
        crow[1:] = torch.from_numpy(np.bincount(c, minlength=nb)).cumsum(0)
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            pattern = torch.sparse_csr_tensor(crow, torch.from_numpy(r), torch.zeros(len(r)), size=(nb, self.n_q))
            s32 = torch.sparse.sampled_addmm(pattern, self.rows32, self.q32.T, beta=0.0).values().numpy()
        return self._decide(r, c, s32)

    def dense_count(self, own: tuple[torch.Tensor, torch.Tensor], counts: dict[str, int]) -> np.ndarray:
        """[qb] int64 wrong items that count, from a float32 GEMM of the whole tile (today's full count)."""
        s32 = self.q32 @ self.rows32.T  # [qb, nb]
        s32[own] = -np.inf
        up = torch.from_numpy(self.threshold + self.band)   # float64: the comparisons are exact
        down = torch.from_numpy(self.below - self.band)
        wide = s32.double()
        sure = wide >= up[:, None]
        close = (wide >= down[:, None]) & ~sure
        flat = np.flatnonzero(close.numpy())
        r, c = flat // s32.shape[1], flat % s32.shape[1]
        counts["rescored_pairs"] += len(r)
        return _row_counts(sure) + self._decide(r, c, s32.numpy().reshape(-1)[flat])
