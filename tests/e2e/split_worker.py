"""Run under torchrun: one DeepSpeed step-1 forward/backward on a fixed global batch of 8.

Rank r feeds rows [r*b, (r+1)*b). Rank 0 writes the global loss and the temperature's
gradient (after DeepSpeed's reduction) to argv[1] as JSON.
"""

import json
import sys

import torch
from deepspeed.utils import safe_get_full_grad
from hydra import compose, initialize_config_dir

from clipkit import distributed
from clipkit.config import CONF_DIR
from clipkit.objective import ContrastiveObjective
from clipkit.recipe import build_engine, build_loss, build_towers, init_distributed, seed_everything

GLOBAL_BATCH = 8

out_path, zero_stage, loss_name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
    cfg = compose("train", overrides=[f"loss={loss_name}", f"trainer.zero_stage={zero_stage}",
                                      f"data.global_batch_size={GLOBAL_BATCH}"])
info = init_distributed(cfg.launcher)
seed_everything(cfg.seed)
bundle = build_towers(cfg.model)
objective = ContrastiveObjective(bundle.model, build_loss(cfg.loss, bundle))
engine = build_engine(objective, optim_cfg=cfg.optim, sched_cfg=cfg.sched, trainer_cfg=cfg.trainer,
                      global_batch_size=GLOBAL_BATCH, world_size=info.world_size)

g = torch.Generator().manual_seed(123)
images = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g)
tokens = torch.randint(1, 49407, (GLOBAL_BATCH, 16), generator=g)
b = GLOBAL_BATCH // info.world_size
rows = slice(info.rank * b, (info.rank + 1) * b)
loss, _ = engine({"image": images[rows], "text": tokens[rows]})
global_loss = float(distributed.all_reduce_mean(loss))
engine.backward(loss)
grads = {name: safe_get_full_grad(p) for name, p in engine.module.loss.named_parameters()}
patch_grad = safe_get_full_grad(engine.module.model.visual.conv1.weight)
if info.rank == 0:
    json.dump({"loss": global_loss, "loss_param_grads": {k: v.flatten().tolist() for k, v in grads.items()},
               "patch_embed_grad_norm": float(patch_grad.norm())}, open(out_path, "w"))
