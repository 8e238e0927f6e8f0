"""The learnable logit scale (inverse temperature) and optional logit bias a loss owns.

Every loss composes one `LogitScale` as its `temperature` submodule, so the objective's
state keys are `loss.temperature.logit_scale` and `loss.temperature.logit_bias`;
`clipkit.checkpoint` maps them to open_clip's model-level `logit_scale` / `logit_bias`.
The values are log-space like open_clip's (s = exp(logit_scale)); the bias is not.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LogitScale(nn.Module):
    """s = exp(t) capped at `max_scale` (CLIP's 100), and a bias β when `init_bias` is given.

    Args:
        init_scale: the initial s (exponentiated, e.g. 1/0.07 for CLIP, 10 for SigLIP).
        max_scale: the cap on s.
        learnable: False freezes t (requires_grad=False).
        init_bias: the initial β, or None for a loss without a bias.
    """

    def __init__(self, init_scale: float, max_scale: float = 100.0, learnable: bool = True,
                 init_bias: float | None = None):
        super().__init__()
        # Shape [1], not 0-dim: DeepSpeed 0.19.8 cannot flatten 0-dim parameters.
        self.logit_scale = nn.Parameter(torch.full([1], math.log(init_scale)), requires_grad=learnable)
        self.logit_bias = None if init_bias is None else nn.Parameter(torch.full([1], float(init_bias)))
        self.max_log_scale = math.log(max_scale)

    def scale(self) -> torch.Tensor:
        """s, [1] float32."""
        return self.logit_scale.float().clamp(max=self.max_log_scale).exp()

    def bias(self) -> torch.Tensor:
        """β, [1] float32 (only for a LogitScale built with `init_bias`)."""
        if self.logit_bias is None:
            raise AttributeError("this LogitScale has no bias (built without init_bias)")
        return self.logit_bias.float()

    def forward(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(s [1], β [1] or None): what a loss's forward multiplies and adds to its logits."""
        return self.scale(), None if self.logit_bias is None else self.bias()

    def metrics(self) -> dict[str, torch.Tensor]:
        """The detached values a loss reports: `logit_scale` (s itself) and `logit_bias`."""
        out = {"logit_scale": self.scale().detach()}
        if self.logit_bias is not None:
            out["logit_bias"] = self.bias().detach()
        return out
