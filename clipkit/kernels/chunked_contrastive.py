"""Block primitives of the exact contrastive losses, looping over row chunks in PyTorch.

A "block" is the rows of the global [B, B] logits matrix l = s·q·kᵀ (+β) that one rank
owns: q [b, D] are its rows (local image features), k [B, D] every column (the gathered
text features), and row i's positive is column i + row_offset. `clipkit.losses.fused`
turns these into autograd Functions and adds the collectives; `clipkit.kernels.
triton_contrastive` implements the same three functions with the same contract on GPU.
Selected by `loss.impl=chunked` (or `auto` where Triton is unavailable).

Cost, in b×B×D matmuls, and memory: never more than a few (chunk × B) float32 blocks.
`chunk=None` (`loss.chunk_size=auto`, the default) sizes the chunk from an element budget,
`CHUNK_ELEMS` logits a block whatever B is (see `chunk_rows`).
  * `infonce_block_stats`: 1 (the logits, once) and one exp per logit. Row log-sum-exp is
    final inside a chunk (each chunk holds whole rows); column sums come from the same
    exponentials as a matrix-vector product, merged online down the chunks.
  * `infonce_block_grads`: 3 (recompute the logits, G·k, Gᵀ·q). With the stats pass that
    is the 4-matmul exact symmetric InfoNCE; open_clip's ClipLoss does 6 (it builds both
    I·Tᵀ and T·Iᵀ) and Inf-CL about 10.
  * `sigmoid_block`: 3 (logits, G·k, Gᵀ·q) in one pass: each pair's loss and gradient is
    local, so there is nothing to recompute.

Dtypes: logits, statistics and gradients are float32 for float32/bf16/fp16 inputs (float64
for float64). This module imports nothing from clipkit and has no autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half/bf16/fp32 inputs, float64 for float64: the logits' accumulation type."""
    return torch.promote_types(x.dtype, torch.float32)


def _scalar(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return value.detach().reshape(()).to(dtype)


# The default block: 2^23 logits (32 MB in float32), 512 rows at B = 16,384. A fixed row
# count grows the block with B instead: the old default of 4,096 rows held fwd+bwd memory to
# only 1/4.9 of open_clip's ClipLoss at B = 16,384 on CPU (D = 512), 512 rows to 1/22.
CHUNK_ELEMS = 1 << 23
# A floor so that a very large B still gets GEMMs of some height (128 to 1,024 rows timed
# alike on CPU at B = 16,384); past B = 65,536 the block grows again as 128 × B.
MIN_CHUNK_ROWS = 128


def chunk_rows(chunk: int | None, columns: int) -> int:
    """Rows per chunk: `chunk` itself, or for None max(MIN_CHUNK_ROWS, CHUNK_ELEMS // columns).

    No upper bound is needed: a chunk never holds more rows than the block has.
    """
    if chunk is None:
        return max(MIN_CHUNK_ROWS, CHUNK_ELEMS // max(1, columns))
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return chunk


def _chunks(n: int, chunk: int | None, columns: int):
    """(lo, hi) row ranges of an n-row block against `columns` columns."""
    rows = chunk_rows(chunk, columns)
    for start in range(0, n, rows):
        yield start, min(start + rows, n)


def _positive_columns(logits: torch.Tensor, first_row: int) -> torch.Tensor:
    """The diagonal view l[r, first_row + r] of a [c, B] chunk (row r's positive)."""
    return logits.diagonal(first_row)


# A chunk's column sums are taken against one shared reference, the chunk's largest logit
# M: Σ_i exp(l_ij − M) = Σ_i a_i·exp(l_ij − m_i) with a_i = exp(m_i − M), m_i the row max, so
# one exp per logit serves both directions and the column sums are a matrix-vector product.
# A column whose sum falls below this floor (its max more than ~50 below M) would lose
# precision to underflow; those columns are recomputed exactly against their own max.
_SHARED_REFERENCE_FLOOR = 1.9e-22  # e^-50; float32 underflows at e^-87, so terms lost are < e^-28 relative


@torch.no_grad()
def infonce_block_stats(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, row_offset: int,
                        chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax statistics of this block's logits l = s·q·kᵀ, in both directions.

    Args:
        q: [b, D] this block's rows. k: [B, D] every column. scale: 0-dim or [1], s.
        row_offset: row i's positive is column i + row_offset.
        chunk: rows per chunk (None: from `CHUNK_ELEMS`); extra memory is about chunk × B floats.
    Returns:
        row_lse [b] (logsumexp_j l_ij); col_ref [B] and col_sumexp [B] with
        logsumexp_i l_ij = col_ref_j + log(col_sumexp_j), where col_ref_j ≥ max_i l_ij is a
        reference close enough that col_sumexp_j ≥ e^-50 (the column max itself for the
        Triton kernels); positive_sum 0-dim (Σ_i l_{i, i+row_offset}). Blocks merge as
        max-references do: ref = max(ref_a, ref_b), sum = Σ sum_x·exp(ref_x − ref).
    """
    cdt = compute_dtype(q)
    s = _scalar(scale, cdt)
    kc = k.to(cdt)
    b, big_b = q.shape[0], k.shape[0]
    row_lse = torch.empty(b, dtype=cdt, device=q.device)
    col_ref = torch.full((big_b,), float("-inf"), dtype=cdt, device=q.device)
    col_sum = torch.zeros(big_b, dtype=cdt, device=q.device)
    positives = torch.zeros((), dtype=cdt, device=q.device)
    for lo, hi in _chunks(b, chunk, big_b):
        # Scaling the [c, D] rows rather than the [c, B] logits saves a pass over the block;
        # fp32 accumulation even for bf16 inputs.
        qs = q[lo:hi].to(cdt) * s
        logits = qs @ kc.T
        positives += _positive_columns(logits, lo + row_offset).sum()
        row_max = logits.amax(dim=1)
        shifted_exp = logits.sub_(row_max[:, None]).exp_()  # in place: the block's only exp pass
        row_lse[lo:hi] = row_max + shifted_exp.sum(dim=1).log()
        chunk_max = row_max.max()
        chunk_sum = torch.exp(row_max - chunk_max) @ shifted_exp
        del logits, shifted_exp
        chunk_ref = chunk_max.expand(big_b).clone()
        # One host sync per chunk; almost always nothing to redo.
        underflowed = (chunk_sum < _SHARED_REFERENCE_FLOOR).nonzero().squeeze(1)
        if underflowed.numel():
            exact = qs @ kc[underflowed].T  # [c, n]: exact logits of those columns only
            exact_max = exact.amax(dim=0)
            chunk_ref[underflowed] = exact_max
            chunk_sum[underflowed] = exact.sub_(exact_max).exp_().sum(dim=0)
        new_ref = torch.maximum(col_ref, chunk_ref)
        col_sum = col_sum * torch.exp(col_ref - new_ref) + chunk_sum * torch.exp(chunk_ref - new_ref)
        col_ref = new_ref
    return row_lse, col_ref, col_sum, positives


@torch.no_grad()
def infonce_block_grads(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, row_offset: int,
                        row_lse: torch.Tensor, col_lse: torch.Tensor, chunk: int | None = None, *,
                        need_q: bool = True, need_k: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Unscaled gradients of the symmetric InfoNCE sum for this block.

    G_ij = exp(l_ij − row_lse_i) + exp(l_ij − col_lse_j) − 2·[j = i + row_offset] is
    d(Σ row losses + Σ column losses)/d l_ij, with the *global* column log-sum-exp.

    Args:
        q [b, D], k [B, D], scale, row_offset, chunk: as in `infonce_block_stats`.
        row_lse: [b] from the stats pass. col_lse: [B], col_max + log(col_sumexp) merged
            over every block of the global batch.
    Returns:
        dq = G·k [b, D] and dk = Gᵀ·q [B, D] (None where not needed), NOT multiplied by s.
    """
    cdt = compute_dtype(q)
    s = _scalar(scale, cdt)
    kc = k.to(cdt)
    row_lse, col_lse = row_lse.to(cdt), col_lse.to(cdt)
    dq = torch.empty(q.shape, dtype=cdt, device=q.device) if need_q else None
    dk = torch.zeros(kc.shape, dtype=cdt, device=q.device) if need_k else None
    if not (need_q or need_k):
        return dq, dk
    for lo, hi in _chunks(q.shape[0], chunk, k.shape[0]):
        qc = q[lo:hi].to(cdt)
        logits = (qc * s) @ kc.T
        grad = torch.sub(logits, row_lse[lo:hi, None]).exp_()
        grad += logits.sub_(col_lse[None, :]).exp_()
        del logits
        # Both directions' targets sit on the same entries (image i ↔ text i).
        _positive_columns(grad, lo + row_offset).sub_(2.0)
        if dq is not None:
            torch.mm(grad, kc, out=dq[lo:hi])
        if dk is not None:
            dk.addmm_(grad.T, qc)
    return dq, dk


@torch.no_grad()
def sigmoid_block(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                  row_offset: int | None, chunk: int | None = None, *, need_grads: bool = True):
    """The pairwise sigmoid loss of this block and its unscaled gradients, in one pass.

    l = s·q·kᵀ + β; y_ij = +1 at j = i + row_offset, −1 elsewhere.

    Args:
        q [b, D], k [B, D], scale, row_offset, chunk: as in `infonce_block_stats`; bias: β.
            row_offset None: no positives in this block (y = −1 everywhere; SigLIP's ring
            scoring another rank's texts).
    Returns:
        loss_sum 0-dim (Σ_ij softplus(−y_ij·l_ij)); with need_grads also dq = G·k [b, D],
        dk = Gᵀ·q [B, D] and grad_sum = Σ_ij G_ij (the bias gradient), where
        G_ij = σ(l_ij) − [y_ij = +1]; otherwise those three are None.
    """
    cdt = compute_dtype(q)
    s, beta = _scalar(scale, cdt), _scalar(bias, cdt)
    kc = k.to(cdt)
    total = torch.zeros((), dtype=cdt, device=q.device)
    dq = torch.empty(q.shape, dtype=cdt, device=q.device) if need_grads else None
    dk = torch.zeros(kc.shape, dtype=cdt, device=q.device) if need_grads else None
    grad_sum = torch.zeros((), dtype=cdt, device=q.device) if need_grads else None
    for lo, hi in _chunks(q.shape[0], chunk, k.shape[0]):
        qc = q[lo:hi].to(cdt)
        logits = torch.addmm(beta, qc * s, kc.T)  # bias added in the GEMM's output pass
        # z = −y·l: the positives' logits negated in place (an O(chunk) diagonal view), so that
        # every pair costs softplus(z) and nothing cancels. Adding softplus(−l) − softplus(l)
        # to a sum over all pairs instead loses a positive's term whenever l ≫ 0 (at B = 1,
        # l = 71.7 that gave 0 for 7e-32).
        if row_offset is not None:
            _positive_columns(logits, lo + row_offset).neg_()
        total += F.softplus(logits).sum()
        if not need_grads:
            continue
        # G = σ(l) − [y = +1] is σ(z) off the diagonal and −σ(−l) = −σ(z) on it: no 1 − σ cancellation.
        grad = logits.sigmoid_()
        if row_offset is not None:
            _positive_columns(grad, lo + row_offset).neg_()
        grad_sum += grad.sum()
        torch.mm(grad, kc, out=dq[lo:hi])
        dk.addmm_(grad.T, qc)
    return total, dq, dk, grad_sum


@torch.no_grad()
def distill_block(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, teacher_q: torch.Tensor,
                  teacher_k: torch.Tensor, teacher_scale: torch.Tensor, chunk: int | None = None, *,
                  need_grads: bool = True):
    """Row-wise KL(teacher ‖ student) of this block and its unscaled student gradients, one pass.

    Student logits l = s·q·kᵀ, teacher logits t = s_t·q_t·k_tᵀ; each row is a softmax over
    the B columns. 4 b×B×D matmuls (student and teacher logits, G·k, Gᵀ·q).

    Args:
        q [b, D], k [B, D], scale: the student's block, columns and s.
        teacher_q [b, D_t], teacher_k [B, D_t], teacher_scale: the teacher's (no gradients).
    Returns:
        kl_sum 0-dim (Σ_i KL_i); with need_grads dq = G·k [b, D] and dk = Gᵀ·q [B, D] where
        G = softmax(l) − softmax(t) row-wise (= dKL/dl); else None, None.
    """
    cdt = compute_dtype(q)
    s, s_t = _scalar(scale, cdt), _scalar(teacher_scale, cdt)
    kc, tkc = k.to(cdt), teacher_k.to(cdt)
    total = torch.zeros((), dtype=cdt, device=q.device)
    dq = torch.empty(q.shape, dtype=cdt, device=q.device) if need_grads else None
    dk = torch.zeros(kc.shape, dtype=cdt, device=q.device) if need_grads else None
    for lo, hi in _chunks(q.shape[0], chunk, k.shape[0]):
        qc = q[lo:hi].to(cdt)
        log_p_student = torch.log_softmax((qc * s) @ kc.T, dim=1)
        log_p_teacher = torch.log_softmax((teacher_q[lo:hi].to(cdt) * s_t) @ tkc.T, dim=1)
        p_teacher = log_p_teacher.exp()
        total += (p_teacher * (log_p_teacher - log_p_student)).sum()
        if not need_grads:
            continue
        grad = log_p_student.exp_().sub_(p_teacher)
        torch.mm(grad, kc, out=dq[lo:hi])
        dk.addmm_(grad.T, qc)
    return total, dq, dk


# Several texts per image. The columns k [M, D] are then every gathered text slot: each has an
# owner (the global row of its image, or −1 for a hard negative) and a validity flag. Row i's
# positives P_i are the valid columns whose owner is row i + row_offset; invalid columns take
# no part in any pair. The block never builds an [b, M] mask: invalid columns are an additive
# −inf column bias folded into the logits GEMM, and the targets (at most K per row) are
# addressed by (row, column) index lists.


def _column_bias(col_valid: torch.Tensor, value: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
    """[M]: `value` on valid columns, −inf on invalid ones (added to every row of the logits)."""
    return torch.where(col_valid.bool(), torch.as_tensor(value, dtype=dtype, device=col_valid.device),
                       torch.tensor(float("-inf"), dtype=dtype, device=col_valid.device))


def owned_targets(owner: torch.Tensor, col_valid: torch.Tensor, row_offset: int, rows: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The (row, column) pairs of this block's positives, sorted by row.

    Args:
        owner: [M] int, the global image row of each column (−1: a negative). col_valid: [M] bool.
        row_offset, rows: this block holds global rows `row_offset : row_offset + rows`.
    Returns: target_rows [n] (block-local rows, ascending) and target_cols [n].
    """
    mine = col_valid.bool() & (owner >= row_offset) & (owner < row_offset + rows)
    cols = mine.nonzero().squeeze(1)
    target_rows = owner[cols] - row_offset
    order = torch.argsort(target_rows, stable=True)
    return target_rows[order], cols[order]


def _chunk_targets(target_rows: torch.Tensor, target_cols: torch.Tensor, bounds: list[int], index: int, lo: int):
    """The targets of chunk `index` (rows lo:…), as chunk-local rows and columns."""
    start, stop = bounds[index], bounds[index + 1]
    return target_rows[start:stop] - lo, target_cols[start:stop]


def _target_bounds(target_rows: torch.Tensor, starts: list[int], rows: int) -> list[int]:
    """Index of each chunk's first target in the row-sorted lists (one host sync for the block)."""
    edges = torch.tensor([*starts, rows], dtype=target_rows.dtype, device=target_rows.device)
    return torch.searchsorted(target_rows, edges).tolist()


@torch.no_grad()
def multi_positive_infonce_stats(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, owner: torch.Tensor,
                                 col_valid: torch.Tensor, row_offset: int, chunk: int | None = None
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax statistics of l = s·q·kᵀ over valid columns (rows) and over this block's rows (columns).

    Args:
        q: [b, D] this block's image rows (global rows row_offset : row_offset + b).
        k: [M, D] every text column. scale: 0-dim or [1], s.
        owner: [M] int64 global image row of each column, −1 for a negative. col_valid: [M] bool.
        chunk: rows per chunk (None: from `CHUNK_ELEMS`).
    Returns:
        row_lse [b]: logsumexp over the valid columns (−inf for every row when none is valid);
        col_ref [M], col_sumexp [M]: as in `infonce_block_stats` for the valid columns (an
            invalid column's sum is 0, its log-sum-exp −inf: it is never used);
        target [M]: l_{o(j) − row_offset, j} for the valid columns owned by this block, 0 elsewhere.
    """
    cdt = compute_dtype(q)
    s = _scalar(scale, cdt)
    kc = k.to(cdt)
    b, m = q.shape[0], k.shape[0]
    row_lse = torch.full((b,), float("-inf"), dtype=cdt, device=q.device)
    col_ref = torch.zeros(m, dtype=cdt, device=q.device)
    col_sum = torch.zeros(m, dtype=cdt, device=q.device)
    target = torch.zeros(m, dtype=cdt, device=q.device)
    col_valid = col_valid.bool()
    if b == 0 or not bool(col_valid.any()):
        return row_lse, col_ref, col_sum, target
    col_ref.fill_(float("-inf"))
    col_bias = _column_bias(col_valid, 0.0, cdt)
    target_rows, target_cols = owned_targets(owner, col_valid, row_offset, b)
    ranges = list(_chunks(b, chunk, m))
    bounds = _target_bounds(target_rows, [lo for lo, _ in ranges], b)
    for index, (lo, hi) in enumerate(ranges):
        qs = q[lo:hi].to(cdt) * s
        logits = torch.addmm(col_bias, qs, kc.T)  # invalid columns −inf
        rows, cols = _chunk_targets(target_rows, target_cols, bounds, index, lo)
        target[cols] = logits[rows, cols]
        row_max = logits.amax(dim=1)  # finite: at least one valid column
        shifted_exp = logits.sub_(row_max[:, None]).exp_()
        row_lse[lo:hi] = row_max + shifted_exp.sum(dim=1).log()
        chunk_max = row_max.max()
        chunk_sum = torch.exp(row_max - chunk_max) @ shifted_exp
        del logits, shifted_exp
        chunk_ref = chunk_max.expand(m).clone()
        underflowed = ((chunk_sum < _SHARED_REFERENCE_FLOOR) & col_valid).nonzero().squeeze(1)
        if underflowed.numel():
            exact = qs @ kc[underflowed].T
            exact_max = exact.amax(dim=0)
            chunk_ref[underflowed] = exact_max
            chunk_sum[underflowed] = exact.sub_(exact_max).exp_().sum(dim=0)
        new_ref = torch.maximum(col_ref, chunk_ref)
        col_sum = col_sum * torch.exp(col_ref - new_ref) + chunk_sum * torch.exp(chunk_ref - new_ref)
        col_ref = new_ref
    return row_lse, col_ref, col_sum, target


def _log_coefficient_shift(lse: torch.Tensor, coef: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
    """lse − log(coef): exp(l − shift) = coef·exp(l − lse). A zero coefficient (or an unused −inf
    log-sum-exp) gives +inf, so its whole row/column of the gradient is exactly 0, never NaN."""
    lse, coef = lse.to(cdt), coef.to(cdt)
    return torch.where(coef > 0, torch.nan_to_num(lse, neginf=0.0) - coef.log(),
                       torch.tensor(float("inf"), dtype=cdt, device=lse.device))


@torch.no_grad()
def multi_positive_infonce_grads(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, owner: torch.Tensor,
                                 col_valid: torch.Tensor, row_offset: int, row_lse: torch.Tensor,
                                 col_lse: torch.Tensor, row_coef: torch.Tensor, col_coef: torch.Tensor,
                                 chunk: int | None = None, *, need_q: bool = True, need_k: bool = True
                                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Unscaled gradients of Σ_i a_i·ℓ_i + Σ_j c_j·ℓ_j (the multi-positive InfoNCE) for this block.

    G_ij = a_i (P^row_ij − [j∈P_i]/|P_i|) + c_j (P^col_ij − [i = o(j)]) = dL/dl_ij, with
    P^row_ij = exp(l_ij − row_lse_i) on valid columns (0 on invalid ones) and
    P^col_ij = exp(l_ij − col_lse_j), col_lse the *global* column log-sum-exp over all images.

    Args:
        q [b, D], k [M, D], scale, owner [M], col_valid [M], row_offset, chunk: as in
            `multi_positive_infonce_stats`.
        row_lse: [b] the rows' complete log-sum-exp (own-scope negatives merged in by the caller).
        col_lse: [M] merged over every block of the global batch.
        row_coef: [b] a_i (0 for a row with no valid positive); col_coef: [M] c_j (0 for invalid
            columns and negatives).
    Returns: dq = G·k [b, D] and dk = Gᵀ·q [M, D] (None where not needed), NOT multiplied by s.
    """
    cdt = compute_dtype(q)
    s = _scalar(scale, cdt)
    kc = k.to(cdt)
    b, m = q.shape[0], k.shape[0]
    dq = torch.zeros(q.shape, dtype=cdt, device=q.device) if need_q else None
    dk = torch.zeros(kc.shape, dtype=cdt, device=q.device) if need_k else None
    if not (need_q or need_k) or b == 0:
        return dq, dk
    col_valid = col_valid.bool()
    row_coef, col_coef = row_coef.to(cdt), col_coef.to(cdt)
    row_shift = _log_coefficient_shift(row_lse, row_coef, cdt)
    col_shift = _log_coefficient_shift(col_lse, col_coef, cdt)
    col_bias = _column_bias(col_valid, 0.0, cdt)
    target_rows, target_cols = owned_targets(owner, col_valid, row_offset, b)
    positives = torch.bincount(target_rows, minlength=b).to(cdt)
    # a_i/|P_i| + c_j at each target (i, j): both directions' one-hot targets, one subtraction.
    target_weight = row_coef[target_rows] / positives[target_rows] + col_coef[target_cols]
    ranges = list(_chunks(b, chunk, m))
    bounds = _target_bounds(target_rows, [lo for lo, _ in ranges], b)
    for index, (lo, hi) in enumerate(ranges):
        qc = q[lo:hi].to(cdt)
        logits = torch.addmm(col_bias, qc * s, kc.T)
        grad = torch.sub(logits, row_shift[lo:hi, None]).exp_()
        grad += logits.sub_(col_shift[None, :]).exp_()
        del logits
        rows, cols = _chunk_targets(target_rows, target_cols, bounds, index, lo)
        grad.index_put_((rows, cols), -target_weight[bounds[index]:bounds[index + 1]], accumulate=True)
        if dq is not None:
            torch.mm(grad, kc, out=dq[lo:hi])
        if dk is not None:
            dk.addmm_(grad.T, qc)
    return dq, dk


@torch.no_grad()
def multi_positive_sigmoid_block(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                                 owner: torch.Tensor, col_valid: torch.Tensor, row_offset: int,
                                 chunk: int | None = None, *, need_grads: bool = True):
    """The multi-positive sigmoid loss of this block and its unscaled gradients, in one pass.

    l = s·q·kᵀ + β; y_ij = +1 where owner_j = i + row_offset, −1 elsewhere; pairs with an
    invalid column are skipped. Negatives are owner −1 columns (−1 against every row).

    Args:
        q [b, D], k [M, D], scale, owner [M], col_valid [M], row_offset, chunk: as in
            `multi_positive_infonce_stats`; bias: β.
    Returns:
        loss_sum 0-dim (Σ_{i, valid j} softplus(−y_ij·l_ij)); with need_grads also dq = G·k [b, D],
        dk = Gᵀ·q [M, D] and grad_sum = Σ G_ij, G_ij = σ(l_ij) − [y_ij = +1] (0 on invalid
        columns); otherwise those three are None.
    """
    cdt = compute_dtype(q)
    s, beta = _scalar(scale, cdt), _scalar(bias, cdt)
    kc = k.to(cdt)
    b, m = q.shape[0], k.shape[0]
    total = torch.zeros((), dtype=cdt, device=q.device)
    dq = torch.zeros(q.shape, dtype=cdt, device=q.device) if need_grads else None
    dk = torch.zeros(kc.shape, dtype=cdt, device=q.device) if need_grads else None
    grad_sum = torch.zeros((), dtype=cdt, device=q.device) if need_grads else None
    if b == 0:
        return total, dq, dk, grad_sum
    # β on valid columns, −inf on invalid ones: softplus(−inf) = σ(−inf) = 0 drops their pairs.
    col_bias = _column_bias(col_valid, beta, cdt)
    target_rows, target_cols = owned_targets(owner, col_valid, row_offset, b)
    ranges = list(_chunks(b, chunk, m))
    bounds = _target_bounds(target_rows, [lo for lo, _ in ranges], b)
    for index, (lo, hi) in enumerate(ranges):
        qc = q[lo:hi].to(cdt)
        logits = torch.addmm(col_bias, qc * s, kc.T)
        rows, cols = _chunk_targets(target_rows, target_cols, bounds, index, lo)
        # z = −y·l, the positives negated in place (see `sigmoid_block`).
        logits[rows, cols] = -logits[rows, cols]
        total += F.softplus(logits).sum()
        if not need_grads:
            continue
        grad = logits.sigmoid_()
        grad[rows, cols] = -grad[rows, cols]
        grad_sum += grad.sum()
        torch.mm(grad, kc, out=dq[lo:hi])
        dk.addmm_(grad.T, qc)
    return total, dq, dk, grad_sum
