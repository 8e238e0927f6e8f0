"""FILIP: contrastive loss on token-wise late interaction (Yao et al. 2021). Selected by `loss=filip`.

Image→text similarity is the mean over image tokens of the max over the text's real tokens;
text→image is the masked mean over text tokens of the max over image tokens. The two are
different matrices, each with its own cross-entropy; with one token per side both reduce to
the dot product and the loss equals CLIP's. `loss.token_keep_ratio` < 1 keeps only each
sample's most similar tokens before the cross-rank gather, as in the paper (25% there).
`loss.impl=chunked|auto` uses the tiled `clipkit.kernels.filip_similarity` (never an
[b, N_img, B, N_txt] tensor); `naive` the materialized reference. The token exchange
(`clipkit.losses.fused.filip_loss`) all-gathers with autograd, so gradients flow back to
the rank that produced the tokens.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from clipkit.errors import ClipkitConfigError
from clipkit.losses.fused import check_impl, filip_loss, late_interaction
from clipkit.losses.logit_scale import LogitScale


def keep_top_tokens(tokens: torch.Tensor, mask: torch.Tensor | None, others: torch.Tensor,
                    others_mask: torch.Tensor | None, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """FILIP's token reduction before the all-gather: keep each sample's top ceil(ratio·N) tokens
    by their max similarity to any real token of any local sample of the other modality.

    Args:
        tokens: [b, N, D]; mask: [b, N] bool or None. others, others_mask: the local batch of
            the other modality, [b, M, D] and [b, M].
    Returns: ([b, K, D] kept tokens in their original order, [b, K] mask). Gradients flow to
        the kept tokens; the selection itself is not differentiated.
    """
    keep = max(1, math.ceil(ratio * tokens.shape[1]))
    mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device) if mask is None else mask
    with torch.no_grad():
        sims = torch.einsum("ipd,jqd->ipjq", tokens, others)
        if others_mask is not None:
            sims.masked_fill_(~others_mask[None, None], float("-inf"))
        score = sims.amax(dim=(2, 3)).masked_fill(~mask, float("-inf"))
        index = score.topk(keep, dim=1).indices.sort(dim=1).values
    kept = tokens.gather(1, index[:, :, None].expand(-1, -1, tokens.shape[2]))
    return kept, mask.gather(1, index)


class FilipLoss(nn.Module):
    """Global-batch FILIP loss split by rows over ranks (W × this rank's share, like ClipLoss)."""

    needs = ("image_tokens", "image_mask", "text_tokens", "text_mask")

    def __init__(self, init_logit_scale: float = 1 / 0.07, max_logit_scale: float = 100.0,
                 learn_logit_scale: bool = True, impl: str = "auto", block_elems: int = 1 << 22,
                 token_keep_ratio: float = 1.0):
        super().__init__()
        if impl == "triton":
            raise ClipkitConfigError("loss=filip has no Triton kernel; use loss.impl=chunked, auto or naive")
        check_impl(impl)
        if block_elems < 1:
            raise ClipkitConfigError(f"loss.block_elems must be >= 1, got {block_elems}")
        if not 0 < token_keep_ratio <= 1:
            raise ClipkitConfigError(f"loss.token_keep_ratio must be in (0, 1], got {token_keep_ratio}")
        self.impl, self.block_elems, self.token_keep_ratio = impl, block_elems, token_keep_ratio
        self.temperature = LogitScale(init_logit_scale, max_logit_scale, learn_logit_scale)

    def similarity(self, a: torch.Tensor, a_mask: torch.Tensor | None, b: torch.Tensor,
                   b_mask: torch.Tensor | None) -> torch.Tensor:
        """[n_a, N_a, D] × [n_b, N_b, D] -> [n_a, n_b] late-interaction scores (eval uses it too)."""
        return late_interaction(a, a_mask, b, b_mask, impl=self.impl, block_elems=self.block_elems)

    def forward(self, image_tokens: torch.Tensor, image_mask: torch.Tensor | None, text_tokens: torch.Tensor,
                text_mask: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """image_tokens [b, N_img, D], text_tokens [b, N_txt, D] (L2-normalized per token);
        masks [b, N] bool (True = real token) or None -> (rank loss, metrics)."""
        if self.token_keep_ratio < 1:
            (image_tokens, image_mask), (text_tokens, text_mask) = (
                keep_top_tokens(image_tokens, image_mask, text_tokens, text_mask, self.token_keep_ratio),
                keep_top_tokens(text_tokens, text_mask, image_tokens, image_mask, self.token_keep_ratio))
        scale, _ = self.temperature()
        loss = filip_loss(image_tokens, image_mask, text_tokens, text_mask, scale, impl=self.impl,
                          block_elems=self.block_elems)
        return loss, self.temperature.metrics()
