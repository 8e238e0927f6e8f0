"""Towers + loss as one module: the thing DeepSpeed wraps, so the loss's temperature and
bias are optimized, clipped, checkpointed and ZeRO-partitioned like every other weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ContrastiveObjective(nn.Module):
    """forward(images [b,3,H,W], tokens [b,L]) -> (loss scalar, metrics of detached scalars).

    `loss` may be None for eval-only use, where only `encode_image`/`encode_text` are called.
    """

    def __init__(self, model: nn.Module, loss: nn.Module | None):
        super().__init__()
        self.model = model
        self.loss = loss

    def _tower_dtype(self) -> torch.dtype:
        # DeepSpeed casts the module for bf16 but not the inputs.
        return next(self.model.parameters()).dtype

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """[b,3,H,W] -> [b,D] float32, L2-normalized (the loss math always runs in fp32)."""
        return F.normalize(self.model.encode_image(images.to(self._tower_dtype())).float(), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """[b,L] long -> [b,D] float32, L2-normalized."""
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        loss, metrics = self.loss(self.encode_image(images), self.encode_text(tokens))
        return loss, metrics
