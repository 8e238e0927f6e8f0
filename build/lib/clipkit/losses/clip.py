"""Softmax InfoNCE with a learnable temperature. Selected by `loss=clip`.

`loss.impl=auto` (the default) runs `clipkit.losses.fused` with the Triton kernels on a
GPU and the chunked PyTorch kernels elsewhere (`chunked` / `triton` force one); neither
holds a [B, B] matrix. `loss.impl=naive` runs the materialized reference in
`clipkit.losses.functional` with differentiable all-gathers: the oracle of the tests.

The loss owns its log-temperature (init log(1/0.07), clamped at log(100) as in CLIP)
and handles the cross-rank exchange itself, so swapping losses never touches the model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from clipkit import distributed
from clipkit.errors import ClipkitConfigError
from clipkit.losses.functional import clip_loss_block
from clipkit.losses.fused import fused_clip_loss

IMPLS = ("auto", "chunked", "triton", "naive")


def check_impl(impl: str, chunk_size: int) -> None:
    """Fails at build time on an unknown `loss.impl` or a non-positive `loss.chunk_size`."""
    if impl not in IMPLS:
        raise ClipkitConfigError(f"loss.impl={impl!r} is not one of {', '.join(IMPLS)}")
    if chunk_size < 1:
        raise ClipkitConfigError(f"loss.chunk_size must be >= 1, got {chunk_size}")


class ClipLoss(nn.Module):
    """Global-batch symmetric InfoNCE, split by rows across ranks.

    Each rank computes the rows of the global [B, B] problem that belong to its local batch
    and returns that share times the world size. DeepSpeed / DDP average gradients over
    ranks, so every parameter (temperature included) receives exactly the single-process
    gradient of the global-batch loss.
    """

    needs = ("image", "text")

    def __init__(self, init_logit_scale: float = 1 / 0.07, max_logit_scale: float = 100.0,
                 learn_logit_scale: bool = True, impl: str = "auto", chunk_size: int = 4096):
        super().__init__()
        check_impl(impl, chunk_size)
        self.impl, self.chunk_size = impl, chunk_size
        # Shape [1], not 0-dim: DeepSpeed 0.19.8 cannot flatten 0-dim parameters.
        self.logit_scale = nn.Parameter(torch.full([1], math.log(init_logit_scale)),
                                        requires_grad=learn_logit_scale)
        self.max_log_scale = math.log(max_logit_scale)

    def scale(self) -> torch.Tensor:
        """exp(log-scale) clamped at the max; [1] float32."""
        return self.logit_scale.float().clamp(max=self.max_log_scale).exp()

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """image, text: [b, D] L2-normalized local features -> (rank loss, metrics)."""
        if self.impl != "naive":
            loss = fused_clip_loss(image, text, self.scale(), impl=self.impl, chunk=self.chunk_size)
            return loss, {"logit_scale": self.scale().detach()}
        image_all = distributed.all_gather_with_grad(image)
        text_all = distributed.all_gather_with_grad(text)
        world, offset = distributed.world_size(), distributed.rank() * image.shape[0]
        share = clip_loss_block(image, text, image_all, text_all, self.scale(), offset)
        return share * world, {"logit_scale": self.scale().detach()}

    def open_clip_state(self) -> dict[str, torch.Tensor]:
        """The entries open_clip keeps on the model (0-dim `logit_scale`, log-space)."""
        return {"logit_scale": self.logit_scale.detach().float().reshape(())}
