"""Plain contrastive loss math: the reference every fast path and every rank split is tested against.

Each `*_block` function computes the share of a global-batch loss owned by one block of
rows, given that block's features and the full (gathered) batch. Summing the blocks over
ranks gives the global loss; with one block holding every row it *is* the global loss.
No collectives here: `clipkit.losses.clip` / `siglip` do the gathering.

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
