"""CoCa: contrastive + captioning loss (Yu et al. 2022). Selected by `loss=coca`.

loss = clip_loss_weight × CLIP's InfoNCE on the pooled embeddings (global batch, fused
kernels as in `loss=clip`) + caption_loss_weight × the decoder's next-token cross-entropy,
pad tokens ignored. Published weights: 1 and 2. The caption term is a per-rank mean, so the
gradient mean over ranks averages it like any data-parallel loss.
"""

from __future__ import annotations

import torch
from torch import nn

from clipkit.losses.functional import caption_loss
from clipkit.losses.fused import check_impl, fused_clip_loss, parse_chunk_size
from clipkit.losses.logit_scale import LogitScale


class CocaLoss(nn.Module):
    needs = ("image", "text", "caption_logits", "caption_labels")

    def __init__(self, init_logit_scale: float = 1 / 0.07, max_logit_scale: float = 100.0,
                 learn_logit_scale: bool = True, impl: str = "auto", chunk_size: int | str = "auto",
                 clip_loss_weight: float = 1.0, caption_loss_weight: float = 2.0, pad_id: int = 0):
        super().__init__()
        check_impl(impl)
        self.impl, self.chunk = impl, parse_chunk_size(chunk_size)
        self.temperature = LogitScale(init_logit_scale, max_logit_scale, learn_logit_scale)
        self.clip_loss_weight, self.caption_loss_weight, self.pad_id = clip_loss_weight, caption_loss_weight, pad_id

    def forward(self, image: torch.Tensor, text: torch.Tensor, caption_logits: torch.Tensor,
                caption_labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """image, text: [b, D] normalized; caption_logits [b, L, V]; caption_labels [b, L]."""
        scale, _ = self.temperature()
        contrastive = fused_clip_loss(image, text, scale, impl=self.impl, chunk=self.chunk)
        captioning = caption_loss(caption_logits.float(), caption_labels, self.pad_id)
        loss = self.clip_loss_weight * contrastive + self.caption_loss_weight * captioning
        return loss, {**self.temperature.metrics(), "caption_loss": captioning.detach()}
