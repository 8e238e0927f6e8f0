"""Renders the DeepSpeed config from `trainer:`/`optim:`/`sched:` and calls `deepspeed.initialize`.

There is no DeepSpeed JSON to keep in sync: batch sizes, ZeRO stage, precision and
clipping come from the Hydra config. The optimizer is a client `torch.optim.AdamW`
(DeepSpeed's fused Adam would compile a C++ op for minutes on a fresh machine).
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
    return torch.optim.AdamW(param_groups(module, weight_decay), lr=lr, betas=tuple(betas), eps=eps)


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
    return engine
