"""Plain contrastive loss math: the reference every fast path and every rank split is tested against.

Each `*_block` function computes the share of a global-batch loss owned by one block of
rows, given that block's features and the full (gathered) batch. Summing the blocks over
ranks gives the global loss; with one block holding every row it *is* the global loss.
No collectives here: `clipkit.losses.fused` does the gathering.

Shapes: B global batch, b rows in this block, D feature width. Features are expected
L2-normalized; math runs in the inputs' dtype (callers pass float32 or float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (Radford et al. 2021) over the materialized [B, B] logits.

    Args:
        image, text: [B, D] paired features.
        logit_scale: scalar or [1]; the multiplier s (already exponentiated).
    Returns: scalar, (CE(s·I·Tᵀ, diag) + CE(s·T·Iᵀ, diag)) / 2.
    """
    logits = logit_scale * image @ text.T
    target = torch.arange(image.shape[0], device=image.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def clip_loss_block(image_rows: torch.Tensor, text_rows: torch.Tensor, image_all: torch.Tensor,
                    text_all: torch.Tensor, logit_scale: torch.Tensor, row_offset: int) -> torch.Tensor:
    """This block's share of `clip_loss` over the global batch.

    Args:
        image_rows, text_rows: [b, D], rows `row_offset : row_offset + b` of the global batch.
        image_all, text_all: [B, D], the whole global batch (the block's rows included).
        logit_scale: scalar or [1].
    Returns: scalar; summed over all blocks it equals `clip_loss(image_all, text_all, s)`.
    """
    b, big_b = image_rows.shape[0], image_all.shape[0]
    target = torch.arange(row_offset, row_offset + b, device=image_rows.device)
    image_to_text = F.cross_entropy(logit_scale * image_rows @ text_all.T, target, reduction="sum")
    text_to_image = F.cross_entropy(logit_scale * text_rows @ image_all.T, target, reduction="sum")
    return (image_to_text + text_to_image) / (2 * big_b)


def siglip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor) -> torch.Tensor:
    """Pairwise sigmoid loss (Zhai et al. 2023) over the materialized [B, B] logits.

    Returns: scalar, −Σ_ij log σ(y_ij (s·I_i·T_j + b)) / B with y = +1 on the diagonal, −1 off it.
    """
    return siglip_loss_block(image, text, logit_scale, logit_bias, row_offset=0)


def siglip_loss_block(image_rows: torch.Tensor, text_all: torch.Tensor, logit_scale: torch.Tensor,
                      logit_bias: torch.Tensor, row_offset: int) -> torch.Tensor:
    """This block's share of `siglip_loss`: its image rows against every text.

    Args:
        image_rows: [b, D], rows `row_offset : row_offset + b` of the global batch.
        text_all: [B, D].
    Returns: scalar; summed over all blocks it equals `siglip_loss` on the global batch.
    """
    b, big_b = image_rows.shape[0], text_all.shape[0]
    logits = logit_scale * image_rows @ text_all.T + logit_bias
    # y_ij = 2·[j == i + offset] − 1, built without a [b, B] integer temporary.
    signs = -torch.ones_like(logits)
    rows = torch.arange(b, device=logits.device)
    signs[rows, rows + row_offset] = 1.0
    return -F.logsigmoid(signs * logits).sum() / big_b


def filip_similarity(a_tokens: torch.Tensor, a_mask: torch.Tensor | None, b_tokens: torch.Tensor,
                     b_mask: torch.Tensor | None) -> torch.Tensor:
    """FILIP token-wise late interaction (Yao et al. 2021), materialized.

    S[i, j] = mean over the valid tokens p of a_i of max over the valid tokens q of b_j of
    ⟨a_ip, b_jq⟩. Image→text is `filip_similarity(image, ·, text, ·)`; text→image is
    `filip_similarity(text, ·, image, ·)`, a different matrix (not the transpose).

    Args:
        a_tokens: [n_a, N_a, D]; b_tokens: [n_b, N_b, D] (L2-normalized per token).
        a_mask, b_mask: [n, N] bool (True = a real token) or None (all real). Every sample
            needs at least one real token.
    Returns: [n_a, n_b]. Holds an [n_a, N_a, n_b, N_b] tensor: the oracle for tests only.
    """
    sims = torch.einsum("ipd,jqd->ipjq", a_tokens, b_tokens)
    if b_mask is not None:
        sims = sims.masked_fill(~b_mask[None, None, :, :], float("-inf"))
    best = sims.amax(dim=3)  # [n_a, N_a, n_b]
    if a_mask is None:
        return best.mean(dim=1)
    weights = a_mask.to(best.dtype) / a_mask.sum(dim=1, keepdim=True).to(best.dtype)
    # where(), not a product: a padded token's max can be −inf when b has no real token.
    return torch.where(a_mask[:, :, None], best * weights[:, :, None], 0.0).sum(dim=1)


def contrastive_ce_block(image_to_text: torch.Tensor, text_to_image: torch.Tensor, logit_scale: torch.Tensor,
                         row_offset: int) -> torch.Tensor:
    """This block's share of a symmetric InfoNCE whose two directions are separate matrices.

    Args:
        image_to_text: [b, B] similarities of this block's images to every text;
        text_to_image: [b, B] of this block's texts to every image (FILIP's two matrices).
        logit_scale: scalar or [1]. row_offset: this block's first global row.
    Returns: scalar; summed over all blocks it is the global (CE_i→t + CE_t→i) / 2.
    """
    b, big_b = image_to_text.shape
    target = torch.arange(row_offset, row_offset + b, device=image_to_text.device)
    return (F.cross_entropy(logit_scale * image_to_text, target, reduction="sum")
            + F.cross_entropy(logit_scale * text_to_image, target, reduction="sum")) / (2 * big_b)


def caption_loss(logits: torch.Tensor, labels: torch.Tensor, pad_id: int) -> torch.Tensor:
    """CoCa's captioning loss (Yu et al. 2022): mean next-token cross-entropy over non-pad labels.

    Args:
        logits: [b, L, V] decoder outputs; labels: [b, L] the next tokens, `pad_id` ignored.
    Returns: scalar.
    """
    return F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=pad_id)


def distill_kl_block(student_rows: torch.Tensor, student_all: torch.Tensor, student_scale: torch.Tensor,
                     teacher_rows: torch.Tensor, teacher_all: torch.Tensor, teacher_scale: torch.Tensor
                     ) -> torch.Tensor:
    """Σ over this block's rows of KL(softmax(teacher logits) ‖ softmax(student logits)).

    One direction: rows are (say) images scored against every text. Student logits are
    s·q·kᵀ from `student_rows` [b, D] and `student_all` [B, D]; teacher logits likewise from
    the teacher's features [b, D_t] and [B, D_t] (D_t may differ from D).
    Returns: scalar (a sum over rows; callers divide by B).
    """
    student = F.log_softmax(student_scale * student_rows @ student_all.T, dim=1)
    teacher = F.log_softmax(teacher_scale * teacher_rows @ teacher_all.T, dim=1)
    return F.kl_div(student, teacher, log_target=True, reduction="sum")
