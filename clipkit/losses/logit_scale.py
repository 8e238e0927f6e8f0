"""The learnable logit scale (inverse temperature) and optional logit bias a loss owns.

Every loss composes one `LogitScale` as its `temperature` submodule, so the objective's
state keys are `loss.temperature.logit_scale` and `loss.temperature.logit_bias`;
`clipkit.checkpoint` maps them to open_clip's model-level `logit_scale` / `logit_bias`.
The scale is stored in log space like open_clip's (s = exp(logit_scale)); the bias is not.

The cap (`loss.max_logit_scale`, CLIP's 100) keeps the gradient. A plain
`t.clamp(max=log 100).exp()` has a zero gradient at and above the cap, and float32(log 100)
= 4.6051702499 lies above log 100 = 4.6051701860, so a scale that starts at 100 or reaches
it could never come back down. open_clip clamps the parameter in place after each optimizer
step instead. Here, with nothing asked of the trainer:
  * the value is exp(min(t, log max)) with the gradient of exp(t) at that value
    (straight-through), so the scale can always leave the cap. The gradient stays linear in
    the loss, so every rank split still yields the global-batch gradient; a one-sided rule
    ("pass only gradients that lower t") would act per rank before DeepSpeed's mean and not
    on the sum;
  * each forward first clamps t itself in place, so the optimizer cannot walk t above the
    cap while the loss keeps pushing up: open_clip's clamp-after-step, applied when the next
    step reads t.
With DeepSpeed bf16 or ZeRO ≥ 1 the optimizer steps an fp32 master copy and rewrites the
module's copy from it after each step, so the in-place clamp cannot reach the master; the
trainer clamps the master after each optimizer step (`clipkit.engine.cap_logit_scales`).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _compute_dtype(p: torch.Tensor) -> torch.dtype:
    """float32 for 16-bit and float32 parameters, float64 for float64 ones."""
    return torch.promote_types(p.dtype, torch.float32)


class LogitScale(nn.Module):
    """s = exp(t) capped at `max_scale`, and a bias β when `init_bias` is given.

    Args:
        init_scale: the initial s (exponentiated, e.g. 1/0.07 for CLIP, 10 for SigLIP);
            above `max_scale` it starts at the cap (open_clip's first clamp does the same).
        max_scale: the cap on s.
        learnable: False freezes t (requires_grad=False).
        init_bias: the initial β, or None for a loss without a bias.
    """

    def __init__(self, init_scale: float, max_scale: float = 100.0, learnable: bool = True,
                 init_bias: float | None = None):
        super().__init__()
        self.max_log_scale = math.log(max_scale)
        # Shape [1], not 0-dim: DeepSpeed 0.19.8 cannot flatten 0-dim parameters.
        self.logit_scale = nn.Parameter(torch.full([1], min(math.log(init_scale), self.max_log_scale)),
                                        requires_grad=learnable)
        self.logit_bias = None if init_bias is None else nn.Parameter(torch.full([1], float(init_bias)))

    def cap_in(self, dtype: torch.dtype) -> float:
        """log max as the nearest `dtype` value at or above it: rounding to nearest would put a bf16
        t at 4.59375 (s = 98.9) when log 100 is 4.6052; `scale` then caps exactly."""
        cap = torch.tensor(self.max_log_scale, dtype=torch.float64)
        cap_here = cap.to(dtype)
        if cap_here < cap:
            cap_here = torch.nextafter(cap_here, torch.tensor(math.inf, dtype=dtype))
        return float(cap_here)

    @torch.no_grad()
    def clamp_(self) -> None:
        """t ← min(t, cap), the cap rounded *up* to t's dtype (`cap_in`)."""
        self.logit_scale.clamp_(max=self.cap_in(self.logit_scale.dtype))

    def scale(self) -> torch.Tensor:
        """s = exp(min(t, log max)), [1] float32 (float64 for a float64 t), with ∂s/∂t = s
        even at the cap (see the module docstring). Does not modify t."""
        t = self.logit_scale.to(_compute_dtype(self.logit_scale))
        capped = t + (t.detach().clamp(max=self.max_log_scale) - t.detach())
        return capped.exp()

    def bias(self) -> torch.Tensor:
        """β, [1] float32 (float64 for a float64 β); only for a LogitScale built with `init_bias`."""
        if self.logit_bias is None:
            raise AttributeError("this LogitScale has no bias (built without init_bias)")
        return self.logit_bias.to(_compute_dtype(self.logit_bias))

    def forward(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(s [1], β [1] or None) for a loss's forward; clamps t in place first (`clamp_`)."""
        self.clamp_()
        return self.scale(), None if self.logit_bias is None else self.bias()

    def metrics(self) -> dict[str, torch.Tensor]:
        """The detached values a loss reports: `logit_scale` (s itself) and `logit_bias`."""
        out = {"logit_scale": self.scale().detach()}
        if self.logit_bias is not None:
            out["logit_bias"] = self.bias().detach()
        return out
