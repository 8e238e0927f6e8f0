"""FILIP's token-wise late interaction without the [n_a, N_a, n_b, N_b] similarity tensor.

`filip_similarity` (Yao et al. 2021) equals `clipkit.losses.functional.filip_similarity`
in value and in every gradient, but visits (sample block × sample block) tiles sized so a
tile holds at most `block_elems` token-pair similarities, and recomputes each tile in
backward instead of storing argmaxes. Memory: the [n_a, n_b] output plus one tile (and its
gradient) — O(n_a·n_b + block_elems) instead of O(n_a·N_a·n_b·N_b).
Selected by `loss=filip` with `loss.impl=chunked|auto`.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable


def _tile_rows(n_a: int, tokens_a: int, n_b: int, tokens_b: int, block_elems: int) -> tuple[int, int]:
    """(a samples, b samples) per tile with tile size ≤ block_elems (at least 1 × 1)."""
    per_pair = tokens_a * tokens_b
    cols = max(1, min(n_b, int(math.sqrt(block_elems / per_pair))))
    rows = max(1, min(n_a, block_elems // (per_pair * cols)))
    return rows, cols


def _tile_max(a: torch.Tensor, b: torch.Tensor, b_mask: torch.Tensor | None):
    """Per a-token max over b's real tokens: values and indices, each [r, N_a, c]."""
    sims = torch.einsum("ipd,jqd->ipjq", a, b)
    if b_mask is not None:
        sims.masked_fill_(~b_mask[None, None], float("-inf"))
    return sims.max(dim=3)


def _token_weights(mask: torch.Tensor | None, n: int, tokens: int, dtype, device) -> torch.Tensor:
    """[n, N]: 1/(real tokens) on real tokens, 0 on padding (the masked mean's weights)."""
    if mask is None:
        return torch.full((n, tokens), 1.0 / tokens, dtype=dtype, device=device)
    m = mask.to(dtype)
    return m / m.sum(dim=1, keepdim=True)


class _FilipSimilarity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, a_mask, b, b_mask, block_elems):
        n_a, tokens_a, _ = a.shape
        n_b, tokens_b, _ = b.shape
        rows, cols = _tile_rows(n_a, tokens_a, n_b, tokens_b, block_elems)
        weights = _token_weights(a_mask, n_a, tokens_a, a.dtype, a.device)
        out = torch.empty(n_a, n_b, dtype=a.dtype, device=a.device)
        with torch.no_grad():
            for i in range(0, n_a, rows):
                w = weights[i:i + rows, :, None]
                for j in range(0, n_b, cols):
                    best, _ = _tile_max(a[i:i + rows], b[j:j + cols], None if b_mask is None else b_mask[j:j + cols])
                    # where(), not w·best alone: padded a-tokens may face −inf, and 0·−inf is NaN.
                    out[i:i + rows, j:j + cols] = torch.where(w > 0, best * w, 0.0).sum(dim=1)
        ctx.save_for_backward(a, b, weights, b_mask)
        ctx.tiles = (rows, cols)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        a, b, weights, b_mask = ctx.saved_tensors
        rows, cols = ctx.tiles
        n_b, tokens_b, _ = b.shape
        da = torch.zeros_like(a) if ctx.needs_input_grad[0] else None
        db = torch.zeros_like(b) if ctx.needs_input_grad[2] else None
        for i in range(0, a.shape[0], rows):
            a_tile, w = a[i:i + rows], weights[i:i + rows]
            for j in range(0, n_b, cols):
                b_tile = b[j:j + cols]
                _, idx = _tile_max(a_tile, b_tile, None if b_mask is None else b_mask[j:j + cols])
                # dS[i,j]·w_ip lands on the one b-token q* that won the max: a sparse
                # [r, N_a, c, N_b] weight tensor, so both gradients are plain matmuls.
                coef = grad_out[i:i + rows, None, j:j + cols] * w[:, :, None]
                hits = torch.zeros(*idx.shape, tokens_b, dtype=a.dtype, device=a.device)
                hits.scatter_(3, idx[..., None], coef[..., None])
                if da is not None:
                    da[i:i + rows] += torch.einsum("ipjq,jqd->ipd", hits, b_tile)
                if db is not None:
                    db[j:j + cols] += torch.einsum("ipjq,ipd->jqd", hits, a_tile)
        return da, None, db, None, None


def filip_similarity(a_tokens: torch.Tensor, a_mask: torch.Tensor | None, b_tokens: torch.Tensor,
                     b_mask: torch.Tensor | None, block_elems: int = 1 << 22) -> torch.Tensor:
    """S[i, j] = masked mean over a_i's tokens of the max over b_j's real tokens of ⟨a_ip, b_jq⟩.

    Args:
        a_tokens: [n_a, N_a, D]; b_tokens: [n_b, N_b, D].
        a_mask, b_mask: [n, N] bool (True = real token) or None. Padded b-tokens never win a
            max and padded a-tokens carry no weight, so their values cannot change S.
        block_elems: token-pair similarities per tile (default 4M: 16 MB in fp32).
    Returns: [n_a, n_b] in the inputs' dtype.
    """
    if block_elems < 1:
        raise ValueError(f"block_elems must be >= 1, got {block_elems}")
    return _FilipSimilarity.apply(a_tokens, a_mask, b_tokens, b_mask, block_elems)
