"""Softmax InfoNCE with a learnable temperature. Selected by `loss=clip`.

`loss.impl=auto` (the default) runs `clipkit.losses.fused` with the Triton kernels on a
GPU and the chunked PyTorch kernels elsewhere (`chunked` / `triton` force one); neither
holds a [B, B] matrix. `loss.impl=naive` runs the materialized reference in
`clipkit.losses.functional` with differentiable all-gathers: the oracle of the tests.
`loss.chunk_size=auto` (the default) gives the chunked kernels chunks of 2^23 logits
(512 rows at B = 16,384) and Triton 4,096-column gradient blocks; an integer fixes the rows
(chunked) or columns (Triton) instead.

The loss owns its temperature (`clipkit.losses.logit_scale.LogitScale`: init 1/0.07,
capped at 100 as in CLIP); `clipkit.losses.fused` does the cross-rank exchange, so swapping
losses never touches the model.
"""

from __future__ import annotations

import torch
from torch import nn

from clipkit.losses.fused import check_impl, fused_clip_loss, parse_chunk_size
from clipkit.losses.logit_scale import LogitScale


class ClipLoss(nn.Module):
    """Global-batch symmetric InfoNCE, split by rows across ranks.

    Each rank computes the rows of the global [B, B] problem that belong to its local batch
    and returns that share times the world size. DeepSpeed / DDP average gradients over
    ranks, so every parameter (temperature included) receives exactly the single-process
    gradient of the global-batch loss.
    """

    needs = ("image", "text")

    def __init__(self, init_logit_scale: float = 1 / 0.07, max_logit_scale: float = 100.0,
                 learn_logit_scale: bool = True, impl: str = "auto", chunk_size: int | str = "auto"):
        super().__init__()
        check_impl(impl)
        self.impl, self.chunk = impl, parse_chunk_size(chunk_size)
        self.temperature = LogitScale(init_logit_scale, max_logit_scale, learn_logit_scale)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """image, text: [b, D] L2-normalized local features -> (rank loss, metrics)."""
        scale, _ = self.temperature()
        loss = fused_clip_loss(image, text, scale, impl=self.impl, chunk=self.chunk)
        return loss, self.temperature.metrics()
