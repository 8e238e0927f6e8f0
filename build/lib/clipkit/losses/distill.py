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

from clipkit import distributed
from clipkit.losses.clip import ClipLoss
from clipkit.losses.functional import distill_kl_block
from clipkit.losses.fused import fused_distill_kl


class DistillLoss(ClipLoss):
    needs = ("image", "text", "teacher_image", "teacher_text", "teacher_logit_scale")

    def __init__(self, init_logit_scale: float = 1 / 0.07, max_logit_scale: float = 100.0,
                 learn_logit_scale: bool = True, impl: str = "auto", chunk_size: int = 4096,
                 distill_weight: float = 1.0):
        super().__init__(init_logit_scale, max_logit_scale, learn_logit_scale, impl=impl, chunk_size=chunk_size)
        self.distill_weight = distill_weight

    def kl(self, image, text, teacher_image, teacher_text, teacher_scale) -> torch.Tensor:
        """W × this rank's share of the two-direction mean KL (see the module docstring)."""
        teacher_scale = teacher_scale.detach()
        if self.impl != "naive":
            return fused_distill_kl(image, text, self.scale(), teacher_image.detach(), teacher_text.detach(),
                                    teacher_scale, chunk=self.chunk_size)
        image_all, text_all = distributed.all_gather_with_grad(image), distributed.all_gather_with_grad(text)
        t_image_all = distributed.all_gather_rows(teacher_image)
        t_text_all = distributed.all_gather_rows(teacher_text)
        world = distributed.world_size()
        s = self.scale()
        total = (distill_kl_block(image, text_all, s, teacher_image.detach(), t_text_all, teacher_scale)
                 + distill_kl_block(text, image_all, s, teacher_text.detach(), t_image_all, teacher_scale))
        return total * world / (2 * image_all.shape[0])

    def forward(self, image: torch.Tensor, text: torch.Tensor, teacher_image: torch.Tensor,
                teacher_text: torch.Tensor, teacher_logit_scale: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Student image/text [b, D], teacher image/text [b, D_t], all L2-normalized;
        teacher_logit_scale: the teacher's s (exponentiated), no gradient."""
        contrastive, metrics = super().forward(image, text)
        kl = self.kl(image, text, teacher_image, teacher_text, teacher_logit_scale)
        return contrastive + self.distill_weight * kl, {**metrics, "distill_kl": kl.detach()}
