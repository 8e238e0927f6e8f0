"""Pairwise sigmoid loss with learnable scale and bias. Selected by `loss=siglip`.

Published inits (Zhai et al. 2023): scale 10 (log-space log 10) and bias −10; the
negative bias offsets the B−1 negatives per positive at the start of training.
`loss.impl=auto|chunked|triton` runs `clipkit.losses.fused` (one chunk of logits at a time,
sized as for `loss=clip`; text gradients reduce-scattered); `loss.impl=naive` the
materialized reference with a differentiable all-gather.

`loss.exchange=ring` (fused impls) swaps the all-gather + reduce-scatter for point-to-point
passes round the ranks, the next text block prefetched while one is scored: the same
numbers with O(b·D) instead of O(B·D) memory per rank, for very large global batches.
"""

from __future__ import annotations

import torch
from torch import nn

from clipkit.errors import ClipkitConfigError
from clipkit.losses.fused import SIGMOID_EXCHANGES, check_impl, fused_siglip_loss, parse_chunk_size
from clipkit.losses.logit_scale import LogitScale


class SigLipLoss(nn.Module):
    """Global-batch sigmoid loss: each rank scores its image rows against every gathered text.

    The rank's share is multiplied by the world size so that DeepSpeed's gradient mean
    equals the single-process gradient of the global loss.
    """

    needs = ("image", "text")

    def __init__(self, init_logit_scale: float = 10.0, init_logit_bias: float = -10.0,
                 max_logit_scale: float = 100.0, impl: str = "auto", chunk_size: int | str = "auto",
                 exchange: str = "gather"):
        super().__init__()
        check_impl(impl)
        if exchange not in SIGMOID_EXCHANGES:
            raise ClipkitConfigError(f"loss.exchange={exchange!r} is not one of {', '.join(SIGMOID_EXCHANGES)}")
        if exchange == "ring" and impl == "naive":
            raise ClipkitConfigError("loss.exchange=ring runs the fused losses: use loss.impl=auto|chunked|triton")
        self.impl, self.chunk, self.exchange = impl, parse_chunk_size(chunk_size), exchange
        self.temperature = LogitScale(init_logit_scale, max_logit_scale, init_bias=init_logit_bias)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """image, text: [b, D] L2-normalized local features -> (rank loss, metrics)."""
        scale, bias = self.temperature()
        loss = fused_siglip_loss(image, text, scale, bias, impl=self.impl, chunk=self.chunk,
                                 exchange=self.exchange)
        return loss, self.temperature.metrics()
