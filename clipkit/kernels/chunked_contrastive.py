"""Exact contrastive losses that never hold more than a (chunk × B) block of logits.

Drop-in replacements for `clip_loss_block` / `siglip_loss_block` (same arguments plus
`chunk`, same value, same gradients for every input) built from custom
`torch.autograd.Function`s that loop over row blocks. Selected by `loss.impl=chunked`
(or `auto`) in `conf/loss/{clip,siglip}.yaml`.

Cost, counted in B×B×D-sized matmuls (b×B×D for a block of b rows):
  * CLIP, one process (rows are the whole batch): 4. Pass 1 (forward) forms the logits once
    and keeps per-row log-sum-exp plus a running per-column max/sum (online softmax over
    row blocks); pass 2 (backward) recomputes each block, forms the gradient block G and
    does dQ = G·K and dK += Gᵀ·Q. open_clip's ClipLoss does 6 (it builds both I·Tᵀ and T·Iᵀ).
    d(scale) = ⟨G, Q·Kᵀ⟩ is taken as Σ_i q_i·(G·K)_i from the unscaled dQ, an O(B·D)
    product, so it costs no matmul and no extra pass over the [c, B] blocks.
  * CLIP, a block of b < B rows (one rank of many): 6·b·B·D. The two directions are
    different matrices (image_rows·text_allᵀ and text_rows·image_allᵀ), and each row block
    holds whole rows, so each direction's softmax and gradient are complete inside one
    pass: logits, dQ, dK, all in the forward.
  * SigLIP: 3 (logits, dQ, dK) in a single forward pass; every pair's loss and gradient
    is local, so there is nothing to recompute.
Where gradients are formed in the forward they are stored ([b, D] + [B, D], the size of
the inputs) and backward only scales them by the incoming gradient.

Dtypes: logits, statistics and gradient accumulators use float32 for float32/bf16/fp16
inputs (float64 for float64); input gradients come back in the inputs' dtypes.
This module imports nothing from clipkit.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _as_scalar(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return value.detach().reshape(()).to(dtype)


def _no_autocast(fn):
    """Runs a forward/backward with autocast off: under an outer autocast the matmuls would
    otherwise produce bf16/fp16 logits, and the statistics must accumulate in fp32."""
    @functools.wraps(fn)
    def wrapped(ctx, first: torch.Tensor, *args):
        with torch.autocast(first.device.type, enabled=False):
            return fn(ctx, first, *args)
    return wrapped


def _chunks(n: int, chunk: int):
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    for start in range(0, n, chunk):
        yield start, min(start + chunk, n)


class _RowInfoNCE(torch.autograd.Function):
    """Σ_i [logsumexp_j(s·q_i·k_j) − s·q_i·k_{i+offset}] over the rows of `q` (one direction).

    Forward does 3 b×B×D matmuls (logits, dQ, dK) when gradients are needed, 1 otherwise.
    """

    @staticmethod
    @_no_autocast
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, row_offset: int, chunk: int):
        cdt = _compute_dtype(q)
        s = _as_scalar(scale, cdt)
        kc = k.detach().to(cdt)
        need_q, need_k, need_s = ctx.needs_input_grad[:3]
        total = torch.zeros((), dtype=cdt, device=q.device)
        dq = torch.empty(q.shape, dtype=cdt, device=q.device) if (need_q or need_s) else None
        dk = torch.zeros(kc.shape, dtype=cdt, device=q.device) if need_k else None
        for lo, hi in _chunks(q.shape[0], chunk):
            qc = q[lo:hi].detach().to(cdt)
            # Scaling the [c, D] rows rather than the [c, B] logits saves a pass over the block.
            logits = (qc * s) @ kc.T  # fp32 accumulation even for bf16 inputs
            lse = torch.logsumexp(logits, dim=1)
            # Row r of this block is global row lo + offset + r: its positive is that column.
            total += lse.sum() - logits.diagonal(lo + row_offset).sum()
            if dq is None and dk is None:
                continue
            # d(row loss)/d(logits) = softmax − onehot; each block holds whole rows, so the
            # row's normalizer is already final and the gradient is exact here.
            grad = logits.sub_(lse[:, None]).exp_()
            grad.diagonal(lo + row_offset).sub_(1.0)
            if dq is not None:
                torch.mm(grad, kc, out=dq[lo:hi])
            if dk is not None:
                dk.addmm_(grad.T, qc)
        # d/ds = ⟨G, Q·Kᵀ⟩ = Σ_i q_i·(G·K)_i: an O(b·D) product with the unscaled dQ,
        # instead of another pass over every [c, B] block.
        ds = (dq * q.detach().to(cdt)).sum() if need_s else None
        ctx.save_for_backward(dq.mul_(s) if need_q else None, dk.mul_(s) if need_k else None, ds)
        ctx.dtypes = (q.dtype, k.dtype, scale.dtype, scale.shape)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        dq, dk, ds = ctx.saved_tensors
        q_dtype, k_dtype, s_dtype, s_shape = ctx.dtypes
        g = grad_out.detach()
        return (None if dq is None else (dq * g.to(dq.dtype)).to(q_dtype),
                None if dk is None else (dk * g.to(dk.dtype)).to(k_dtype),
                None if ds is None else (ds * g.to(ds.dtype)).reshape(s_shape).to(s_dtype),
                None, None)


class _SymmetricInfoNCE(torch.autograd.Function):
    """Σ_i lse_row_i + Σ_j lse_col_j − 2·Σ_i s·I_i·T_i of the [B, B] logits s·I·Tᵀ.

    The single-process CLIP loss times 2B. Column i of s·I·Tᵀ is row i of s·T·Iᵀ, so the
    text→image normalizers are column statistics of the one matrix: 1 matmul forward,
    3 backward.
    """

    @staticmethod
    @_no_autocast
    def forward(ctx, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, chunk: int):
        cdt = _compute_dtype(image)
        s = _as_scalar(scale, cdt)
        tc = text.detach().to(cdt)
        n = image.shape[0]
        row_lse = torch.empty(n, dtype=cdt, device=image.device)
        col_max = torch.full((n,), float("-inf"), dtype=cdt, device=image.device)
        col_sum = torch.zeros(n, dtype=cdt, device=image.device)
        positives = torch.zeros((), dtype=cdt, device=image.device)
        for lo, hi in _chunks(n, chunk):
            logits = (image[lo:hi].detach().to(cdt) * s) @ tc.T
            row_lse[lo:hi] = torch.logsumexp(logits, dim=1)
            positives += logits.diagonal(lo).sum()
            # Online softmax down the columns: rescale the running sum to the new max.
            new_max = torch.maximum(col_max, logits.amax(dim=0))
            col_sum.mul_(torch.exp(col_max - new_max)).add_(logits.sub_(new_max).exp_().sum(dim=0))
            col_max = new_max
        col_lse = col_max + col_sum.log()
        ctx.save_for_backward(image, text, scale, row_lse, col_lse)
        ctx.chunk = chunk
        return row_lse.sum() + col_lse.sum() - 2 * positives

    @staticmethod
    @once_differentiable
    @_no_autocast
    def backward(ctx, grad_out: torch.Tensor):
        image, text, scale, row_lse, col_lse = ctx.saved_tensors
        need_i, need_t, need_s = ctx.needs_input_grad[:3]
        cdt = row_lse.dtype
        s = _as_scalar(scale, cdt)
        ic_all, tc = image.to(cdt), text.to(cdt)
        n = image.shape[0]
        di = torch.empty(ic_all.shape, dtype=cdt, device=image.device) if (need_i or need_s) else None
        dt = torch.zeros(tc.shape, dtype=cdt, device=image.device) if need_t else None
        for lo, hi in _chunks(n, ctx.chunk):
            ic = ic_all[lo:hi]
            logits = (ic * s) @ tc.T
            # dLoss/dlogits = row softmax + column softmax − 2·I (both directions' targets
            # sit on the diagonal).
            grad = torch.sub(logits, row_lse[lo:hi, None]).exp_()
            grad += logits.sub_(col_lse[None, :]).exp_()
            del logits
            grad.diagonal(lo).sub_(2.0)
            if di is not None:
                torch.mm(grad, tc, out=di[lo:hi])
            if dt is not None:
                dt.addmm_(grad.T, ic)
        g = grad_out.detach().to(cdt)
        # d/ds = ⟨G, I·Tᵀ⟩ = Σ_i I_i·(G·T)_i, from the unscaled dI (no extra pass over G).
        ds = (di * ic_all).sum() * g if need_s else None
        return (di.mul_(s * g).to(image.dtype) if need_i else None,
                dt.mul_(s * g).to(text.dtype) if need_t else None,
                ds.reshape(scale.shape).to(scale.dtype) if need_s else None,
                None)


class _SigmoidPairs(torch.autograd.Function):
    """Σ_ij −log σ(y_ij·(s·q_i·k_j + β)), y = +1 at j = i + offset, −1 elsewhere.

    Forward does 3 b×B×D matmuls (logits, dQ, dK) when gradients are needed, 1 otherwise.
    """

    @staticmethod
    @_no_autocast
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                row_offset: int, chunk: int):
        cdt = _compute_dtype(q)
        s, beta = _as_scalar(scale, cdt), _as_scalar(bias, cdt)
        kc = k.detach().to(cdt)
        need_q, need_k, need_s, need_b = ctx.needs_input_grad[:4]
        total = torch.zeros((), dtype=cdt, device=q.device)
        dq = torch.empty(q.shape, dtype=cdt, device=q.device) if (need_q or need_s) else None
        dk = torch.zeros(kc.shape, dtype=cdt, device=q.device) if need_k else None
        db = torch.zeros((), dtype=cdt, device=q.device)
        for lo, hi in _chunks(q.shape[0], chunk):
            qc = q[lo:hi].detach().to(cdt)
            logits = torch.addmm(beta, qc * s, kc.T)  # bias added in the GEMM's output pass
            # −log σ(−l) = softplus(l) for negatives; positives get −log σ(l) = softplus(−l).
            # Swap the diagonal's term instead of computing softplus(l) − l, which cancels.
            pos = logits.diagonal(lo + row_offset)
            total += F.softplus(logits).sum() - F.softplus(pos).sum() + F.softplus(-pos).sum()
            if dq is None and dk is None and not need_b:
                continue
            # d/dl of softplus(l) is σ(l); of softplus(−l) is σ(l) − 1.
            grad = logits.sigmoid_()
            grad.diagonal(lo + row_offset).sub_(1.0)
            if need_b:
                db += grad.sum()
            if dq is not None:
                torch.mm(grad, kc, out=dq[lo:hi])
            if dk is not None:
                dk.addmm_(grad.T, qc)
        # d/ds = ⟨G, Q·Kᵀ⟩ = Σ_i q_i·(G·K)_i, from the unscaled dQ.
        ds = (dq * q.detach().to(cdt)).sum() if need_s else None
        ctx.save_for_backward(dq.mul_(s) if need_q else None, dk.mul_(s) if need_k else None, ds, db)
        ctx.dtypes = (q.dtype, k.dtype, scale.dtype, scale.shape, bias.dtype, bias.shape)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        dq, dk, ds, db = ctx.saved_tensors
        q_dtype, k_dtype, s_dtype, s_shape, b_dtype, b_shape = ctx.dtypes
        g = grad_out.detach()
        return (None if dq is None else (dq * g.to(dq.dtype)).to(q_dtype),
                None if dk is None else (dk * g.to(dk.dtype)).to(k_dtype),
                None if ds is None else (ds * g.to(ds.dtype)).reshape(s_shape).to(s_dtype),
                (db * g.to(db.dtype)).reshape(b_shape).to(b_dtype) if ctx.needs_input_grad[3] else None,
                None, None)


def chunked_clip_loss(image_rows: torch.Tensor, text_rows: torch.Tensor, image_all: torch.Tensor,
                      text_all: torch.Tensor, logit_scale: torch.Tensor, row_offset: int,
                      chunk: int = 4096) -> torch.Tensor:
    """`clip_loss_block` without the [b, B] logits: the same value and gradients.

    Args:
        image_rows, text_rows: [b, D], rows `row_offset : row_offset + b` of the global batch.
        image_all, text_all: [B, D], the whole global batch (the block's rows included).
        logit_scale: scalar or [1]; the multiplier s (already exponentiated).
        row_offset: index of this block's first row in the global batch.
        chunk: rows per block; peak extra memory is a few (chunk × B) float32 matrices.
    Returns: 0-dim float32 (float64 for float64 inputs); summed over all blocks it equals
        the symmetric InfoNCE of the global batch.

    When the rows are the whole batch (`image_rows is image_all and text_rows is text_all`,
    as on one process) the fused 4-matmul two-pass scheme runs; otherwise each direction
    runs its own single pass (6·b·B·D in all).
    """
    big_b = image_all.shape[0]
    if image_rows is image_all and text_rows is text_all and row_offset == 0:
        return _SymmetricInfoNCE.apply(image_all, text_all, logit_scale, chunk) / (2 * big_b)
    image_to_text = _RowInfoNCE.apply(image_rows, text_all, logit_scale, row_offset, chunk)
    text_to_image = _RowInfoNCE.apply(text_rows, image_all, logit_scale, row_offset, chunk)
    return (image_to_text + text_to_image) / (2 * big_b)


def chunked_siglip_loss(image_rows: torch.Tensor, text_all: torch.Tensor, logit_scale: torch.Tensor,
                        logit_bias: torch.Tensor, row_offset: int, chunk: int = 4096) -> torch.Tensor:
    """`siglip_loss_block` without the [b, B] logits: the same value and gradients.

    Args:
        image_rows: [b, D], rows `row_offset : row_offset + b` of the global batch.
        text_all: [B, D].
        logit_scale, logit_bias: scalar or [1]; s (already exponentiated) and β.
        chunk: rows per block.
    Returns: 0-dim float32 (float64 for float64 inputs), −Σ log σ(y·(s·I·Tᵀ + β)) / B over
        this block's rows.
    """
    total = _SigmoidPairs.apply(image_rows, text_all, logit_scale, logit_bias, row_offset, chunk)
    return total / text_all.shape[0]
