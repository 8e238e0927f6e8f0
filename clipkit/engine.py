"""Renders the DeepSpeed config from `trainer:`/`optim:`/`sched:` and calls `deepspeed.initialize`.

There is no DeepSpeed JSON to keep in sync: batch sizes, ZeRO stage, precision and
clipping come from the Hydra config. The optimizer is a client `torch.optim.AdamW` with
torch's fused kernel (DeepSpeed's fused Adam would compile a C++ op for minutes on a fresh
machine).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from clipkit.errors import ClipkitConfigError


def render_deepspeed_config(*, global_batch_size: int, world_size: int, zero_stage: int,
                            precision: str, grad_clip: float | None, accum_steps: int = 1,
                            load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed config dict for one run: one optimizer step per global batch, reached in
    `accum_steps` micro-batches per rank (`clipkit.accumulation`). `load_universal`: the run
    resumes a ZeRO checkpoint written by another number of ranks (`clipkit.checkpoint`)."""
    if accum_steps < 1:
        raise ClipkitConfigError(f"trainer.accum_steps must be >= 1, got {accum_steps}")
    if global_batch_size % (world_size * accum_steps):
        raise ClipkitConfigError(
            f"data.global_batch_size={global_batch_size} is not divisible by the world size {world_size}"
            + (f" x trainer.accum_steps={accum_steps}" if accum_steps > 1 else ""))
    if accum_steps > 1 and zero_stage == 3:
        # ZeRO-3 gathers partitioned weights inside each engine forward; the loss step between
        # the cached forwards reads the loss's own (partitioned) temperature outside of one.
        raise ClipkitConfigError("trainer.accum_steps > 1 runs at ZeRO 0-2; ZeRO-3 is not supported with it "
                                 "(the loss's temperature is read outside an engine forward)")
    if precision not in ("fp32", "bf16"):
        raise ClipkitConfigError(f"trainer.precision={precision!r}; use fp32 or bf16")
    if zero_stage not in (0, 1, 2, 3):
        raise ClipkitConfigError(f"trainer.zero_stage={zero_stage}; use 0, 1, 2 or 3")
    config = {
        "train_batch_size": global_batch_size,
        "train_micro_batch_size_per_gpu": global_batch_size // (world_size * accum_steps),
        "gradient_accumulation_steps": accum_steps,
        "gradient_clipping": float(grad_clip or 0.0),
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 2**31 - 1,  # clipkit logs itself
        "wall_clock_breakdown": False,
        # A torch optimizer is passed in; ZeRO-Offload must not swap it for cpu_adam.
        "zero_force_ds_cpu_optimizer": False,
    }
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    return config


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices only; biases, norms, embeddings' gains and
    learnable scalars (temperature, bias: shape [1]) are exempt, as in CLIP and open_clip."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or "norm" in name or ".ln" in name or name.startswith("ln") or "bias" in name
        (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(module: nn.Module, *, lr: float, weight_decay: float,
                    betas: tuple[float, float], eps: float) -> torch.optim.Optimizer:
    """AdamW over `param_groups`, with torch's fused kernel where it has one.

    The fused kernel updates each tensor in one pass. On CPU torch's default is a loop of about
    a dozen ops per tensor: DeepSpeed's optimizer step took 41 ms of the tiny CLIP's 140 ms step
    (batch 128; its 49408 x 128 token embedding is most of the 7.2M parameters) and 9.5 ms fused;
    388 and 150 ms of ViT-B-32's 9.3 s step at batch 32. The update is the same AdamW up to float
    rounding. A torch without the kernel for these tensors gets the default.
    """
    groups = param_groups(module, weight_decay)
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=True)
    except RuntimeError:   # no fused kernel for this device or dtype
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)


def _fp16_optimizer_master(optimizer: Any, param: torch.Tensor) -> torch.Tensor | None:
    """`param`'s fp32 master inside DeepSpeed's FP16 optimizers, which bf16/fp16 at ZeRO 0 uses (no
    public accessor reaches it): a slice of `fp32_groups_flat` (FP16_Optimizer, for DeepSpeed's fused
    optimizers) or the matching tensor of `fp32_groups` (FP16_UnfusedOptimizer, for a torch one).
    None under any other optimizer."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if not isinstance(optimizer, (FP16_Optimizer, FP16_UnfusedOptimizer)):
        return None
    for i, group in enumerate(optimizer.fp16_groups):
        offset = 0
        for j, p in enumerate(group):
            if p is param:
                if isinstance(optimizer, FP16_Optimizer):
                    return optimizer.fp32_groups_flat[i].narrow(0, offset, p.numel()).view(p.shape)
                return optimizer.fp32_groups[i][j]
            offset += p.numel()
    return None


def fp32_master(engine: Any, param: torch.Tensor) -> torch.Tensor:
    """The full fp32 value the optimizer steps for `param`: its master copy under bf16 or ZeRO 1-3,
    else the parameter itself. Collective under ZeRO 1-3 (every rank must call it)."""
    from deepspeed.utils import safe_get_full_fp32_param

    view = _fp16_optimizer_master(engine.optimizer, param)
    if view is not None:
        return view
    master = safe_get_full_fp32_param(param)
    return param.detach() if master is None else master


@torch.no_grad()
def cap_logit_scales(engine: Any) -> None:
    """After an optimizer step: clamps every learnable `LogitScale` to its cap where the optimizer
    keeps it, on every rank (a collective under ZeRO 1-3).

    Under ZeRO >= 1 or bf16 the optimizer steps an fp32 master copy of t and overwrites the
    module's t from it, so the loss's in-place clamp never reaches the master, which would walk
    above the cap while the loss pushes up and then need as many steps to come back before s
    could move again. This is open_clip's clamp after the optimizer step, applied to the master:
    through DeepSpeed's public accessors at ZeRO 1-3 (`safe_get_full_fp32_param` all-reduces or
    all-gathers one element), in DeepSpeed's fp16 optimizer's copy at ZeRO 0.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    from clipkit.losses.logit_scale import LogitScale

    for scale in engine.module.modules():
        if not (isinstance(scale, LogitScale) and scale.logit_scale.requires_grad):
            continue
        param, cap = scale.logit_scale, scale.cap_in(torch.float32)
        view = _fp16_optimizer_master(engine.optimizer, param)
        if view is not None:
            view.clamp_(max=cap)
        else:
            master = safe_get_full_fp32_param(param)   # None where the parameter is the master
            if master is not None and bool((master > cap).any()):
                safe_set_full_fp32_param(param, master.clamp(max=cap))
        scale.clamp_()


def cosine_with_warmup(optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                       min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 to the base lr, then cosine down to `min_lr_ratio`·lr at `total_steps`."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def constant_with_warmup(optimizer: torch.optim.Optimizer, *, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 to the base lr, then the base lr for good."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup_steps)))


SCHEDULES = ("cosine", "constant")


def check_schedule(sched_cfg: Any) -> None:
    """A one-line error for an unknown `sched.name`, before any process group exists."""
    if sched_cfg.name not in SCHEDULES:
        raise ClipkitConfigError(f"sched.name={sched_cfg.name!r} is not one of {', '.join(SCHEDULES)}")


def build_schedule(optimizer: torch.optim.Optimizer, sched_cfg: Any, *,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """`sched:` section (`name` cosine | constant, `warmup_steps`, cosine's `min_lr_ratio`) -> scheduler."""
    check_schedule(sched_cfg)
    if sched_cfg.name == "cosine":
        return cosine_with_warmup(optimizer, warmup_steps=sched_cfg.warmup_steps, total_steps=total_steps,
                                  min_lr_ratio=sched_cfg.min_lr_ratio)
    return constant_with_warmup(optimizer, warmup_steps=sched_cfg.warmup_steps)


def initialize_engine(objective: nn.Module, optimizer: torch.optim.Optimizer,
                      scheduler: torch.optim.lr_scheduler.LRScheduler, ds_config: dict[str, Any]):
    """`deepspeed.initialize` on an already-initialized process group; returns the engine."""
    import deepspeed  # heavy import, kept out of config-only code paths

    engine, _, _, _ = deepspeed.initialize(model=objective, optimizer=optimizer,
                                           lr_scheduler=scheduler, config=ds_config)
    if ds_config["zero_optimization"]["stage"] == 0 and engine.dp_world_size == 1:
        # One data-parallel rank: DeepSpeed would still copy every gradient into flat buckets,
        # all-reduce them with itself and copy them back, 5% of the tiny CLIP's CPU step.
        engine.enable_backward_allreduce = False
    return engine
