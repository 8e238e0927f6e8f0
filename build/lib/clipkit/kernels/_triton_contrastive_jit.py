"""The `@triton.jit` kernels behind `clipkit.kernels.triton_contrastive` (read that module first).

This file is executed by `triton_contrastive._kernels()`, once per value of TRITON_INTERPRET,
under its own module name: `triton.jit` picks the interpreter or the GPU compiler when it
decorates, so a process that runs both (a GPU test session that also runs the interpreter
tests) gets two separate sets of kernels. Nothing else should import it.

Logits are handled in log2 units (x = log2(e)·s·q·k) so every exponential is one `exp2`;
`scale_ptr` holds [s, s·log2(e)], both formed on the host in the accumulation dtype (a
Python float constant in a kernel is float32, which would cap float64 runs at 1e-8).
Row and column indices past the end are clamped to row/column 0 for the loads (no masks in
the inner product) and masked out of every statistic and store.

Only builtins and `tl.reduce` appear in the kernels, never `tl.sum`/`tl.max`/`tl.zeros`/
`tl.cdiv`: those are themselves `@triton.jit` functions of triton.language, decorated
when triton is first imported, so in a process that imported triton before setting
TRITON_INTERPRET=1 they are compiled-mode functions the interpreter cannot call. `tl.reduce`
with triton's own sum/max combine functions is what tl.sum/tl.max expand to on the GPU and
what the interpreter maps to numpy.
"""

import triton
import triton.language as tl


@triton.jit
def _sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def _max(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_max)


@triton.jit
def _index(i, WIDE: tl.constexpr):
    """Element offsets in int64 only when a tensor passes 2^31 elements: int32 offsets keep
    the 16-bit stats tile at 128x128 free of register spills."""
    if WIDE:
        return i.to(tl.int64)
    return i


@triton.jit
def _dot_tile(q_ptr, k_ptr, rows, cols, D, stride_q, stride_k,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              EVEN_K: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
              WIDE: tl.constexpr):
    """q[rows]·k[cols]ᵀ as a [BLOCK_M, BLOCK_N] ACC tile; rows/cols are in range (clamped)."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = q_ptr + _index(rows, WIDE)[:, None] * stride_q + offs_k[None, :]
    b_ptrs = k_ptr + _index(cols, WIDE)[None, :] * stride_k + offs_k[:, None]
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, ACC)
    for k0 in range(0, D, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=offs_k[None, :] + k0 < D, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] + k0 < D, other=0.0)
        if UPCAST:  # the interpreter cannot multiply bf16; fp32 products of 16-bit inputs are exact
            a = a.to(ACC)
            b = b.to(ACC)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    return acc


@triton.jit
def infonce_stats_kernel(q_ptr, k_ptr, scale_ptr, row_m_ptr, row_s_ptr, col_m_ptr, col_s_ptr, pos_ptr,
                         n_rows, n_cols, D, row_offset, stride_q, stride_k, n_row_tiles, tiles_per_split,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         EVEN_K: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
                         PRECISION: tl.constexpr, WIDE: tl.constexpr):
    """Pass 1 of softmax InfoNCE: one product per logit, row and column statistics together.

    Grid (P row groups, S column splits). Program (p, s) takes row tiles p, p+P, p+2P, ... and,
    for each, the column tiles of split s: an online log-sum-exp along the row (in registers,
    written to row partials [S, n_rows] in log2 units) and, for every column tile, that
    tile's column max/sum merged into its own column partials [P, n_cols] (no other program
    writes them, so no atomics). Also Σ of the positive logits, one partial per program.
    """
    p = tl.program_id(0)
    split = tl.program_id(1)
    n_groups = tl.num_programs(0)
    n_splits = tl.num_programs(1)
    scale = tl.load(scale_ptr)
    scale2 = tl.load(scale_ptr + 1)
    j_lo = split * tiles_per_split
    j_hi = tl.minimum(j_lo + tiles_per_split, (n_cols + BLOCK_N - 1) // BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    col_base = p.to(tl.int64) * n_cols
    pos = tl.full((BLOCK_M,), 0.0, ACC)
    for i in range(p, n_row_tiles, n_groups):
        rows = i * BLOCK_M + offs_m
        row_ok = rows < n_rows
        rows_c = tl.where(row_ok, rows, 0)
        m_row = tl.full((BLOCK_M,), float("-inf"), ACC)
        s_row = tl.full((BLOCK_M,), 0.0, ACC)
        for j in range(j_lo, j_hi):
            cols = j * BLOCK_N + offs_n
            col_ok = cols < n_cols
            cols_c = tl.where(col_ok, cols, 0)
            dots = _dot_tile(q_ptr, k_ptr, rows_c, cols_c, D, stride_q, stride_k,
                             BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, UPCAST, ACC, PRECISION, WIDE)
            x = dots * scale2
            # Online softmax along the rows; every tile has a valid column, so m_new is finite.
            x_r = tl.where(col_ok[None, :], x, float("-inf"))
            m_new = tl.maximum(m_row, _max(x_r, 1))
            s_row = s_row * tl.exp2(m_row - m_new) + _sum(tl.exp2(x_r - m_new[:, None]), 1)
            m_row = m_new
            # This tile's column statistics, merged into the group's running ones. The first
            # row tile of the group writes without reading, so the partials need no init.
            x_c = tl.where(row_ok[:, None], x, float("-inf"))
            m_tile = _max(x_c, 0)
            s_tile = _sum(tl.exp2(x_c - m_tile[None, :]), 0)
            seen = col_ok & (i != p)
            m_old = tl.load(col_m_ptr + col_base + cols, mask=seen, other=float("-inf"))
            s_old = tl.load(col_s_ptr + col_base + cols, mask=seen, other=0.0)
            m_both = tl.maximum(m_old, m_tile)
            s_both = s_old * tl.exp2(m_old - m_both) + s_tile * tl.exp2(m_tile - m_both)
            tl.store(col_m_ptr + col_base + cols, m_both, mask=col_ok)
            tl.store(col_s_ptr + col_base + cols, s_both, mask=col_ok)
            # Positives sit at column row + row_offset; only tiles crossing that line look.
            diag_lo = i * BLOCK_M + row_offset
            if (j * BLOCK_N < diag_lo + BLOCK_M) & (j * BLOCK_N + BLOCK_N > diag_lo):
                hit = (cols[None, :] == rows[:, None] + row_offset) & row_ok[:, None]
                pos += _sum(tl.where(hit, dots, 0.0), 1)
        tl.store(row_m_ptr + split * n_rows + rows, m_row, mask=row_ok)
        tl.store(row_s_ptr + split * n_rows + rows, s_row, mask=row_ok)
    tl.store(pos_ptr + p * n_splits + split, _sum(pos, 0) * scale)


@triton.jit
def merge_max_sum_kernel(m_ptr, s_ptr, out_m_ptr, out_s_ptr, n, n_parts,
                         BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Folds [n_parts, n] (max, Σ exp2(x − max)) partials, log2 units, into one (max, sum)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    m = tl.full((BLOCK,), float("-inf"), ACC)
    s = tl.full((BLOCK,), 0.0, ACC)
    m_ptrs = m_ptr + offs
    s_ptrs = s_ptr + offs
    for _ in range(n_parts):
        m_p = tl.load(m_ptrs, mask=ok, other=float("-inf"))
        s_p = tl.load(s_ptrs, mask=ok, other=0.0)
        m_ptrs += n  # pointer steps are 64-bit: P·B may pass 2^31
        s_ptrs += n
        m_new = tl.maximum(m, m_p)
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # keeps −inf − −inf out
        s = s * tl.exp2(m - ref) + s_p * tl.exp2(m_p - ref)
        m = m_new
    tl.store(out_m_ptr + offs, m, mask=ok)
    tl.store(out_s_ptr + offs, s, mask=ok)


@triton.jit
def infonce_grad_kernel(q_ptr, k_ptr, scale_ptr, row_lse2_ptr, col_lse2_ptr, g_ptr,
                        n_rows, n_cols, D, diag_offset, stride_q, stride_k, stride_g,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        EVEN_K: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
                        PRECISION: tl.constexpr, WIDE: tl.constexpr):
    """G = exp(l − row_lse) + exp(l − col_lse) − 2·[col = row + diag_offset] for a [n_rows, n_cols] block.

    One program per output tile; consecutive programs share a row tile so its q rows are
    read from memory once while the block's k columns stay in L2.
    """
    pid = tl.program_id(0)
    n_col_tiles = (n_cols + BLOCK_N - 1) // BLOCK_N
    rows = (pid // n_col_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % n_col_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    rows_c = tl.where(row_ok, rows, 0)
    cols_c = tl.where(col_ok, cols, 0)
    dots = _dot_tile(q_ptr, k_ptr, rows_c, cols_c, D, stride_q, stride_k,
                     BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, UPCAST, ACC, PRECISION, WIDE)
    x = dots * tl.load(scale_ptr + 1)
    r = tl.load(row_lse2_ptr + rows_c)
    c = tl.load(col_lse2_ptr + cols_c)
    g = tl.exp2(x - r[:, None]) + tl.exp2(x - c[None, :])
    g = tl.where(cols[None, :] == rows[:, None] + diag_offset, g - 2.0, g)
    g_ptrs = g_ptr + _index(rows, WIDE)[:, None] * stride_g + cols[None, :]
    tl.store(g_ptrs, g.to(g_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def sigmoid_kernel(q_ptr, k_ptr, scale_ptr, bias_ptr, g_ptr, loss_ptr, gsum_ptr,
                   n_rows, n_cols, D, diag_offset, stride_q, stride_k, stride_g,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   EVEN_K: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
                   PRECISION: tl.constexpr, WIDE: tl.constexpr, WRITE_G: tl.constexpr):
    """Σ softplus(−y·l) and Σ G per tile (one partial each per program), G = σ(l) − [y = +1] stored if WRITE_G.

    softplus(z) = max(z, 0) + log1p(exp(−|z|)); log1p is the Goldberg form
    log(u)·e/(u − 1), u = 1 + e, so the ~B² negatives with l ≈ β = −10 keep full relative
    precision (log(1 + e) alone rounds them to a few digits, and they dominate the sum).
    """
    pid = tl.program_id(0)
    n_col_tiles = (n_cols + BLOCK_N - 1) // BLOCK_N
    rows = (pid // n_col_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % n_col_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    rows_c = tl.where(row_ok, rows, 0)
    cols_c = tl.where(col_ok, cols, 0)
    dots = _dot_tile(q_ptr, k_ptr, rows_c, cols_c, D, stride_q, stride_k,
                     BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, UPCAST, ACC, PRECISION, WIDE)
    x = dots * tl.load(scale_ptr) + tl.load(bias_ptr)
    valid = row_ok[:, None] & col_ok[None, :]
    positive = cols[None, :] == rows[:, None] + diag_offset
    e = tl.exp(-tl.abs(x))
    u = 1.0 + e
    log1p_e = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
    z = tl.where(positive, -x, x)
    loss = tl.where(valid, tl.maximum(z, 0.0) + log1p_e, 0.0)
    # σ(x) for negatives, σ(x) − 1 = −σ(−x) for positives: no 1 − σ cancellation.
    sig_pos = tl.where(x >= 0, 1.0 / u, e / u)
    sig_neg = tl.where(x >= 0, e / u, 1.0 / u)
    g = tl.where(valid, tl.where(positive, -sig_neg, sig_pos), 0.0)
    tl.store(loss_ptr + pid, _sum(_sum(loss, 1), 0))
    tl.store(gsum_ptr + pid, _sum(_sum(g, 1), 0))
    if WRITE_G:
        g_ptrs = g_ptr + _index(rows, WIDE)[:, None] * stride_g + cols[None, :]
        tl.store(g_ptrs, g.to(g_ptr.dtype.element_ty), mask=valid)
