"""Pairwise sigmoid loss with learnable scale and bias. Selected by `loss=siglip`.

Published inits (Zhai et al. 2023): scale 10 (log-space log 10) and bias −10; the
negative bias offsets the B−1 negatives per positive at the start of training.
`loss.impl=auto|chunked|triton` runs `clipkit.losses.fused` (never more than
`loss.chunk_size` × B logits; text gradients reduce-scattered); `loss.impl=naive` the
materialized reference with a differentiable all-gather.

`loss.exchange=ring` (fused impls) swaps the all-gather + reduce-scatter for point-to-point
passes round the ranks, the next text block prefetched while one is scored: the same
numbers with O(b·D) instead of O(B·D) memory per rank, for very large global batches.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from clipkit import distributed
from clipkit.losses.clip import check_impl
from clipkit.losses.functional import siglip_loss_block
from clipkit.errors import ClipkitConfigError
from clipkit.losses.fused import SIGMOID_EXCHANGES, fused_siglip_loss


class SigLipLoss(nn.Module):
    """Global-batch sigmoid loss: each rank scores its image rows against every gathered text.

    The rank's share is multiplied by the world size so that DeepSpeed's gradient mean
    equals the single-process gradient of the global loss.
    """

    needs = ("image", "text")

    def __init__(self, init_logit_scale: float = 10.0, init_logit_bias: float = -10.0,
                 max_logit_scale: float = 100.0, impl: str = "auto", chunk_size: int = 4096,
                 exchange: str = "gather"):
        super().__init__()
        check_impl(impl, chunk_size)
        if exchange not in SIGMOID_EXCHANGES:
            raise ClipkitConfigError(f"loss.exchange={exchange!r} is not one of {', '.join(SIGMOID_EXCHANGES)}")
        if exchange == "ring" and impl == "naive":
            raise ClipkitConfigError("loss.exchange=ring runs the fused losses: use loss.impl=auto|chunked|triton")
        self.impl, self.chunk_size, self.exchange = impl, chunk_size, exchange
        self.logit_scale = nn.Parameter(torch.full([1], math.log(init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.full([1], float(init_logit_bias)))
        self.max_log_scale = math.log(max_logit_scale)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.float().clamp(max=self.max_log_scale).exp()

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """image, text: [b, D] L2-normalized local features -> (rank loss, metrics)."""
        if self.impl == "naive":
            text_all = distributed.all_gather_with_grad(text)
            world, offset = distributed.world_size(), distributed.rank() * image.shape[0]
            loss = siglip_loss_block(image, text_all, self.scale(), self.logit_bias.float(), offset) * world
        else:
            loss = fused_siglip_loss(image, text, self.scale(), self.logit_bias.float(),
                                     impl=self.impl, chunk=self.chunk_size, exchange=self.exchange)
        return loss, {"logit_scale": self.scale().detach(),
                               "logit_bias": self.logit_bias.detach().float()}

    def open_clip_state(self) -> dict[str, torch.Tensor]:
        return {"logit_scale": self.logit_scale.detach().float().reshape(()),
                "logit_bias": self.logit_bias.detach().float().reshape(())}
