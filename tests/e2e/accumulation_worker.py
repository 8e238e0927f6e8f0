"""Run under torchrun: 3 optimizer steps on fixed global batches of 8, once with
trainer.accum_steps=1 and once with accum_steps=K, each on a freshly seeded engine.

argv: out_path, K, then Hydra overrides (loss=..., model=..., trainer.zero_stage=...).
Rank 0 saves, per K: the step-1 global loss, every parameter's full gradient at step 1 (after
DeepSpeed's reduction, before the optimizer), and every parameter's fp32 value after step 3.
"""

import sys

import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad
from hydra import compose, initialize_config_dir

from clipkit import distributed
from clipkit.accumulation import CachedGradientStep
from clipkit.config import CONF_DIR
from clipkit.recipe import build_engine, build_loss, build_objective, build_towers, init_distributed, seed_everything

GLOBAL_BATCH, STEPS = 8, 3

out_path, accum, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
info = None
results = {}
for k in (1, accum):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"data.global_batch_size={GLOBAL_BATCH}",
                                          f"trainer.accum_steps={k}", "sched.warmup_steps=1"])
    info = info or init_distributed(cfg.launcher)
    seed_everything(cfg.seed)
    bundle = build_towers(cfg.model)
    objective = build_objective(cfg.model, bundle, build_loss(cfg.loss, bundle), max_steps=100, seed=cfg.seed)
    engine = build_engine(objective, optim_cfg=cfg.optim, sched_cfg=cfg.sched, trainer_cfg=cfg.trainer,
                          global_batch_size=GLOBAL_BATCH, world_size=info.world_size)
    step = CachedGradientStep(engine, k) if k > 1 else None
    g = torch.Generator().manual_seed(123)
    b = GLOBAL_BATCH // info.world_size
    rows = slice(info.rank * b, (info.rank + 1) * b)
    torch.manual_seed(7)   # the towers' own randomness (FLIP's patch dropout) starts alike for both K
    for s in range(STEPS):
        images = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g)[rows]
        tokens = torch.randint(1, 49407, (GLOBAL_BATCH, 16), generator=g)[rows]
        if step is None:
            loss, _ = engine({"image": images, "text": tokens})
            engine.backward(loss)
        else:
            loss, _ = step.forward({"image": images, "text": tokens})
            step.backward()
        if s == 0:
            global_loss = float(distributed.all_reduce_mean(loss.detach()))
            grads = {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters() if p.requires_grad}
        if step is None:
            engine.step()
        else:
            step.optimizer_step()
    params = {n: safe_get_full_fp32_param(p) for n, p in engine.module.named_parameters()}
    results[k] = {"loss": global_loss, "grads": {n: g.clone() for n, g in grads.items() if g is not None},
                  "params": {n: p.clone() for n, p in params.items() if p is not None},
                  "lr": engine.get_lr()[0], "global_steps": engine.global_steps}
    del engine, step, objective
if info.rank == 0:
    torch.save(results, out_path)
