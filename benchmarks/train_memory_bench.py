"""Peak memory of one training step through the real DeepSpeed engine: exact accumulation
(`trainer.accum_steps=K`) and activation checkpointing (`model.grad_checkpointing`) against the
plain step, at the same global batch.

    python benchmarks/train_memory_bench.py                      # ViT-B-32, batch 64, K in 1 8, both ways
    python benchmarks/train_memory_bench.py --model ViT-B-32 --batch 128 --accum 1 4 8

Each configuration runs in its own process (1 rank, fp32, ZeRO 0, CPU). It reports the step's
peak RSS above the RSS just before the step (the weights, AdamW state and DeepSpeed buffers are
in that baseline), the step's wall time, and the loss (equal across K by construction).
Writes benchmarks/results/train_memory_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_one(model: str, batch: int, accum: int, checkpointing: bool) -> dict:
    """In this process: build the engine, run one step, measure."""
    import torch
    from hydra import compose, initialize_config_dir

    from clipkit.accumulation import CachedGradientStep
    from clipkit.config import CONF_DIR
    from clipkit.recipe import build_engine, build_loss, build_objective, build_towers, init_distributed

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={model}", f"data.global_batch_size={batch}",
                                          f"trainer.accum_steps={accum}", f"model.grad_checkpointing={checkpointing}"])
    info = init_distributed(cfg.launcher)
    torch.manual_seed(0)
    bundle = build_towers(cfg.model)
    objective = build_objective(cfg.model, bundle, build_loss(cfg.loss, bundle), max_steps=10, seed=0)
    engine = build_engine(objective, optim_cfg=cfg.optim, sched_cfg=cfg.sched, trainer_cfg=cfg.trainer,
                          global_batch_size=batch, world_size=info.world_size)
    size = bundle.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=g)
    tokens = torch.randint(1, 49407, (batch, 77), generator=g)
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.002)

    baseline = _rss_bytes()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    if accum > 1:
        step = CachedGradientStep(engine, accum)
        loss, _ = step.forward(images, tokens)
        step.backward()
        step.optimizer_step()
    else:
        loss, _ = engine(images, tokens)
        engine.backward(loss)
        engine.step()
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    peak_total = max(peak[0], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"model": model, "batch": batch, "accum_steps": accum, "grad_checkpointing": checkpointing,
            "step_s": seconds, "peak_above_baseline_mb": (peak_total - baseline) / 2**20,
            "baseline_mb": baseline / 2**20, "loss": float(loss)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--accum", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--checkpointing", choices=["both", "on", "off"], default="both")
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "BATCH", "ACCUM_CKPT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        accum, checkpointing = args.one[2].split(":")
        print(json.dumps(run_one(args.one[0], int(args.one[1]), int(accum), checkpointing == "True")))
        return
    flags = {"both": [False, True], "on": [True], "off": [False]}[args.checkpointing]
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count())),
           "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "HF_HUB_OFFLINE": "1"}
    for checkpointing in flags:
        for accum in args.accum:
            out = subprocess.run([sys.executable, __file__, "--one", args.model, str(args.batch),
                                  f"{accum}:{checkpointing}"], capture_output=True, text=True, env=env, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{args.model} batch {args.batch}  accum_steps={accum:<2d} grad_checkpointing={str(checkpointing):5s}  "
                  f"step {row['step_s']:6.1f} s  peak above baseline {row['peak_above_baseline_mb']:8.0f} MB  "
                  f"loss {row['loss']:.6f}", flush=True)
    base = next(r for r in rows if r["accum_steps"] == args.accum[0] and not r["grad_checkpointing"])
    for row in rows:
        row["peak_ratio_vs_plain"] = row["peak_above_baseline_mb"] / base["peak_above_baseline_mb"]
        row["time_ratio_vs_plain"] = row["step_s"] / base["step_s"]
    import torch

    device = torch.cuda.get_device_name().replace(" ", "_") if torch.cuda.is_available() else "cpu"
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"train_memory_{device}.json"
    path.write_text(json.dumps(rows, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
