"""`clipkit-train` / `python -m clipkit.train`: compose the Hydra config, build, fit, evaluate.

    clipkit-train experiment=demo_digits                 # the README demo
    clipkit-train experiment=demo_digits loss=siglip     # same run with the sigmoid loss
    torchrun --nproc_per_node=2 -m clipkit.train experiment=demo_digits trainer=zero2
    clipkit-train -m hydra/launcher=clipkit_slurm loss=clip,siglip   # a SLURM job per point (clipkit.launch.sweep)
"""

from __future__ import annotations

import sys
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from clipkit.config import CONF_DIR, freeze, preflight, resolve_step_budget
from clipkit.errors import ClipkitConfigError
from clipkit.launch.sweep import is_multirun, name_sweep_run, prepare_multirun


def prepare(cfg: DictConfig) -> DictConfig:
    """The composed config made final: the epoch budget written into `trainer.max_steps`, the
    schema checked, and the whole config read-only from here on. A frozen config passes as it is."""
    if not OmegaConf.is_readonly(cfg):
        resolve_step_budget(cfg)
        freeze(cfg, "train")
    return cfg


def check(cfg: DictConfig) -> None:
    """The checks `preflight` runs on the composed config, before Hydra makes a run directory."""
    from clipkit.recipe import check_inputs  # deferred: a bad override fails before torch is imported
    from clipkit.run_dir import RunDir

    prepared = prepare(cfg)
    RunDir(prepared.paths.run_dir).check_writable()
    check_inputs(prepared)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Runs one training job from a composed config; returns the final eval metrics."""
    from clipkit.recipe import run_training  # deferred: keeps config errors fast

    return run_training(prepare(cfg))


def _lost_rank_message(cfg: DictConfig, reason: str) -> str:
    """What a rank says when a collective failed because another rank died or hung."""
    from clipkit.checkpoint import Checkpointer
    from clipkit.distributed import rank
    from clipkit.run_dir import RunDir

    last = Checkpointer(RunDir(cfg.paths.run_dir).checkpoints).latest_tag()
    after = (f"the last complete checkpoint is {last}; resume with trainer.resume=latest" if last
             else "there is no complete checkpoint yet")
    return (f"rank {rank()} lost contact with another rank ({reason}): it died, or hung past "
            f"launcher.timeout_minutes={cfg.launcher.timeout_minutes}; {after}")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    from clipkit.checkpoint import CheckpointWriteError
    from clipkit.distributed import lost_peer
    from clipkit.preemption import PREEMPTED_EXIT_CODE, Preempted
    from clipkit.trainer import NonFiniteLossError

    name_sweep_run(cfg)  # a multirun point: run_name/<its swept overrides>
    try:
        train(cfg)
    except (ClipkitConfigError, NonFiniteLossError, CheckpointWriteError) as err:
        sys.exit(f"clipkit-train: error: {err}")
    except RuntimeError as err:
        reason = lost_peer(err)
        if reason is None:
            raise
        sys.exit(f"clipkit-train: error: {_lost_rank_message(cfg, reason)}")
    except Preempted as stop:
        print(f"clipkit-train: {stop}", file=sys.stderr, flush=True)
        sys.exit(PREEMPTED_EXIT_CODE)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1].startswith("--from-open-clip-args"):
        from clipkit.from_open_clip import main as from_open_clip_main  # prints a command, trains nothing

        from_open_clip_main(sys.argv[1:])
        return
    argv = sys.argv[1:]
    sys.argv[1:] = prepare_multirun("clipkit-train", argv, check) if is_multirun(argv) else \
        preflight("clipkit-train", "train", argv, check=check)
    _hydra_main()


if __name__ == "__main__":
    main()
