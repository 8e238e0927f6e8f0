"""Run under torchrun: the real Trainer on the real DeepSpeed engine, 6 steps of random batches
of 8 where step 3's images hold NaN pixels (one rank's share is enough to poison the global loss).

argv: out_path, nonfinite policy, ZeRO stage. Rank 0 saves the losses logged, the skipped steps,
the error (if any) and whether every weight is still finite.
"""

import json
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from clipkit.checkpoint import Checkpointer
from clipkit.config import CONF_DIR
from clipkit.loggers import MetricLoggers
from clipkit.recipe import build_engine, build_loss, build_objective, build_towers, init_distributed, seed_everything
from clipkit.trainer import NonFiniteLossError, Trainer, TrainerSettings

out_path, policy, zero_stage = sys.argv[1], sys.argv[2], int(sys.argv[3])
with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
    cfg = compose("train", overrides=["data.global_batch_size=8", f"trainer.zero_stage={zero_stage}"])
info = init_distributed(cfg.launcher)
seed_everything(0)
bundle = build_towers(cfg.model)
objective = build_objective(cfg.model, bundle, build_loss(cfg.loss, bundle), max_steps=6, seed=0)
engine = build_engine(objective, optim_cfg=cfg.optim, sched_cfg=cfg.sched, trainer_cfg=cfg.trainer,
                      global_batch_size=8, world_size=info.world_size)
b = 8 // info.world_size


def batches():
    g = torch.Generator().manual_seed(info.rank)
    for step in range(1, 7):
        images = torch.randn(b, 3, 32, 32, generator=g)
        if step == 3 and info.rank == info.world_size - 1:
            images[0, 0, 0, 0] = float("nan")
        yield {"image": images, "text": torch.randint(1, 49407, (b, 16), generator=g)}


class Records:
    def __init__(self):
        self.records = []

    def log(self, record):
        self.records.append(record)

    def close(self):
        pass


sink = Records()
settings = TrainerSettings(max_steps=6, global_batch_size=8, log_every_n_steps=1, progress_bar=False,
                           nonfinite=policy)
trainer = Trainer(engine, batches(), settings, checkpointer=Checkpointer(Path(out_path).parent / "ckpt"),
                  loggers=MetricLoggers([sink]), evaluate=None, client_state=lambda step: {"step": step},
                  batch_keys=lambda: [f"rank{info.rank}#{i}" for i in range(b)])
error = None
try:
    trainer.fit(0)
except NonFiniteLossError as err:
    error = str(err)
finite = all(bool(torch.isfinite(p).all()) for p in engine.module.parameters())
if info.rank == 0:
    json.dump({"losses": {r["step"]: r["train/loss"] for r in sink.records if "train/loss" in r},
               "skipped": [r["step"] for r in sink.records if r.get("train/skipped_step")],
               "skipped_keys": [r["train/skipped_keys"] for r in sink.records if r.get("train/skipped_step")],
               "error": error, "finite": finite, "global_steps": engine.global_steps}, open(out_path, "w"))
