"""Run under torchrun: a ZeRO checkpoint written by one number of ranks, resumed on another.

    resize_worker.py OUT save   STAGES [OVERRIDES]   # e.g. 2 ranks: train, checkpoint, train on
    resize_worker.py OUT resume STAGES [OVERRIDES]   # e.g. 1 or 3 ranks: resume, train on; then a fresh run

For each ZeRO stage in STAGES (comma-separated), on fixed global batches of 12 (a function of the
step, split over the ranks), fp32 unless Hydra OVERRIDES say otherwise:
  save    trains SAVE_AT steps, checkpoints through `Checkpointer.save`, gathers the full state, and
          trains AFTER more steps (the uninterrupted run at the saving size).
  resume  resumes the checkpoint the way `clipkit.recipe` does (`check_resume`, the engine built with
          `load_universal` when it needs it, `Checkpointer.load`), gathers the full state, trains
          AFTER steps. A stage clipkit refuses records its error instead. Then, once, a fresh
          engine at ZeRO 0 trains SAVE_AT + AFTER steps: the uninterrupted run at this size (the
          stage changes only the rounding, as the size does, and one run spares an engine per stage).
Rank 0 writes OUT/z<stage>/<save|resume>_w<ranks>.pt: the full state (per parameter: fp32 value,
Adam exp_avg and exp_avg_sq; the optimizer's step and hyperparameters per group; the lr
scheduler's state) and the global losses; and OUT/uninterrupted_w<ranks>.pt, the reference losses.
"""

import sys
from pathlib import Path

import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from hydra import compose, initialize_config_dir

from clipkit import distributed
from clipkit.checkpoint import Checkpointer, tag_for_step
from clipkit.config import CONF_DIR
from clipkit.errors import ClipkitConfigError
from clipkit.recipe import build_engine, build_loss, build_objective, build_towers, init_distributed, seed_everything

GLOBAL_BATCH, SAVE_AT, AFTER = 12, 3, 3


def batch(step: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    images, tokens = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g), torch.randint(1, 49407, (GLOBAL_BATCH, 16),
                                                                                       generator=g)
    rows = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
    return images[rows], tokens[rows]


def train(engine, steps: range, info) -> list[float]:
    losses = []
    for step in steps:
        images, tokens = batch(step, info.rank, info.world_size)
        loss, _ = engine({"image": images, "text": tokens})
        losses.append(float(distributed.all_reduce_mean(loss.detach())))
        engine.backward(loss)
        engine.step()
    return losses


def optimizer_states(engine, param: torch.nn.Parameter) -> dict[str, torch.Tensor]:
    """Collective at ZeRO 1-3: the full fp32 value and Adam moments of one parameter."""
    value = safe_get_full_fp32_param(param)
    if value is None:   # ZeRO 0: the torch optimizer holds the parameter itself
        state = engine.optimizer.state[param]
        return {"fp32": param.detach().clone(), "exp_avg": state["exp_avg"].clone(),
                "exp_avg_sq": state["exp_avg_sq"].clone()}
    return {"fp32": value.clone(), **{key: safe_get_full_optimizer_state(param, key).clone()
                                      for key in ("exp_avg", "exp_avg_sq")}}


def full_state(engine) -> dict:
    if hasattr(engine.optimizer, "_hp_optimizer_states_linked"):
        # DeepSpeed 0.19.8's ZeRO 1/2 links the parameters to their Adam moments once, right after
        # the first group's first update, when the other groups have no moments yet: they stay
        # unlinked, and safe_get_full_optimizer_state fails on them. Link again now.
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    params = {name: optimizer_states(engine, p) for name, p in engine.module.named_parameters() if p.requires_grad}
    basic = getattr(engine.optimizer, "optimizer", engine.optimizer)   # ZeRO wraps the torch optimizer
    steps = sorted({float(s["step"]) for s in basic.state.values() if "step" in s})
    groups = [{k: v for k, v in group.items() if k != "params"} for group in engine.optimizer.param_groups]
    return {"params": params, "optimizer_steps": steps, "param_groups": groups,
            "lr_scheduler": engine.lr_scheduler.state_dict(), "global_steps": engine.global_steps}


def engine_for(cfg, info, load_universal: bool = False):
    seed_everything(cfg.seed)
    bundle = build_towers(cfg.model)
    objective = build_objective(cfg.model, bundle, build_loss(cfg.loss, bundle), max_steps=cfg.trainer.max_steps,
                                seed=cfg.seed)
    return build_engine(objective, optim_cfg=cfg.optim, sched_cfg=cfg.sched, trainer_cfg=cfg.trainer,
                        global_batch_size=GLOBAL_BATCH, world_size=info.world_size, load_universal=load_universal)


def config(stage: int, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[f"trainer.zero_stage={stage}", f"data.global_batch_size={GLOBAL_BATCH}",
                                           f"trainer.max_steps={SAVE_AT + AFTER}", "sched.warmup_steps=2", *overrides])


def main(out: Path, phase: str, stages: list[int], overrides: list[str]) -> None:
    info = init_distributed(config(0, overrides).launcher)
    for stage in stages:
        cfg = config(stage, overrides)
        checkpointer = Checkpointer(out / f"z{stage}" / "checkpoints")
        result: dict = {"world_size": info.world_size}
        if phase == "save":
            engine = engine_for(cfg, info)
            result["losses_before"] = train(engine, range(1, SAVE_AT + 1), info)
            checkpointer.save(engine, SAVE_AT, {"step": SAVE_AT})
            result["state"] = full_state(engine)
            result["losses_after"] = train(engine, range(SAVE_AT + 1, SAVE_AT + AFTER + 1), info)
        else:
            tag = tag_for_step(SAVE_AT)
            try:
                universal = checkpointer.check_resume(tag, world_size=info.world_size, zero_stage=stage)
            except ClipkitConfigError as err:
                result["error"] = str(err)
            else:
                engine = engine_for(cfg, info, load_universal=universal)
                client_state = checkpointer.load(engine, tag, universal=universal)
                result["universal"], result["client_step"] = universal, client_state["step"]
                result["state"] = full_state(engine)
                result["losses_after"] = train(engine, range(SAVE_AT + 1, SAVE_AT + AFTER + 1), info)
        if info.rank == 0:
            torch.save(result, out / f"z{stage}" / f"{phase}_w{info.world_size}.pt")
        distributed.barrier()
    if phase == "resume":
        losses = train(engine_for(config(0, overrides), info), range(1, SAVE_AT + AFTER + 1), info)
        if info.rank == 0:
            torch.save({"losses": losses}, out / f"uninterrupted_w{info.world_size}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], [int(s) for s in sys.argv[3].split(",")], sys.argv[4:])
