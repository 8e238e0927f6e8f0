"""Run under torchrun: 3 optimizer steps on fixed global batches of 8, once with
trainer.accum_steps=1 and once with accum_steps=K, each on a freshly seeded engine.

argv: out_path, K, then Hydra overrides (loss=..., model=..., trainer.zero_stage=...).
With text roles (`data.texts`, e.g. data=digits_captions) each batch is a role batch: per role r,
`text_<r>` [b, K_r, L_r] tokens shaped like a tokenizer's (start, words, end, pads: every length,
so micro-batches trim the tower to other lengths than the whole batch) and `text_<r>_valid`
[b, K_r]: the first slot of a required role always valid, the others random; an optional role
also gets all-False rows. Invalid slots hold the tokens of the empty string, as the loader's do.
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
from clipkit.data.texts import roles_from_config
from clipkit.recipe import (
    build_engine,
    build_loss,
    build_objective,
    build_towers,
    init_distributed,
    model_text_context,
    seed_everything,
)

GLOBAL_BATCH, STEPS = 8, 3
SOT, EOT, WORDS = 49406, 49407, 49405   # the CLIP tokenizer's start and end ids; word ids below them


def role_batch(role, context: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One role's [GLOBAL_BATCH, K, L] tokens and [GLOBAL_BATCH, K] valid mask (see the docstring)."""
    k, length = role.k, role.context_length or context
    valid = torch.rand(GLOBAL_BATCH, k, generator=g) < 0.6
    if role.required:
        valid[:, 0] = True
    else:
        valid[::3] = False   # every third image has none of this role's texts
    ends = torch.randint(1, length, (GLOBAL_BATCH, k), generator=g)   # the end token's position
    tokens = torch.randint(1, WORDS, (GLOBAL_BATCH, k, length), generator=g)
    tokens[..., 0] = SOT
    tokens = tokens.scatter(-1, ends[..., None], EOT)
    tokens[torch.arange(length) > ends[..., None]] = 0
    tokens[~valid] = torch.tensor([SOT, EOT] + [0] * (length - 2))   # the empty string
    return tokens, valid


def make_batch(roles, context: int, g: torch.Generator, rows: slice) -> dict[str, torch.Tensor]:
    """This rank's rows of one global batch: image and `text` [B,16], or image and every role's tensors."""
    batch = {"image": torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g)}
    if roles is None:
        batch["text"] = torch.randint(1, 49407, (GLOBAL_BATCH, 16), generator=g)
    for role in roles or ():
        batch[f"text_{role.name}"], batch[f"text_{role.name}_valid"] = role_batch(role, context, g)
    return {name: value[rows] for name, value in batch.items()}


out_path, accum, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
info = None
results = {}
for k in (1, accum):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"data.global_batch_size={GLOBAL_BATCH}",
                                          f"trainer.accum_steps={k}", "sched.warmup_steps=1"])
    info = info or init_distributed(cfg.launcher)
    seed_everything(cfg.seed)
    roles = roles_from_config(cfg.data.get("texts"))
    bundle = build_towers(cfg.model)
    objective = build_objective(cfg.model, bundle, build_loss(cfg.loss, bundle), max_steps=100, seed=cfg.seed,
                                text_roles=tuple(r.name for r in roles or ()))
    engine = build_engine(objective, optim_cfg=cfg.optim, sched_cfg=cfg.sched, trainer_cfg=cfg.trainer,
                          global_batch_size=GLOBAL_BATCH, world_size=info.world_size)
    step = CachedGradientStep(engine, k) if k > 1 else None
    g = torch.Generator().manual_seed(123)
    b = GLOBAL_BATCH // info.world_size
    rows = slice(info.rank * b, (info.rank + 1) * b)
    torch.manual_seed(7)   # the towers' own randomness (FLIP's patch dropout) starts alike for both K
    for s in range(STEPS):
        batch = make_batch(roles, model_text_context(cfg.model), g, rows)
        if step is None:
            loss, metrics = engine(batch)
            engine.backward(loss)
        else:
            loss, metrics = step.forward(batch)
            step.backward()
        if s == 0:
            global_loss = float(distributed.all_reduce_mean(loss.detach()))
            terms = {n: float(distributed.all_reduce_mean(v)) for n, v in metrics.items() if n.startswith("loss_")}
            grads = {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters() if p.requires_grad}
        if step is None:
            engine.step()
        else:
            step.optimizer_step()
    params = {n: safe_get_full_fp32_param(p) for n, p in engine.module.named_parameters()}
    results[k] = {"loss": global_loss, "terms": terms, "grads": {n: g.clone() for n, g in grads.items() if g is not None},
                  "params": {n: p.clone() for n, p in params.items() if p is not None},
                  "lr": engine.get_lr()[0], "global_steps": engine.global_steps}
    del engine, step, objective
if info.rank == 0:
    torch.save(results, out_path)
