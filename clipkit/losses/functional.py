"""Plain contrastive loss math: the reference every fast path and every rank split is tested against.

Each `*_block` function computes the share of a global-batch loss owned by one block of
rows, given that block's features and the full (gathered) batch. Summing the blocks over
ranks gives the global loss; with one block holding every row it *is* the global loss.
No collectives here: `clipkit.losses.fused` does the gathering.

Shapes: B global batch, b rows in this block, D feature width. Features are expected
L2-normalized; math runs in the inputs' dtype (callers pass float32 or float64).
"""

from __future__ import annotations

import math

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


# Several texts per image: multi-positive InfoNCE, multi-positive sigmoid, hard negatives.
# Notation of the four functions below. B images v_n; per image K positive text slots t_{n,k}
# with a validity mask (invalid slots hold the empty string's features and are ignored);
# optionally Kn hard-negative slots per image with their own mask. Texts are flattened
# image-major: text j = n·K + k has owner o(j) = n; a hard negative has no owner (o = −1).
# l_nj = s·⟨v_n, t_j⟩ (+ β for the sigmoid). negative_scope "all" (NegCLIP): every valid
# negative is a column for every image; "own": a negative of image n is a column of row n only.

NEGATIVE_SCOPES = ("all", "own")


def _check_scope(negative_scope: str) -> None:
    if negative_scope not in NEGATIVE_SCOPES:
        raise ValueError(f"negative_scope must be one of {NEGATIVE_SCOPES}, got {negative_scope!r}")


def _negatives_mask(negatives: torch.Tensor, negatives_valid: torch.Tensor | None) -> torch.Tensor:
    if negatives_valid is None:
        return torch.ones(negatives.shape[:2], dtype=torch.bool, device=negatives.device)
    return negatives_valid.bool()


def _masked_mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """total / count, and 0 when count is 0 (a direction with no valid pair contributes nothing)."""
    return total / count.clamp(min=1).to(total.dtype)


def multi_positive_clip_loss(image: torch.Tensor, text: torch.Tensor, valid: torch.Tensor, logit_scale: torch.Tensor,
                             negatives: torch.Tensor | None = None, negatives_valid: torch.Tensor | None = None,
                             negative_scope: str = "all") -> torch.Tensor:
    """Multi-positive softmax InfoNCE over the whole global batch, materialized ([B, B·K] logits).

    text→image (DreamLIP Eq. 5): every valid positive text j is its own row over the B images,
        ℓ_j = −log softmax_n(l_{·j})[o(j)].
    image→text: image i with valid positives P_i (|P_i| > 0) against every valid text column of
    the batch (all images' valid positives, valid hard negatives in scope), a uniform target
    over its positives,
        ℓ_i = −(1/|P_i|) Σ_{j∈P_i} log softmax_j(l_{i·})[j].
    L = ½ (Σ_i ℓ_i / N_img + Σ_j ℓ_j / N_pos), N_img = images with ≥ 1 valid positive, N_pos =
    valid positive texts (a sum over an empty set counts 0). Hard negatives add columns to
    image→text rows only (no text→image row). K = 1, all valid, no negatives: `clip_loss`.

    Args:
        image: [B, D]; text: [B, K, D]; valid: [B, K] bool; logit_scale: scalar or [1], s.
        negatives: [B, Kn, D] or None; negatives_valid: [B, Kn] bool or None (all valid).
        negative_scope: "all" | "own".
    Returns: scalar.
    """
    _check_scope(negative_scope)
    big_b, k, d = text.shape
    valid = valid.bool()
    columns, column_valid = text.reshape(big_b * k, d), valid.reshape(-1)
    own_logits = None
    if negatives is not None:
        neg_valid = _negatives_mask(negatives, negatives_valid)
        if negative_scope == "all":
            columns = torch.cat([columns, negatives.reshape(-1, d)])
            column_valid = torch.cat([column_valid, neg_valid.reshape(-1)])
        else:
            own_logits = (logit_scale * torch.einsum("nd,nkd->nk", image, negatives)).masked_fill(~neg_valid, -math.inf)
    logits = logit_scale * image @ columns.T  # [B, M]
    row_logits = logits.masked_fill(~column_valid[None, :], -math.inf)
    if own_logits is not None:
        row_logits = torch.cat([row_logits, own_logits], dim=1)
    own_columns = torch.arange(big_b * k, device=image.device).reshape(big_b, k)  # image n's texts: n·K + k
    row_log_prob = F.log_softmax(row_logits, dim=1).gather(1, own_columns)  # [B, K]
    positives = valid.sum(dim=1)
    has_positive = positives > 0
    # where(), not a product: an invalid slot's log-probability is −inf.
    per_image = -torch.where(valid, row_log_prob, 0.0).sum(dim=1)[has_positive] / positives[has_positive]
    col_log_prob = F.log_softmax(logits[:, :big_b * k], dim=0)  # each text's softmax over the B images
    owner = torch.arange(big_b, device=image.device).repeat_interleave(k)
    per_text = -col_log_prob[owner, torch.arange(big_b * k, device=image.device)][valid.reshape(-1)]
    return (_masked_mean(per_image.sum(), has_positive.sum()) + _masked_mean(per_text.sum(), valid.sum())) / 2


def multi_positive_clip_loss_block(image_rows: torch.Tensor, text_rows: torch.Tensor, valid_rows: torch.Tensor,
                                   image_all: torch.Tensor, text_all: torch.Tensor, valid_all: torch.Tensor,
                                   logit_scale: torch.Tensor, row_offset: int, *,
                                   negatives: torch.Tensor | None = None,
                                   negatives_valid: torch.Tensor | None = None,
                                   negative_scope: str = "all") -> torch.Tensor:
    """This block's share of `multi_positive_clip_loss`: its images' image→text rows and its own
    texts' text→image rows, normalized by the counts of the whole batch.

    Args:
        image_rows [b, D], text_rows [b, K, D], valid_rows [b, K]: images `row_offset : row_offset + b`
            of the global batch and their texts.
        image_all [B, D], text_all [B, K, D], valid_all [B, K]: the whole global batch.
        negatives, negatives_valid: scope "all": every image's [B, Kn, D] and [B, Kn];
            scope "own": this block's images' [b, Kn, D] and [b, Kn]; None: no negatives.
    Returns: scalar; summed over all blocks it equals `multi_positive_clip_loss` of the global batch.
    """
    _check_scope(negative_scope)
    b, k, d = text_rows.shape
    big_b = image_all.shape[0]
    valid_rows, valid_all = valid_rows.bool(), valid_all.bool()
    n_img, n_pos = valid_all.any(dim=1).sum(), valid_all.sum()
    columns, column_valid = text_all.reshape(big_b * k, d), valid_all.reshape(-1)
    own_logits = None
    if negatives is not None:
        neg_valid = _negatives_mask(negatives, negatives_valid)
        if negative_scope == "all":
            columns = torch.cat([columns, negatives.reshape(-1, d)])
            column_valid = torch.cat([column_valid, neg_valid.reshape(-1)])
        else:
            own_logits = (logit_scale * torch.einsum("nd,nkd->nk", image_rows, negatives)).masked_fill(~neg_valid,
                                                                                                       -math.inf)
    row_logits = (logit_scale * image_rows @ columns.T).masked_fill(~column_valid[None, :], -math.inf)
    if own_logits is not None:
        row_logits = torch.cat([row_logits, own_logits], dim=1)
    row_log_prob = F.log_softmax(row_logits, dim=1)
    # This block's images' positives are columns (row_offset + r)·K + k of the flattened texts.
    own_columns = (row_offset + torch.arange(b, device=image_rows.device))[:, None] * k + torch.arange(
        k, device=image_rows.device)
    row_log_prob = row_log_prob.gather(1, own_columns)  # [b, K]
    positives = valid_rows.sum(dim=1)
    has_positive = positives > 0
    per_image = -torch.where(valid_rows, row_log_prob, 0.0).sum(dim=1)[has_positive] / positives[has_positive]
    text_log_prob = F.log_softmax(logit_scale * text_rows.reshape(b * k, d) @ image_all.T, dim=1)  # [b·K, B]
    owner = (row_offset + torch.arange(b, device=image_rows.device)).repeat_interleave(k)
    per_text = -text_log_prob.gather(1, owner[:, None]).squeeze(1)[valid_rows.reshape(-1)]
    return (_masked_mean(per_image.sum(), n_img) + _masked_mean(per_text.sum(), n_pos)) / 2


def multi_positive_siglip_loss(image: torch.Tensor, text: torch.Tensor, valid: torch.Tensor,
                               logit_scale: torch.Tensor, logit_bias: torch.Tensor,
                               negatives: torch.Tensor | None = None, negatives_valid: torch.Tensor | None = None,
                               negative_scope: str = "all") -> torch.Tensor:
    """Multi-positive sigmoid loss (FLAIR's MPS) over the whole global batch, materialized.

    L = Σ_n Σ_{valid j} softplus(−y_nj·l_nj) / B (computed as −log σ(y_nj·l_nj)),
    l_nj = s·⟨v_n, t_j⟩ + β, y_nj = +1 iff o(j) = n (an image's own valid texts), −1 otherwise.
    Hard negatives are −1 pairs: with every image (scope "all") or with their own image only
    (scope "own", one term each). K = 1, all valid,
    no negatives: `siglip_loss`.

    Args:
        image [B, D], text [B, K, D], valid [B, K] bool; logit_scale, logit_bias: scalar or [1].
        negatives [B, Kn, D] or None, negatives_valid [B, Kn] bool or None, negative_scope: as in
            `multi_positive_clip_loss`.
    Returns: scalar.
    """
    _check_scope(negative_scope)
    big_b, k, d = text.shape
    logits = logit_scale * image @ text.reshape(big_b * k, d).T + logit_bias  # [B, B·K]
    owner = torch.arange(big_b, device=image.device).repeat_interleave(k)
    signs = torch.where(owner[None, :] == torch.arange(big_b, device=image.device)[:, None], 1.0, -1.0)
    total = torch.where(valid.bool().reshape(1, -1), -F.logsigmoid(signs * logits), 0.0).sum()
    if negatives is not None:
        neg_valid = _negatives_mask(negatives, negatives_valid)
        if negative_scope == "all":
            neg_logits = logit_scale * image @ negatives.reshape(-1, d).T + logit_bias  # [B, B·Kn]
            total = total + torch.where(neg_valid.reshape(1, -1), -F.logsigmoid(-neg_logits), 0.0).sum()
        else:
            own = logit_scale * torch.einsum("nd,nkd->nk", image, negatives) + logit_bias
            total = total + torch.where(neg_valid, -F.logsigmoid(-own), 0.0).sum()
    return total / big_b


def multi_positive_siglip_loss_block(image_rows: torch.Tensor, text_all: torch.Tensor, valid_all: torch.Tensor,
                                     logit_scale: torch.Tensor, logit_bias: torch.Tensor, row_offset: int, *,
                                     negatives: torch.Tensor | None = None,
                                     negatives_valid: torch.Tensor | None = None,
                                     negative_scope: str = "all") -> torch.Tensor:
    """This block's share of `multi_positive_siglip_loss`: its image rows against every text.

    Args:
        image_rows: [b, D], images `row_offset : row_offset + b`. text_all [B, K, D], valid_all [B, K].
        negatives, negatives_valid: as in `multi_positive_clip_loss_block` (scope "all": [B, Kn, ...],
            "own": this block's [b, Kn, ...]).
    Returns: scalar; summed over all blocks it equals `multi_positive_siglip_loss` on the global batch.
    """
    _check_scope(negative_scope)
    b = image_rows.shape[0]
    big_b, k, d = text_all.shape
    logits = logit_scale * image_rows @ text_all.reshape(big_b * k, d).T + logit_bias  # [b, B·K]
    owner = torch.arange(big_b, device=image_rows.device).repeat_interleave(k)
    rows = row_offset + torch.arange(b, device=image_rows.device)
    signs = torch.where(owner[None, :] == rows[:, None], 1.0, -1.0)
    total = torch.where(valid_all.bool().reshape(1, -1), -F.logsigmoid(signs * logits), 0.0).sum()
    if negatives is not None:
        neg_valid = _negatives_mask(negatives, negatives_valid)
        if negative_scope == "all":
            neg_logits = logit_scale * image_rows @ negatives.reshape(-1, d).T + logit_bias
            total = total + torch.where(neg_valid.reshape(1, -1), -F.logsigmoid(-neg_logits), 0.0).sum()
        else:
            own = logit_scale * torch.einsum("nd,nkd->nk", image_rows, negatives) + logit_bias
            total = total + torch.where(neg_valid, -F.logsigmoid(-own), 0.0).sum()
    return total / big_b
