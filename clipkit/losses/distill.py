"""Distillation from a frozen teacher: the student's CLIP loss + KL to the teacher's logits.
Selected by `loss=distill` (the teacher comes from `model.teacher`).

loss = CLIP(student) + distill_weight × (KL_i→t + KL_t→i) / 2, each KL(softmax(teacher
logits) ‖ softmax(student logits)) averaged over the B global rows, with the teacher's
own learned temperature. KL (not open_clip's cross-entropy to the teacher) so that the term
is 0 with a zero gradient when the student equals the teacher; the gradients are the same.
`loss.impl=naive` materializes both [b, B] logit matrices; otherwise the chunked kernels.
"""

from __future__ import annotations

import torch
from torch import nn

from clipkit.losses.fused import check_impl, fused_clip_loss, fused_distill_kl, parse_chunk_size
from clipkit.losses.logit_scale import LogitScale


class DistillLoss(nn.Module):
    needs = ("image", "text", "teacher_image", "teacher_text", "teacher_logit_scale")

    def __init__(self, init_logit_scale: float = 1 / 0.07, max_logit_scale: float = 100.0,
                 learn_logit_scale: bool = True, impl: str = "auto", chunk_size: int | str = "auto",
                 distill_weight: float = 1.0):
        super().__init__()
        check_impl(impl)
        self.impl, self.chunk = impl, parse_chunk_size(chunk_size)
        self.temperature = LogitScale(init_logit_scale, max_logit_scale, learn_logit_scale)
        self.distill_weight = distill_weight

    def kl(self, image: torch.Tensor, text: torch.Tensor, teacher_image: torch.Tensor, teacher_text: torch.Tensor,
           teacher_scale: torch.Tensor) -> torch.Tensor:
        """W × this rank's share of the two-direction mean KL (see the module docstring)."""
        scale, _ = self.temperature()
        return fused_distill_kl(image, text, scale, teacher_image, teacher_text, teacher_scale,
                                impl=self.impl, chunk=self.chunk)

    def forward(self, image: torch.Tensor, text: torch.Tensor, teacher_image: torch.Tensor,
                teacher_text: torch.Tensor, teacher_logit_scale: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Student image/text [b, D], teacher image/text [b, D_t], all L2-normalized;
        teacher_logit_scale: the teacher's s (exponentiated), no gradient."""
        scale, _ = self.temperature()
        contrastive = fused_clip_loss(image, text, scale, impl=self.impl, chunk=self.chunk)
        kl = self.kl(image, text, teacher_image, teacher_text, teacher_logit_scale)
        return contrastive + self.distill_weight * kl, {**self.temperature.metrics(), "distill_kl": kl.detach()}
