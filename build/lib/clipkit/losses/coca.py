"""CoCa: contrastive + captioning loss (Yu et al. 2022). Selected by `loss=coca`.

loss = clip_loss_weight × CLIP's InfoNCE on the pooled embeddings (global batch, fused
kernels as in `loss=clip`) + caption_loss_weight × the decoder's next-token cross-entropy,
pad tokens ignored. Published weights: 1 and 2. The caption term is a per-rank mean, so the
gradient mean over ranks averages it like any data-parallel loss.
"""

from __future__ import annotations

import torch

from clipkit.losses.clip import ClipLoss
from clipkit.losses.functional import caption_loss


class CocaLoss(ClipLoss):
    needs = ("image", "text", "caption_logits", "caption_labels")

    def __init__(self, init_logit_scale: float = 1 / 0.07, max_logit_scale: float = 100.0,
                 learn_logit_scale: bool = True, impl: str = "auto", chunk_size: int = 4096,
                 clip_loss_weight: float = 1.0, caption_loss_weight: float = 2.0, pad_id: int = 0):
        super().__init__(init_logit_scale, max_logit_scale, learn_logit_scale, impl=impl, chunk_size=chunk_size)
        self.clip_loss_weight, self.caption_loss_weight, self.pad_id = clip_loss_weight, caption_loss_weight, pad_id

    def forward(self, image: torch.Tensor, text: torch.Tensor, caption_logits: torch.Tensor,
                caption_labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """image, text: [b, D] normalized; caption_logits [b, L, V]; caption_labels [b, L]."""
        contrastive, metrics = super().forward(image, text)
        captioning = caption_loss(caption_logits.float(), caption_labels, self.pad_id)
        loss = self.clip_loss_weight * contrastive + self.caption_loss_weight * captioning
        return loss, {**metrics, "caption_loss": captioning.detach()}
