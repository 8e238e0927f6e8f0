"""The global-batch losses over a batch sharded across ranks: the one place where the losses
meet the collectives, so the loss classes hold only their parameters and options.

`loss.impl=chunked|triton|auto` runs the exact, memory-linear fused losses below;
`loss.impl=naive` runs the materialized reference in `clipkit.losses.functional` on
differentiable all-gathers (the oracle of the tests). FILIP's token exchange is here too.
The block math comes from a kernel set (`clipkit.kernels.chunked_contrastive` or
`clipkit.kernels.triton_contrastive`, same contract); the collectives from
`clipkit.distributed`. Per step and rank, with b local rows and B = W·b global rows:

  CLIP (softmax InfoNCE), 4 b×B×D matmuls:
    forward   all-gather text [B, D] (no autograd); stats pass over this rank's image rows
              against every text; all-reduce the column statistics (max, then the
              rescaled sums: 2B floats) so every rank holds the global column log-sum-exp.
    backward  recompute the block, form G, dI = G·T_all (complete: row i's gradient only
              involves row i's block), dT_all = Gᵀ·I_local and reduce-scatter it, so each
              rank receives the sum over ranks for its own text rows only.
  SigLIP, 3 b×B×D matmuls in one forward pass; dT_all is reduce-scattered there, so only
  [b, D] gradients are kept for backward. `exchange="ring"` does the same arithmetic with
  O(b·D) memory instead of O(B·D): text blocks and their gradient accumulators travel
  round the ranks by point-to-point sends, the next block prefetched while one is scored.
  Multi-positive InfoNCE and sigmoid (several texts per image, `loss=multi_text*`): the same
  schemes over b images × W·b·K text columns, an owner index per column instead of "row i's
  positive is column i"; chunked kernels only (no Triton); see `multi_positive_clip_loss`.

Gradient scaling. Every rank returns W × (its share of the global loss); the shares sum to
the global loss, so the mean over ranks of the returned values is the global loss. Backward
returns W × ∂L_global/∂(this rank's inputs) and W × this rank's part of ∂L/∂s (and ∂L/∂β).
DeepSpeed/DDP then average parameter gradients over ranks, which gives exactly the
single-process gradient of the global-batch loss for tower weights, temperature and bias.
(Inf-CL all-reduces the temperature gradient and then lets the mean divide it again.)
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
from torch.autograd.function import once_differentiable

from clipkit import distributed
from clipkit.errors import ClipkitConfigError
from clipkit.kernels import filip_similarity as tiled_filip_similarity
from clipkit.losses.functional import (
    NEGATIVE_SCOPES,
    clip_loss_block,
    contrastive_ce_block,
    distill_kl_block,
    filip_similarity,
    multi_positive_clip_loss_block,
    multi_positive_siglip_loss_block,
    siglip_loss_block,
)

IMPLS = ("auto", "chunked", "triton", "naive")
KERNEL_MODULES = {
    "chunked": "clipkit.kernels.chunked_contrastive",
    "triton": "clipkit.kernels.triton_contrastive",
}


def check_impl(impl: str) -> None:
    """Fails at build time on an unknown `loss.impl`."""
    if impl not in IMPLS:
        raise ClipkitConfigError(f"loss.impl={impl!r} is not one of {', '.join(IMPLS)}")


def parse_chunk_size(chunk_size: int | str) -> int | None:
    """`loss.chunk_size` as the kernels take it: "auto" -> None (each kernel set's own default:
    a fixed logit budget per chunk for the chunked kernels), an int >= 1 -> itself. Anything
    else fails at build time."""
    if chunk_size == "auto":
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ClipkitConfigError(f"loss.chunk_size must be auto or an integer >= 1, got {chunk_size!r}")
    return chunk_size


def triton_usable(device: torch.device) -> bool:
    """True when the Triton kernels can run on `device` (a CUDA GPU with triton installed,
    or CPU tensors under TRITON_INTERPRET=1)."""
    try:
        module = importlib.import_module(KERNEL_MODULES["triton"])
    except ImportError:
        return False
    return bool(module.triton_available(device))


def resolve_kernels(impl: str, device: torch.device) -> ModuleType:
    """The kernel set for `impl` on `device`: `auto` is Triton on a CUDA GPU where usable, else
    chunked (never the CPU interpreter, which is for tests)."""
    if impl == "auto":
        impl = "triton" if device.type == "cuda" and triton_usable(device) else "chunked"
    if impl == "triton" and not triton_usable(device):
        raise RuntimeError(f"loss.impl=triton needs a CUDA device with triton installed (got {device}); "
                           f"use loss.impl=chunked or auto")
    return importlib.import_module(KERNEL_MODULES[impl])


def _block_layout(local_rows: int, global_rows: int) -> tuple[int, int]:
    """(world size, this rank's first global row); checks that every rank has equal rows."""
    world = distributed.world_size()
    if global_rows != world * local_rows:
        raise ValueError(f"every rank needs the same local batch: {local_rows} rows here, {global_rows} in all")
    return world, distributed.rank() * local_rows


class _FusedInfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, text, scale, kernels, chunk):
        text_all = distributed.all_gather_rows(text)
        b, big_b = image.shape[0], text_all.shape[0]
        world, offset = _block_layout(b, big_b)
        with torch.autocast(image.device.type, enabled=False):
            row_lse, col_ref, col_sum, positives = kernels.infonce_block_stats(
                image.detach(), text_all, scale.detach(), offset, chunk)
            # Merge the per-rank column statistics: the largest reference first, then rescaled sums.
            global_ref = distributed.all_reduce(col_ref, "max")
            col_sum = distributed.all_reduce(col_sum * torch.exp(col_ref - global_ref), "sum")
            col_lse = global_ref + torch.log(col_sum)
        # This rank owns its rows' image→text terms and its own columns' text→image terms.
        share = (row_lse.sum() + col_lse[offset:offset + b].sum() - 2 * positives) / (2 * big_b)
        ctx.save_for_backward(image, text_all, scale, row_lse, col_lse)
        ctx.kernels, ctx.chunk, ctx.world, ctx.offset = kernels, chunk, world, offset
        return share * world

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        image, text_all, scale, row_lse, col_lse = ctx.saved_tensors
        need_i, need_t, need_s = ctx.needs_input_grad[:3]
        with torch.autocast(image.device.type, enabled=False):
            dq, dk = ctx.kernels.infonce_block_grads(
                image.detach(), text_all, scale.detach(), ctx.offset, row_lse, col_lse, ctx.chunk,
                need_q=need_i or need_s, need_k=need_t)
        cdt = row_lse.dtype
        # W × ∂(global loss)/∂(block); see the module docstring.
        coef = grad_out.to(cdt) * ctx.world / (2 * text_all.shape[0])
        s = scale.detach().reshape(()).to(cdt)
        d_image = (dq * (s * coef)).to(image.dtype) if need_i else None
        d_text = (distributed.reduce_scatter_rows(dk) * (s * coef)).to(text_all.dtype) if need_t else None
        # ∂/∂s = ⟨G, I·Tᵀ⟩ = Σ_i I_i·(G·T)_i: an O(b·D) product with the unscaled dI.
        d_scale = ((dq * image.to(cdt)).sum() * coef).reshape(scale.shape).to(scale.dtype) if need_s else None
        return d_image, d_text, d_scale, None, None


def _sigmoid_gathered(image, text, scale, bias, kernels, chunk, need_grads):
    """This rank's rows against the all-gathered texts; text gradients reduce-scattered.

    Returns (loss_sum, dq [b, D], dk [b, D] summed over ranks for this rank's texts, Σ G).
    """
    text_all = distributed.all_gather_rows(text)
    world, offset = _block_layout(image.shape[0], text_all.shape[0])
    total, dq, dk, grad_sum = kernels.sigmoid_block(image, text_all, scale, bias, offset, chunk,
                                                    need_grads=need_grads)
    return total, dq, (distributed.reduce_scatter_rows(dk) if dq is not None else None), grad_sum


def _sigmoid_ring(image, text, scale, bias, kernels, chunk, need_grads):
    """The same four values with O(b·D) memory: text blocks travel round the ring.

    At step t this rank holds the texts of rank r−t and scores them against its images (only
    step 0 has positives). Their gradient accumulator travels one hop behind on a second ring:
    rank r adds its part and passes it on, and after W hops it reaches its owner complete.
    The next text block is received while this one is scored. Never holds more than four
    [b, D] blocks, instead of the gathered [B, D] texts and their [B, D] gradient.
    """
    world, rows = distributed.world_size(), image.shape[0]
    # Unequal blocks would make the receives mismatch (a hang or garbage), so check first.
    low, high = distributed.all_reduce(torch.tensor([-rows, rows], device=image.device), "max").tolist()
    if -low != high:
        raise ValueError(f"every rank needs the same local batch for the ring: {rows} rows here, "
                         f"between {-low} and {high} across ranks")
    block, total, dq_sum, grad_sum, passing = text.detach().contiguous(), 0, None, 0, None
    for step in range(world):
        if step < world - 1:  # prefetch the next block while this one is scored
            incoming = torch.empty_like(block)
            text_ring = distributed.ring_pass(block, incoming)
        # Only the own block (step 0) holds positives; None = every pair is a negative.
        part, dq, dk, g_sum = kernels.sigmoid_block(image, block, scale, bias, 0 if step == 0 else None,
                                                    chunk, need_grads=need_grads)
        total = total + part
        if need_grads:
            dq_sum = dq if dq_sum is None else dq_sum.add_(dq)
            grad_sum = grad_sum + g_sum
            if passing is not None:  # this block's gradient so far, from the rank before
                for handle in passing[0]:
                    handle.wait()
                dk.add_(passing[1])
            arriving = torch.empty_like(dk)
            passing = (distributed.ring_pass(dk, arriving), arriving)
        if step < world - 1:
            for handle in text_ring:
                handle.wait()
            block = incoming
    if not need_grads:
        return total, None, None, None
    for handle in passing[0]:  # the last hop brings this rank's own texts' complete gradient
        handle.wait()
    return total, dq_sum, passing[1], grad_sum


SIGMOID_EXCHANGES = {"gather": _sigmoid_gathered, "ring": _sigmoid_ring}


class _FusedSigmoid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, text, scale, bias, kernels, chunk, exchange):
        world = distributed.world_size()
        big_b = image.shape[0] * world
        need_i, need_t, need_s, need_b = ctx.needs_input_grad[:4]
        with torch.autocast(image.device.type, enabled=False):
            total, dq, dk, grad_sum = SIGMOID_EXCHANGES[exchange if world > 1 else "gather"](
                image.detach(), text, scale.detach(), bias.detach(), kernels, chunk,
                need_grads=need_i or need_t or need_s or need_b)
        if dq is not None:
            cdt = dq.dtype
            coef = world / big_b
            s = scale.detach().reshape(()).to(cdt)
            # The text gradients are complete in forward: only [b, D] is kept for backward.
            d_text = dk * (s * coef) if need_t else None
            d_scale = (dq * image.detach().to(cdt)).sum() * coef if need_s else None
            d_image = dq.mul_(s * coef) if need_i else None
            ctx.save_for_backward(d_image, d_text, d_scale, grad_sum * coef)
        ctx.shapes = (image.dtype, text.dtype, scale.shape, scale.dtype, bias.shape, bias.dtype)
        return total * (world / big_b)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        d_image, d_text, d_scale, d_bias = ctx.saved_tensors
        need_i, need_t, need_s, need_b = ctx.needs_input_grad[:4]
        i_dtype, t_dtype, s_shape, s_dtype, b_shape, b_dtype = ctx.shapes
        g = grad_out.to(d_bias.dtype)
        return ((d_image * g).to(i_dtype) if need_i else None,
                (d_text * g).to(t_dtype) if need_t else None,
                (d_scale * g).reshape(s_shape).to(s_dtype) if need_s else None,
                (d_bias * g).reshape(b_shape).to(b_dtype) if need_b else None,
                None, None, None)


class _FusedDistill(torch.autograd.Function):
    """W × Σ over this rank's rows of KL(teacher ‖ student), one direction (rows vs gathered columns)."""

    @staticmethod
    def forward(ctx, rows, cols, scale, teacher_rows, teacher_cols, teacher_scale, kernels, chunk):
        cols_all = distributed.all_gather_rows(cols)
        teacher_all = distributed.all_gather_rows(teacher_cols)
        world, _ = _block_layout(rows.shape[0], cols_all.shape[0])
        need_r, need_c, need_s = ctx.needs_input_grad[:3]
        with torch.autocast(rows.device.type, enabled=False):
            total, dq, dk = kernels.distill_block(
                rows.detach(), cols_all, scale.detach(), teacher_rows.detach(), teacher_all,
                teacher_scale.detach(), chunk, need_grads=need_r or need_c or need_s)
        if dq is not None:
            s = scale.detach().reshape(()).to(dq.dtype)
            d_cols = distributed.reduce_scatter_rows(dk) * (s * world) if need_c else None
            d_scale = (dq * rows.detach().to(dq.dtype)).sum() * world if need_s else None
            ctx.save_for_backward(dq.mul_(s * world) if need_r else None, d_cols, d_scale)
        ctx.shapes = (rows.dtype, cols.dtype, scale.shape, scale.dtype)
        return total * world

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        d_rows, d_cols, d_scale = ctx.saved_tensors
        r_dtype, c_dtype, s_shape, s_dtype = ctx.shapes
        g = grad_out
        return (None if d_rows is None else (d_rows * g.to(d_rows.dtype)).to(r_dtype),
                None if d_cols is None else (d_cols * g.to(d_cols.dtype)).to(c_dtype),
                None if d_scale is None else (d_scale * g.to(d_scale.dtype)).reshape(s_shape).to(s_dtype),
                None, None, None, None, None)


def naive_clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """`fused_clip_loss` materialized: differentiable all-gathers, then this rank's [b, B] rows of
    both logit matrices (`functional.clip_loss_block`). Same arguments and result."""
    image_all = distributed.all_gather_with_grad(image)
    text_all = distributed.all_gather_with_grad(text)
    world, offset = _block_layout(image.shape[0], image_all.shape[0])
    return clip_loss_block(image, text, image_all, text_all, logit_scale, offset) * world


def fused_clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, *,
                    impl: str = "chunked", chunk: int | None = None) -> torch.Tensor:
    """Symmetric InfoNCE of the global batch, sharded by rows over the process group.

    Args:
        image, text: [b, D] this rank's paired, L2-normalized features (b equal on all ranks).
        logit_scale: 0-dim or [1], the multiplier s (already exponentiated).
        impl: "chunked", "triton" or "auto" (see `resolve_kernels`); "naive" runs `naive_clip_loss`.
        chunk: rows per chunk for the chunked kernels, columns per gradient block for Triton;
            None (`loss.chunk_size=auto`): each kernel set's default (see `parse_chunk_size`).
    Returns:
        0-dim float32 (float64 for float64 inputs): on one process `clip_loss(image, text, s)`;
        on W ranks, W × this rank's share (the mean over ranks is the global loss).
    """
    if impl == "naive":
        return naive_clip_loss(image, text, logit_scale)
    return _FusedInfoNCE.apply(image, text, logit_scale, resolve_kernels(impl, image.device), chunk)


def naive_siglip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                      logit_bias: torch.Tensor) -> torch.Tensor:
    """`fused_siglip_loss` materialized: a differentiable all-gather of the texts, then this
    rank's [b, B] logits (`functional.siglip_loss_block`). Same arguments and result."""
    text_all = distributed.all_gather_with_grad(text)
    world, offset = _block_layout(image.shape[0], text_all.shape[0])
    return siglip_loss_block(image, text_all, logit_scale, logit_bias, offset) * world


def fused_siglip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                      logit_bias: torch.Tensor, *, impl: str = "chunked", chunk: int | None = None,
                      exchange: str = "gather") -> torch.Tensor:
    """Pairwise sigmoid loss of the global batch, sharded like `fused_clip_loss`.

    Args:
        image, text: [b, D] this rank's features. logit_scale, logit_bias: 0-dim or [1].
        impl, chunk: as in `fused_clip_loss` ("naive" runs `naive_siglip_loss`).
        exchange: "gather" (all-gather the texts, reduce-scatter their gradients) or "ring"
            (pass text blocks and their gradients round the ranks: O(b·D) memory, W hops).
    Returns:
        0-dim: on one process `siglip_loss(image, text, s, β)`; on W ranks W × this rank's share.
    """
    if exchange not in SIGMOID_EXCHANGES:
        raise ValueError(f"exchange must be one of {sorted(SIGMOID_EXCHANGES)}, got {exchange!r}")
    if impl == "naive":
        return naive_siglip_loss(image, text, logit_scale, logit_bias)
    return _FusedSigmoid.apply(image, text, logit_scale, logit_bias, resolve_kernels(impl, image.device), chunk,
                               exchange)


def naive_distill_kl(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, teacher_image: torch.Tensor,
                     teacher_text: torch.Tensor, teacher_scale: torch.Tensor) -> torch.Tensor:
    """`fused_distill_kl` materialized: both [b, B] student and teacher logit matrices of this
    rank's rows (`functional.distill_kl_block`). Same arguments and result."""
    teacher_image, teacher_text, teacher_scale = teacher_image.detach(), teacher_text.detach(), teacher_scale.detach()
    image_all, text_all = distributed.all_gather_with_grad(image), distributed.all_gather_with_grad(text)
    t_image_all, t_text_all = distributed.all_gather_rows(teacher_image), distributed.all_gather_rows(teacher_text)
    world = distributed.world_size()
    total = (distill_kl_block(image, text_all, logit_scale, teacher_image, t_text_all, teacher_scale)
             + distill_kl_block(text, image_all, logit_scale, teacher_text, t_image_all, teacher_scale))
    return total * world / (2 * image_all.shape[0])


def fused_distill_kl(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, teacher_image: torch.Tensor,
                     teacher_text: torch.Tensor, teacher_scale: torch.Tensor, *, impl: str = "chunked",
                     chunk: int | None = None) -> torch.Tensor:
    """Mean over both directions and all B global rows of KL(teacher softmax ‖ student softmax).

    Args:
        image, text: [b, D] this rank's student features. logit_scale: the student's s.
        teacher_image, teacher_text: [b, D_t] the frozen teacher's features; teacher_scale its s.
        impl: "naive" runs `naive_distill_kl`; any other impl the chunked kernels on every
            device (4 b×B×D matmuls per direction, never a [b, B] matrix). chunk: their rows per chunk.
    Returns:
        0-dim: on one process (Σ_i KL_i→t + Σ_j KL_t→i) / (2B); on W ranks W × this rank's
        share. Gradients reach the student features and s only.
    """
    if impl == "naive":
        return naive_distill_kl(image, text, logit_scale, teacher_image, teacher_text, teacher_scale)
    kernels = resolve_kernels("chunked", image.device)
    big_b = image.shape[0] * distributed.world_size()
    teacher_image, teacher_text, teacher_scale = teacher_image.detach(), teacher_text.detach(), teacher_scale.detach()
    image_to_text = _FusedDistill.apply(image, text, logit_scale, teacher_image, teacher_text, teacher_scale,
                                        kernels, chunk)
    text_to_image = _FusedDistill.apply(text, image, logit_scale, teacher_text, teacher_image, teacher_scale,
                                        kernels, chunk)
    return (image_to_text + text_to_image) / (2 * big_b)


def late_interaction(a_tokens: torch.Tensor, a_mask: torch.Tensor | None, b_tokens: torch.Tensor,
                     b_mask: torch.Tensor | None, *, impl: str = "chunked", block_elems: int = 1 << 22) -> torch.Tensor:
    """FILIP's [n_a, n_b] token-wise similarity of [n_a, N_a, D] × [n_b, N_b, D] tokens: the
    materialized `functional.filip_similarity` for impl "naive", the tiled kernel (at most
    `block_elems` token pairs at once) otherwise. No collectives (eval calls it too)."""
    if impl == "naive":
        return filip_similarity(a_tokens, a_mask, b_tokens, b_mask)
    return tiled_filip_similarity(a_tokens, a_mask, b_tokens, b_mask, block_elems)


def _gather_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    # Collectives move numbers, not bools (gloo has no bool all-gather).
    return None if mask is None else distributed.all_gather_rows(mask.to(torch.uint8)).bool()


def filip_loss(image_tokens: torch.Tensor, image_mask: torch.Tensor | None, text_tokens: torch.Tensor,
               text_mask: torch.Tensor | None, logit_scale: torch.Tensor, *, impl: str = "chunked",
               block_elems: int = 1 << 22) -> torch.Tensor:
    """FILIP's symmetric InfoNCE on late-interaction similarities of the global batch.

    Token features are all-gathered with autograd (their gradients flow back to the rank
    that produced them) and masks without; each rank scores its images and texts against
    every gathered sample of the other modality (`late_interaction`).

    Args:
        image_tokens: [b, N_img, D], text_tokens: [b, N_txt, D], L2-normalized per token.
        image_mask, text_mask: [b, N] bool (True = real token) or None.
        logit_scale: 0-dim or [1], s. impl, block_elems: as in `late_interaction`.
    Returns: 0-dim; on one process the global loss, on W ranks W × this rank's share.
    """
    image_all = distributed.all_gather_with_grad(image_tokens)
    text_all = distributed.all_gather_with_grad(text_tokens)
    image_mask_all, text_mask_all = _gather_mask(image_mask), _gather_mask(text_mask)
    world, offset = _block_layout(image_tokens.shape[0], image_all.shape[0])
    image_to_text = late_interaction(image_tokens, image_mask, text_all, text_mask_all, impl=impl,
                                     block_elems=block_elems)
    text_to_image = late_interaction(text_tokens, text_mask, image_all, image_mask_all, impl=impl,
                                     block_elems=block_elems)
    return contrastive_ce_block(image_to_text, text_to_image, logit_scale, offset) * world


# Several texts per image: the multi-positive losses over the global batch. Each rank's text
# slots are flattened to columns only here: its [b, K, D] positives, then (scope "all") its
# [b, Kn, D] hard negatives, all-gathered as one [b·(K + Kn), D] block per rank, with the masks
# as uint8 (gloo has no bool collectives). Owners need no exchange: ranks hold equal b and K,
# so rank r's positive slot (n, k) belongs to global image r·b + n. N_img and N_pos come from
# the gathered masks (the same numbers an all-reduce would give, without another collective).
# Own-scope negatives never leave their rank: a [b, Kn] term per row, computed apart.


def multi_positive_kernels(impl: str, device: torch.device) -> ModuleType:
    """The kernel set of the multi-positive losses: the chunked kernels for auto|chunked on every
    device. There are no Triton multi-positive kernels, so impl=triton is refused."""
    if impl == "triton":
        raise ClipkitConfigError("loss.impl=triton: there are no Triton kernels for the multi-positive losses "
                                 "(loss=multi_text*); use loss.impl=auto, chunked or naive")
    check_impl(impl)
    return importlib.import_module(KERNEL_MODULES["chunked"])


def _check_multi_text(image: torch.Tensor, text: torch.Tensor, valid: torch.Tensor, negatives: torch.Tensor | None,
                      negatives_valid: torch.Tensor | None, negative_scope: str) -> None:
    b, d = image.shape
    if text.dim() != 3 or text.shape[0] != b or text.shape[2] != d or tuple(valid.shape) != tuple(text.shape[:2]):
        raise ValueError(f"multi-positive loss needs image [b, D], text [b, K, D] and valid [b, K]; got "
                         f"{tuple(image.shape)}, {tuple(text.shape)}, {tuple(valid.shape)}")
    if negatives is not None and (negatives.dim() != 3 or negatives.shape[0] != b or negatives.shape[2] != d or (
            negatives_valid is not None and tuple(negatives_valid.shape) != tuple(negatives.shape[:2]))):
        raise ValueError(f"hard negatives need [b, Kn, D] features and a [b, Kn] mask; got {tuple(negatives.shape)}"
                         f" and {None if negatives_valid is None else tuple(negatives_valid.shape)}")
    if negative_scope not in NEGATIVE_SCOPES:
        raise ValueError(f"negative_scope must be one of {NEGATIVE_SCOPES}, got {negative_scope!r}")


def _local_columns(text, valid, negatives, negatives_valid, negative_scope):
    """(columns [m, D], column mask [m] bool, own negatives [b, Kn, D] or None, their mask) of this
    rank: m = b·K, plus b·Kn with scope "all". The concatenation is autograd's, so the gradient
    of the columns reaches text and negatives."""
    b, k, d = text.shape
    columns, column_valid = text.reshape(b * k, d), valid.reshape(-1).bool()
    own, own_valid = None, None
    if negatives is not None:
        neg_valid = (torch.ones(negatives.shape[:2], dtype=torch.bool, device=negatives.device)
                     if negatives_valid is None else negatives_valid.bool())
        if negative_scope == "all":
            columns = torch.cat([columns, negatives.reshape(-1, d)])
            column_valid = torch.cat([column_valid, neg_valid.reshape(-1)])
        else:
            own, own_valid = negatives, neg_valid
    return columns, column_valid, own, own_valid


def _gathered_columns(columns, column_valid, b, k):
    """All ranks' columns [W·m, D], masks [W·m], owners [W·m] (global image row, −1 for a
    negative), and the global positive mask [W·b, K]."""
    world, m = distributed.world_size(), columns.shape[0]
    columns_all = distributed.all_gather_rows(columns)
    valid_all = distributed.all_gather_rows(column_valid.to(torch.uint8)).bool()
    local_owner = torch.full((m,), -1, dtype=torch.long, device=columns.device)
    local_owner[:b * k] = torch.arange(b, device=columns.device).repeat_interleave(k)
    ranks = torch.arange(world, device=columns.device)[:, None]
    owner_all = torch.where(local_owner >= 0, local_owner + ranks * b, -1).reshape(-1)
    positives_all = valid_all.reshape(world, m)[:, :b * k].reshape(world * b, k)
    return columns_all, valid_all, owner_all, positives_all


def _own_negative_logits(image, own, own_valid, scale, cdt):
    """[b, Kn] s·⟨v_i, n_ik⟩ of each image with its own negatives (−inf where invalid)."""
    logits = torch.einsum("nd,nkd->nk", image.to(cdt), own.to(cdt)) * scale.reshape(()).to(cdt)
    return logits.masked_fill(~own_valid, float("-inf"))


class _FusedMultiPositiveInfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, columns, own, scale, column_valid, own_valid, k, kernels, chunk):
        b = image.shape[0]
        world, offset = distributed.world_size(), distributed.rank() * b
        with torch.autocast(image.device.type, enabled=False):
            columns_all, valid_all, owner_all, positives_all = _gathered_columns(columns, column_valid, b, k)
            n_img, n_pos = positives_all.any(dim=1).sum(), positives_all.sum()
            row_lse, col_ref, col_sum, target = kernels.multi_positive_infonce_stats(
                image.detach(), columns_all, scale.detach(), owner_all, valid_all, offset, chunk)
            cdt = row_lse.dtype
            global_ref = distributed.all_reduce(col_ref, "max")
            col_sum = distributed.all_reduce(col_sum * torch.exp(col_ref - global_ref), "sum")
            col_lse = global_ref + torch.log(col_sum)
            own_logits = None
            if own is not None:
                own_logits = _own_negative_logits(image.detach(), own.detach(), own_valid, scale.detach(), cdt)
                row_lse = torch.logaddexp(row_lse, own_logits.logsumexp(dim=1))
            # a_i = 1/(2 N_img) for an image with a valid positive, c_j = 1/(2 N_pos) for a valid positive.
            positives = positives_all[offset:offset + b]
            row_coef = positives.any(dim=1).to(cdt) / (2 * n_img.clamp(min=1).to(cdt))
            col_coef = torch.zeros(valid_all.shape, dtype=cdt, device=image.device)
            col_coef[owner_all >= 0] = positives_all.reshape(-1).to(cdt) / (2 * n_pos.clamp(min=1).to(cdt))
            # This rank owns its images' rows and its own texts' columns (whose targets are its rows).
            m = columns.shape[0]
            own_target = target[distributed.rank() * m:][:b * k].reshape(b, k)
            counts = positives.sum(dim=1).clamp(min=1).to(cdt)
            row_terms = row_lse - torch.where(positives, own_target, 0.0).sum(dim=1) / counts
            share = torch.where(row_coef > 0, row_coef * row_terms, 0.0).sum()
            mine = slice(distributed.rank() * m, distributed.rank() * m + b * k)
            share = share + torch.where(col_coef[mine] > 0, col_coef[mine] * (col_lse[mine] - target[mine]), 0.0).sum()
        ctx.save_for_backward(image, columns_all, own, scale, valid_all, owner_all, own_valid, row_lse, col_lse,
                              row_coef, col_coef, own_logits)
        ctx.kernels, ctx.chunk, ctx.world, ctx.offset = kernels, chunk, world, offset
        return share * world

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (image, columns_all, own, scale, valid_all, owner_all, own_valid, row_lse, col_lse, row_coef, col_coef,
         own_logits) = ctx.saved_tensors
        need_i, need_c, need_o, need_s = ctx.needs_input_grad[:4]
        with torch.autocast(image.device.type, enabled=False):
            dq, dk = ctx.kernels.multi_positive_infonce_grads(
                image.detach(), columns_all, scale.detach(), owner_all, valid_all, ctx.offset, row_lse, col_lse,
                row_coef, col_coef, ctx.chunk, need_q=need_i or need_s, need_k=need_c)
            cdt = row_lse.dtype
            d_own = None
            if own is not None:
                # The own-scope negatives' part of row i's softmax: a_i·P^row_ik (no target there).
                # where(): a row with no positive may have no valid column either (−inf − −inf).
                g_own = torch.where(row_coef[:, None] > 0, torch.exp(own_logits - row_lse[:, None]) * row_coef[:, None],
                                    0.0)
                if dq is not None:
                    dq = dq + torch.einsum("nk,nkd->nd", g_own, own.to(cdt))
                d_own = g_own[:, :, None] * image.detach().to(cdt)[:, None, :]
            coef = grad_out.to(cdt) * ctx.world
            s = scale.detach().reshape(()).to(cdt)
            d_image = (dq * (s * coef)).to(image.dtype) if need_i else None
            d_columns = (distributed.reduce_scatter_rows(dk) * (s * coef)).to(columns_all.dtype) if need_c else None
            d_own = (d_own * (s * coef)).to(own.dtype) if need_o else None
            d_scale = (((dq * image.to(cdt)).sum() * coef).reshape(scale.shape).to(scale.dtype) if need_s else None)
        return d_image, d_columns, d_own, d_scale, None, None, None, None, None


class _FusedMultiPositiveSigmoid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, columns, own, scale, bias, column_valid, own_valid, k, kernels, chunk):
        b = image.shape[0]
        world, offset = distributed.world_size(), distributed.rank() * b
        need_i, need_c, need_o, need_s, need_b = ctx.needs_input_grad[:5]
        need_grads = need_i or need_c or need_o or need_s or need_b
        with torch.autocast(image.device.type, enabled=False):
            columns_all, valid_all, owner_all, _ = _gathered_columns(columns, column_valid, b, k)
            total, dq, dk, grad_sum = kernels.multi_positive_sigmoid_block(
                image.detach(), columns_all, scale.detach(), bias.detach(), owner_all, valid_all, offset, chunk,
                need_grads=need_grads)
            cdt = total.dtype
            g_own = None
            if own is not None:  # −1 pairs of each image with its own negatives
                own_logits = _own_negative_logits(image.detach(), own.detach(), own_valid, scale.detach(), cdt)
                own_logits = own_logits + bias.detach().reshape(()).to(cdt)
                total = total + torch.nn.functional.softplus(own_logits).sum()  # softplus(−inf) = 0
                g_own = own_logits.sigmoid()
            coef = world / (b * world)  # W × (1/B)
            if need_grads:
                s = scale.detach().reshape(()).to(cdt)
                if g_own is not None:
                    dq = dq + torch.einsum("nk,nkd->nd", g_own, own.detach().to(cdt))
                    grad_sum = grad_sum + g_own.sum()
                d_columns = distributed.reduce_scatter_rows(dk) * (s * coef) if need_c else None
                d_own = (g_own[:, :, None] * image.detach().to(cdt)[:, None, :]) * (s * coef) if need_o else None
                d_scale = (dq * image.detach().to(cdt)).sum() * coef if need_s else None
                d_image = dq * (s * coef) if need_i else None
                ctx.save_for_backward(d_image, d_columns, d_own, d_scale, grad_sum * coef)
        ctx.shapes = (image.dtype, columns.dtype, None if own is None else own.dtype, scale.shape, scale.dtype,
                      bias.shape, bias.dtype)
        return total * coef

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        d_image, d_columns, d_own, d_scale, d_bias = ctx.saved_tensors
        need_i, need_c, need_o, need_s, need_b = ctx.needs_input_grad[:5]
        i_dtype, c_dtype, o_dtype, s_shape, s_dtype, b_shape, b_dtype = ctx.shapes
        g = grad_out.to(d_bias.dtype)
        return ((d_image * g).to(i_dtype) if need_i else None,
                (d_columns * g).to(c_dtype) if need_c else None,
                (d_own * g).to(o_dtype) if need_o else None,
                (d_scale * g).reshape(s_shape).to(s_dtype) if need_s else None,
                (d_bias * g).reshape(b_shape).to(b_dtype) if need_b else None,
                None, None, None, None, None)


def _gather_negatives(negatives, negatives_valid, negative_scope):
    """Scope "all": every rank's negatives (differentiable) and masks; "own": this rank's."""
    if negatives is None or negative_scope == "own":
        return negatives, negatives_valid
    valid = None if negatives_valid is None else _gather_mask(negatives_valid.bool())
    return distributed.all_gather_with_grad(negatives), valid


def naive_multi_positive_clip_loss(image: torch.Tensor, text: torch.Tensor, valid: torch.Tensor,
                                   logit_scale: torch.Tensor, *, negatives: torch.Tensor | None = None,
                                   negatives_valid: torch.Tensor | None = None,
                                   negative_scope: str = "all") -> torch.Tensor:
    """`multi_positive_clip_loss` materialized: differentiable all-gathers, then this rank's rows
    (`functional.multi_positive_clip_loss_block`). Same arguments and result."""
    image_all = distributed.all_gather_with_grad(image)
    text_all = distributed.all_gather_with_grad(text)
    world, offset = _block_layout(image.shape[0], image_all.shape[0])
    negatives, negatives_valid = _gather_negatives(negatives, negatives_valid, negative_scope)
    return multi_positive_clip_loss_block(image, text, valid, image_all, text_all, _gather_mask(valid.bool()),
                                          logit_scale, offset, negatives=negatives, negatives_valid=negatives_valid,
                                          negative_scope=negative_scope) * world


def multi_positive_clip_loss(image: torch.Tensor, text: torch.Tensor, valid: torch.Tensor,
                             logit_scale: torch.Tensor, *, negatives: torch.Tensor | None = None,
                             negatives_valid: torch.Tensor | None = None, negative_scope: str = "all",
                             impl: str = "auto", chunk: int | None = None) -> torch.Tensor:
    """Multi-positive softmax InfoNCE of the global batch (`functional.multi_positive_clip_loss`),
    sharded by rows over the process group; exact at any world size.

    Args:
        image: [b, D] this rank's L2-normalized image features (b equal on all ranks).
        text: [b, K, D] each image's K positive text slots (K equal on all ranks); valid: [b, K] bool.
        logit_scale: 0-dim or [1], s.
        negatives: [b, Kn, D] hard negatives or None; negatives_valid: [b, Kn] bool or None (all valid).
        negative_scope: "all" (a column of every image's row) | "own" (its own image's row only).
        impl: "auto" | "chunked" (the chunked kernels on every device) | "naive" (materialized,
            `naive_multi_positive_clip_loss`); "triton" is refused (no such kernels).
        chunk: rows per chunk (None: the chunked kernels' default).
    Returns:
        0-dim float32 (float64 for float64 inputs): on one process the global loss; on W ranks
        W × this rank's share (the mean over ranks is the global loss). Gradients reach image,
        text, negatives, and s. K = 1, all valid, no negatives: `fused_clip_loss`.
    """
    _check_multi_text(image, text, valid, negatives, negatives_valid, negative_scope)
    kernels = multi_positive_kernels(impl, image.device)
    if impl == "naive":
        return naive_multi_positive_clip_loss(image, text, valid, logit_scale, negatives=negatives,
                                              negatives_valid=negatives_valid, negative_scope=negative_scope)
    columns, column_valid, own, own_valid = _local_columns(text, valid, negatives, negatives_valid, negative_scope)
    return _FusedMultiPositiveInfoNCE.apply(image, columns, own, logit_scale, column_valid, own_valid,
                                            text.shape[1], kernels, chunk)


def naive_multi_positive_siglip_loss(image: torch.Tensor, text: torch.Tensor, valid: torch.Tensor,
                                     logit_scale: torch.Tensor, logit_bias: torch.Tensor, *,
                                     negatives: torch.Tensor | None = None,
                                     negatives_valid: torch.Tensor | None = None,
                                     negative_scope: str = "all") -> torch.Tensor:
    """`multi_positive_siglip_loss` materialized (`functional.multi_positive_siglip_loss_block` on
    differentiable all-gathers). Same arguments and result."""
    text_all = distributed.all_gather_with_grad(text)
    world, offset = _block_layout(image.shape[0], text_all.shape[0])
    negatives, negatives_valid = _gather_negatives(negatives, negatives_valid, negative_scope)
    return multi_positive_siglip_loss_block(image, text_all, _gather_mask(valid.bool()), logit_scale, logit_bias,
                                            offset, negatives=negatives, negatives_valid=negatives_valid,
                                            negative_scope=negative_scope) * world


def multi_positive_siglip_loss(image: torch.Tensor, text: torch.Tensor, valid: torch.Tensor,
                               logit_scale: torch.Tensor, logit_bias: torch.Tensor, *,
                               negatives: torch.Tensor | None = None, negatives_valid: torch.Tensor | None = None,
                               negative_scope: str = "all", impl: str = "auto",
                               chunk: int | None = None) -> torch.Tensor:
    """Multi-positive sigmoid loss of the global batch (FLAIR's MPS,
    `functional.multi_positive_siglip_loss`), sharded like `multi_positive_clip_loss`.

    Args: as `multi_positive_clip_loss`, plus logit_bias (0-dim or [1], β).
    Returns: 0-dim: on one process the global loss; on W ranks W × this rank's share. Gradients
        reach image, text, negatives, s and β. K = 1, all valid, no negatives: `fused_siglip_loss`.
    """
    _check_multi_text(image, text, valid, negatives, negatives_valid, negative_scope)
    kernels = multi_positive_kernels(impl, image.device)
    if impl == "naive":
        return naive_multi_positive_siglip_loss(image, text, valid, logit_scale, logit_bias, negatives=negatives,
                                                negatives_valid=negatives_valid, negative_scope=negative_scope)
    columns, column_valid, own, own_valid = _local_columns(text, valid, negatives, negatives_valid, negative_scope)
    return _FusedMultiPositiveSigmoid.apply(image, columns, own, logit_scale, logit_bias, column_valid, own_valid,
                                            text.shape[1], kernels, chunk)
