"""Certified exact top-k inner-product search on CPU: an int8 GEMM filters, float64 decides.

The gallery is scanned in blocks. For each block an int8 GEMM (`torch._int_mm`, oneDNN with
AVX-512 VNNI here) gives approximate scores with a rigorous error bound; every pair that the
bound says could still enter a query's running top-k is rescored in float64, and only those
rescored values are ranked. The result is exact, not approximate: the top-k by the float64
inner product of the float32 inputs (rounded to float32 for output), ties broken by the lower
gallery row, the same as `reference_topk`. `clipkit.eval.search.topk_inner_product` uses it
on CPU (`method="auto"`) when the int8 GEMM is available.

Why it is exact (query q and gallery row g, float32 vectors of length D):

1. Quantization. A query row is stored as q = s_q q' + r_q with q' integer in [-127, 127]
   and s_q = max|q| / 127 (one scale per query row); a gallery block shares one scale s_g:
   g = s_g g' + r_g. The residuals r are whatever rounding left; their norms are measured,
   not assumed, and inflated past the float32 error of measuring them.
2. The int8 GEMM is exact: A = sum_d q'_d g'_d is an integer with |A| <= 127^2 D < 2^31
   for D <= MAX_DIM (133,144), accumulated in int32 without rounding.
3. Let a = s_q s_g A = q^.g^ with q^ = s_q q', g^ = s_g g'. Then
        q.g - a = q^.r_g + r_q.g^ + r_q.r_g = q.r_g + r_q.g^,
   and by Cauchy-Schwarz
        |q.g - a| <= ||q|| ||r_g|| + ||r_q|| ||g^|| <= ||q|| R_g + ||r_q|| G^ =: E_q,
   with R_g = max ||r_g|| and G^ = max ||g^|| over the block's rows.
4. Rescoring. A float64 dot product of float32 inputs has exact products (24 + 24 <= 53
   bits), and summing D of them in any order is off by at most gamma_D ||q|| ||g|| with
   gamma_D = D 2^-53 / (1 - D 2^-53) (Higham, Accuracy and Stability, eq. 3.5), so
   s64 <= q.g + gamma_D ||q|| G, G = max ||g||.
5. The filter. Let kappa be the query's current k-th best score (a float32, from rows
   already scanned; it only rises). Every row of this block has a larger index than every
   row held, so it can only enter the top-k with float32(s64) > kappa. A pair is dropped
   unrescored when
        A < floor((kappa - E_q - slack) / (s_q s_g)),
   which gives s64 <= a + E_q + gamma_D ||q|| G < kappa, hence float32(s64) <= kappa
   (rounding is monotone and kappa is a float32): the row ranks behind the current k-th
   item, which only ever gets overtaken by better rows. slack = 2^-30 (||q|| (G + G^ + R_g)
   + |kappa|) covers gamma_D for D <= 2^20 and the float64 rounding in computing the
   threshold. Early in the scan kappa is low, so a crowded tile also uses its own k-th
   largest A: k of its rows score at least a_k - E_q (`_TileBound.floor_from`).
6. Everything kept is rescored in float64 and merged by (score desc, row asc), so the result
   equals sorting the full float64 score row, whatever the data: near-ties, duplicates and
   rows of any norm only cost more rescoring, never correctness. A tile where more than
   `dense_fraction` of the pairs survive (scores all within the bound of each other, e.g.
   collapsed embeddings) is scored with a float64 GEMM instead.

Scores match FAISS's float32 `IndexFlatIP` to ~1e-7 (FAISS sums in float32), and the order
can differ from FAISS's only between scores within float32 rounding of each other.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import torch

INT8_MAX = 127
MAX_DIM = (2 ** 31 - 1) // INT8_MAX ** 2  # int32 accumulation of D products stays exact
SLACK = 2.0 ** -30


@functools.lru_cache(maxsize=1)
def int8_matmul_available() -> bool:
    """True when torch has a CPU int8 x int8 -> int32 GEMM (`torch._int_mm`) that computes correctly."""
    if not hasattr(torch, "_int_mm"):
        return False
    try:
        a = torch.arange(-64, 64, dtype=torch.int8).reshape(32, 4).repeat(1, 8)  # [32, 32]
        b = a.T.contiguous()
        return bool(torch.equal(torch._int_mm(a, b), a.int() @ b.int()))
    except RuntimeError:
        return False


def _f32_scale(amax: float) -> float:
    """max|x| / 127 rounded to float32, so scale * integer is exact in float64; 1 for a zero row."""
    return float(np.float32(amax / INT8_MAX)) if amax > 0 else 1.0


class _Queries:
    """Queries [Q, D]: int8 values, per-row scales, norms and residual norms (float64)."""

    def __init__(self, q32: torch.Tensor):
        if not torch.isfinite(q32).all():
            raise ValueError("queries contain NaN or inf; exact search needs finite embeddings")
        self.exact = q32.double()
        self.scale = torch.tensor([_f32_scale(a) for a in q32.abs().amax(dim=1).tolist()], dtype=torch.float64)
        values = torch.round(self.exact / self.scale[:, None]).clamp_(-INT8_MAX, INT8_MAX)
        self.values = values.to(torch.int8)
        self.norm = self.exact.norm(dim=1).numpy()
        self.resid = (self.exact - values * self.scale[:, None]).norm(dim=1).numpy()  # exact products
        self.scale_np = self.scale.numpy()


class _Block:
    """One gallery block: int8 values [D, n] (transposed for the GEMM), one scale, the float64
    rows for rescoring, and the block-wide norms the bound needs."""

    def __init__(self, rows: torch.Tensor, exact_buffer: torch.Tensor | None, keep_residual: bool = False):
        lo, hi = torch.aminmax(rows)
        amax = max(-float(lo), float(hi))
        if not math.isfinite(amax):
            raise ValueError("gallery rows contain NaN or inf; exact search needs finite embeddings")
        self.scale = _f32_scale(amax)  # any integers are valid values: the bound measures their residual
        values = torch.mul(rows, 1.0 / self.scale).round_().clamp_(-INT8_MAX, INT8_MAX)
        # Norms in float32, inflated past their rounding error so the bound cannot shrink: each
        # residual entry is off by at most 2^-24 (|scale * value| + |residual|) <= 2^-23 |scale * value|
        # (a zero value leaves the row entry itself, exactly), and a float32 norm of D terms by at
        # most D 2^-24 relative (Higham eq. 3.5).
        dim = rows.shape[1]
        grow = 1 + dim * 2.0 ** -23
        residual = torch.add(rows, values, alpha=-self.scale)  # [n, D] float32
        resid = float(torch.linalg.vector_norm(residual, dim=1).max())
        # Kept for a second int8 level (`clipkit.eval.certified_ranks`), with the values that made it.
        self.residual, self.values = (residual, values) if keep_residual else (None, None)
        # Squares of integers <= 127 summed over D <= 1040 stay below 2^24: exact in float32.
        integer_norm = torch.linalg.vector_norm(values if dim <= 1040 else values.double(), dim=1).max()
        self.dequant_max = float(integer_norm) * (1 + 2.0 ** -22) * self.scale
        self.resid_max = resid * grow + 2.0 ** -23 * self.dequant_max
        self.norm_max = float(torch.linalg.vector_norm(rows, dim=1).max()) * grow
        self.values_t = values.to(torch.int8).T.contiguous()
        # [n, D] float64 for rescoring, in a buffer reused across blocks: a fresh 64 MiB tensor
        # per block costs more in page faults than the copy. None: the caller rescores otherwise.
        self.exact = None if exact_buffer is None else exact_buffer[:rows.numel()].view(rows.shape).copy_(rows)


class _TileBound:
    """The filter of one (query rows, gallery block) tile, in the int32 domain of the GEMM."""

    def __init__(self, queries: _Queries, rows: slice, block: _Block):
        norm = queries.norm[rows]
        self.err = norm * block.resid_max + queries.resid[rows] * block.dequant_max  # E_q per query
        self.unit = queries.scale_np[rows] * block.scale  # score per unit of A
        self.slack = SLACK * norm * (block.norm_max + block.dequant_max + block.resid_max)

    def threshold(self, kappa: np.ndarray) -> torch.Tensor:
        """[qb] int32: a pair with A below it has float32(s64) <= kappa (module docstring, step 5)."""
        limit = np.floor((kappa - self.err - self.slack - SLACK * np.abs(kappa)) / self.unit)
        return torch.from_numpy(np.clip(limit, -2.0 ** 31, 2.0 ** 31 - 1).astype(np.int32))

    def floor_from(self, kth_approx: np.ndarray) -> np.ndarray:
        """[qb] float64 kappa' from the tile's k-th largest A per query (the tile has >= k rows).

        k rows have s64 >= a_k - E_q - slack >= x for x, the float32 at or below that, so
        their float32(s64) >= x. Returning the float32 just below x makes a pair dropped
        against kappa' (float32(s64) <= kappa' < x) strictly worse than those k rows,
        whatever its index, so dropping it is safe though it shares their block.
        """
        a_k = kth_approx * self.unit
        low = a_k - self.err - self.slack - SLACK * np.abs(a_k)
        x = low.astype(np.float32)
        x = np.where(x > low, np.nextafter(x, np.float32(-np.inf)), x)
        return np.nextafter(x, np.float32(-np.inf)).astype(np.float64)


class _RunningTopK:
    """Per-query best k (score float32 desc, gallery row asc), fed with rows in increasing order."""

    def __init__(self, n: int, k: int):
        self.k = k
        self.scores = np.full((n, k), -np.inf, np.float32)
        self.ids = np.full((n, k), -1, np.int64)

    def kth(self, rows: slice) -> np.ndarray:
        return self.scores[rows, -1]

    def merge(self, offset: int, rows: np.ndarray, ids: np.ndarray, scores: np.ndarray) -> None:
        """Adds candidates (query offset + rows, gallery ids, float32 scores). Every id is larger
        than every id held, so a stable sort of [held, new] breaks ties by the lower id."""
        if len(rows) == 0:
            return
        order = np.lexsort((ids, -scores, rows))  # by query, then score desc, then id asc
        rows, ids, scores = rows[order], ids[order], scores[order]
        rank = np.arange(len(rows)) - np.searchsorted(rows, rows, side="left")
        keep = rank < self.k
        rows, ids, scores, rank = rows[keep], ids[keep], scores[keep], rank[keep]
        touched = np.unique(rows)
        slot = np.searchsorted(touched, rows)
        new_s = np.full((len(touched), self.k), -np.inf, np.float32)
        new_i = np.full((len(touched), self.k), -1, np.int64)
        new_s[slot, rank], new_i[slot, rank] = scores, ids
        held = touched + offset
        cat_s = np.concatenate([self.scores[held], new_s], axis=1)
        cat_i = np.concatenate([self.ids[held], new_i], axis=1)
        pick = np.argsort(-cat_s, axis=1, kind="stable")[:, :self.k]
        self.scores[held] = np.take_along_axis(cat_s, pick, 1)
        self.ids[held] = np.take_along_axis(cat_i, pick, 1)


def _dense_tile(top: _RunningTopK, q64: torch.Tensor, qs: int, block: _Block, start: int) -> None:
    """Exact float64 GEMM of one tile; each row's k best (ties included) that beat kappa are merged."""
    s32 = (q64 @ block.exact.T).float().numpy()  # [qb, nb]
    kappa = top.kth(slice(qs, qs + len(s32)))
    k = min(top.k, s32.shape[1])
    row_kth = np.partition(s32, s32.shape[1] - k, axis=1)[:, s32.shape[1] - k]
    rows, cols = np.nonzero((s32 > kappa[:, None]) & (s32 >= row_kth[:, None]))
    top.merge(qs, rows, cols + start, s32[rows, cols])


def _survivors(approx: torch.Tensor, threshold: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) int64 where approx [qb, nb] >= threshold [qb], in row-major order.

    Into a reused mask, then numpy's flatnonzero: 2-3x faster here than torch.nonzero on a
    fresh mask (no page faults, one pass over the mask instead of two).
    """
    torch.ge(approx, threshold[:, None], out=mask)
    flat = torch.from_numpy(np.flatnonzero(mask.numpy()))
    return flat // approx.shape[1], flat % approx.shape[1]


def _rescore(q64: torch.Tensor, block: _Block, rows: torch.Tensor, cols: torch.Tensor) -> np.ndarray:
    """float32(float64 dot) of the (rows, cols) pairs, [P]; rows ascending.

    A sampled dense-dense product (SDDMM) computes just these dot products without copying
    the rows they read.
    """
    crow = torch.zeros(len(q64) + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(rows, minlength=len(q64)).cumsum(0)
    with warnings.catch_warnings():  # "sparse CSR support is in beta" and invariant-check notices
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(crow, cols, torch.zeros(len(cols), dtype=torch.float64),
                                          size=(len(q64), len(block.exact)))
        out = torch.sparse.sampled_addmm(pattern, q64, block.exact.T, beta=0.0)
    return out.values().float().numpy()


def _as_tensor(rows: np.ndarray) -> torch.Tensor:
    """float32 rows as a tensor without a copy when they already are; read-only (memmap) is fine."""
    with warnings.catch_warnings():  # "non-writable array": nothing here writes to it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))


def certified_topk(
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int,
    *,
    gallery_block: int = 16384,
    query_block: int = 4096,
    seed_rows: int = 2048,
    dense_fraction: float = 0.05,
    crowded: float = 64.0,
    stats: dict[str, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of `queries @ gallery.T` per query row (module docstring), on CPU.

    Args:
        queries: [Q, D] float32. gallery: [N, D] float32, read block by block (a memmap works).
        k: results per query, 1 <= k <= N.
        gallery_block, query_block: the int8 GEMM's tile; its int32 output (256 MiB at the
            defaults) is the main memory beyond the inputs.
        seed_rows: leading gallery rows scored with a float64 GEMM, so every query starts with
            a finite k-th score to filter against.
        dense_fraction: a tile where more pairs than this survive the filter is scored with a
            float64 GEMM instead of pair by pair.
        crowded: more survivors per query than this make a tile raise its filter with its own
            k-th approximate score (one top-k pass over the tile).
        stats: if given, receives counts of rescored pairs, dense, sparse and raised tiles.

    Returns:
        scores [Q, k] float32 (float64 inner products, rounded) and ids [Q, k] int64, each row
        by descending score, ties by ascending gallery row.
    """
    n, dim = gallery.shape
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= N, got k={k}, N={n}")
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ValueError(f"expected [Q, {dim}] queries, got {queries.shape}")
    if dim > MAX_DIM:
        raise ValueError(f"D={dim} > {MAX_DIM} would overflow the int32 accumulation")
    q = _Queries(_as_tensor(queries))
    n_q = len(q.exact)
    top = _RunningTopK(n_q, k)
    counts = {"rescored_pairs": 0, "dense_tiles": 0, "sparse_tiles": 0, "raised_tiles": 0}
    seed = min(n, max(seed_rows, k))
    bounds = [0, *range(seed, n, gallery_block), n]
    # Reused across tiles: tensors this large are mmap'ed fresh each time, and the page faults
    # cost as much as the pass that fills them.
    tile_rows, tile_cols = min(query_block, n_q), min(gallery_block, n)
    approx_buffer = torch.empty(tile_rows * tile_cols, dtype=torch.int32)
    mask_buffer = torch.empty(tile_rows * tile_cols, dtype=torch.bool)
    exact_buffer = torch.empty(max(seed, tile_cols) * dim, dtype=torch.float64)
    for start, stop in zip(bounds[:-1], bounds[1:]):
        block = _Block(_as_tensor(gallery[start:stop]), exact_buffer)
        for qs in range(0, n_q, query_block):
            rows = slice(qs, min(qs + query_block, n_q))
            q64 = q.exact[rows]
            if start == 0:
                _dense_tile(top, q64, qs, block, start)
                counts["dense_tiles"] += 1
                continue
            size = len(q64) * (stop - start)
            approx = torch._int_mm(q.values[rows], block.values_t,
                                   out=approx_buffer[:size].view(len(q64), stop - start))  # exact int32
            mask = mask_buffer[:size].view(approx.shape)
            bound = _TileBound(q, rows, block)
            kappa = top.kth(rows).astype(np.float64)
            hit_rows, hit_cols = _survivors(approx, bound.threshold(kappa), mask)
            if len(hit_rows) > crowded * len(approx) and approx.shape[1] >= k:
                kth_approx = approx.topk(k, dim=1).values[:, -1].numpy()
                kappa = np.maximum(kappa, bound.floor_from(kth_approx))
                hit_rows, hit_cols = _survivors(approx, bound.threshold(kappa), mask)
                counts["raised_tiles"] += 1
            if len(hit_rows) > dense_fraction * approx.numel():
                _dense_tile(top, q64, qs, block, start)
                counts["dense_tiles"] += 1
                continue
            counts["sparse_tiles"] += 1
            counts["rescored_pairs"] += len(hit_rows)
            scores = _rescore(q64, block, hit_rows, hit_cols)
            r = hit_rows.numpy()
            better = scores > top.kth(rows)[r]  # ties with the k-th lose: their rows come later
            top.merge(qs, r[better], hit_cols.numpy()[better] + start, scores[better])
    if stats is not None:
        stats.update(counts)
    return top.scores, top.ids


def reference_topk(queries: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """What `certified_topk` returns, by brute force: float32(float64 scores), stable sort.

    Holds the [Q, N] score matrix: for tests and small sets only.
    """
    s = (queries.astype(np.float64) @ gallery.astype(np.float64).T).astype(np.float32)
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, ids, 1), ids
