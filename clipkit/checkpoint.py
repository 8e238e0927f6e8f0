"""Checkpoints: save and resume through the DeepSpeed engine, atomically; export to open_clip.

Under a run directory (`clipkit.run_dir.RunDir`):
    checkpoints/step_00000500/   DeepSpeed tag directory (model, optimizer, client state)
    checkpoints/latest           name of the newest *complete* tag, replaced atomically

A save writes the tag directory first and flips `latest` only after every rank has
finished, so a process killed mid-save leaves `latest` on the previous good checkpoint.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from clipkit import distributed
from clipkit.errors import ClipkitConfigError
from clipkit.run_dir import OPEN_CLIP_CONFIG, RunDir, atomic_write_bytes, atomic_write_text

LATEST = "latest"
EXPORT_WEIGHTS = "open_clip_pytorch_model.bin"
# Objective parameters that open_clip keeps on the model itself rather than in a loss: each
# clipkit loss holds them in its `temperature` (a `clipkit.losses.logit_scale.LogitScale`).
_LOSS_TO_OPEN_CLIP = {"loss.temperature.logit_scale": "logit_scale", "loss.temperature.logit_bias": "logit_bias"}


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


class Checkpointer:
    """Saves/loads engine checkpoints under `ckpt_dir`, keeping the newest `keep_last`."""

    def __init__(self, ckpt_dir: str | Path, keep_last: int = 2):
        self.dir = Path(ckpt_dir)
        self.keep_last = keep_last

    def latest_tag(self) -> str | None:
        marker = self.dir / LATEST
        if not marker.exists():
            return None
        tag = marker.read_text().strip()
        return tag if (self.dir / tag).is_dir() else None

    def resolve_resume(self, resume: str | None) -> str | None:
        """Maps `trainer.resume` (null | latest | auto | <tag>) to a tag to load, or None."""
        if resume in (None, "", "none"):
            if self.latest_tag() is not None:
                raise ClipkitConfigError(
                    f"{self.dir} already holds checkpoints; pass trainer.resume=latest to continue "
                    f"or a new run_name=... to start over")
            return None
        if resume == "auto":
            return self.latest_tag()
        if resume == "latest":
            tag = self.latest_tag()
            if tag is None:
                raise ClipkitConfigError(f"trainer.resume=latest but {self.dir} has no complete checkpoint")
            return tag
        if not (self.dir / resume).is_dir():
            raise ClipkitConfigError(f"trainer.resume={resume}: no checkpoint {self.dir / resume}")
        return resume

    def save(self, engine, step: int, client_state: dict[str, Any]) -> str:
        """Collective: every rank must call it. Returns the tag written."""
        tag = tag_for_step(step)
        if distributed.rank() == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
        distributed.barrier()
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False)
        distributed.barrier()
        if distributed.rank() == 0:
            atomic_write_text(self.dir / LATEST, tag)
            self._prune(keep=tag)
        distributed.barrier()
        return tag

    def load(self, engine, tag: str) -> dict[str, Any]:
        """Restores model, optimizer and scheduler; returns the saved client state."""
        path, client_state = engine.load_checkpoint(str(self.dir), tag=tag)
        if path is None:
            raise ClipkitConfigError(f"could not load checkpoint {self.dir / tag}")
        return client_state

    def _prune(self, keep: str) -> None:
        tags = sorted(p.name for p in self.dir.glob("step_*") if p.is_dir())
        for old in tags[: max(0, len(tags) - self.keep_last)]:
            if old != keep:
                shutil.rmtree(self.dir / old, ignore_errors=True)


def fp32_state_dict(tag_dir: str | Path) -> dict[str, torch.Tensor]:
    """The objective's full fp32 weights from one DeepSpeed tag directory, any ZeRO stage.

    ZeRO/bf16 checkpoints hold the fp32 master weights partitioned in their optimizer
    shards (consolidated with DeepSpeed's zero_to_fp32); plain fp32 stage-0 checkpoints
    hold them in the module state.
    """
    tag_dir = Path(tag_dir)
    if not tag_dir.is_dir():
        raise ClipkitConfigError(f"checkpoint directory not found: {tag_dir}")
    if any(tag_dir.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    else:
        state = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu",
                           weights_only=False)["module"]
    return {k: v.float() for k, v in state.items()}


def to_open_clip_state_dict(objective_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Objective keys (`model.*`, `loss.*`) -> open_clip keys; loss scalars become 0-dim."""
    out = {}
    for key, value in objective_state.items():
        if key.startswith("model."):
            out[key[len("model."):]] = value
        elif key in _LOSS_TO_OPEN_CLIP:
            out[_LOSS_TO_OPEN_CLIP[key]] = value.reshape(())
    return out


def export_open_clip(run_dir: str | Path, out_dir: str | Path | None = None, tag: str | None = None) -> Path:
    """Writes `open_clip_pytorch_model.bin` + `open_clip_config.json` from a run's checkpoint.

    The result loads with `open_clip.create_model_and_transforms("local-dir:<out_dir>")`, or
    with `create_model_and_transforms(name, pretrained=<out_dir>/open_clip_pytorch_model.bin)`
    for a built-in architecture name. Returns the weights path.
    """
    run = RunDir(run_dir)
    ckpt = Checkpointer(run.checkpoints)
    tag = tag or ckpt.latest_tag()
    if tag is None:
        raise ClipkitConfigError(f"{run.root} has no complete checkpoint to export")
    config = json.loads(run.open_clip_config.read_text())
    state = to_open_clip_state_dict(fp32_state_dict(ckpt.dir / tag))
    if "logit_bias" in state:
        # open_clip only creates `logit_bias` when the config asks for it (SigLIP models).
        config["model_cfg"]["init_logit_bias"] = float(state["logit_bias"])
    out_dir = Path(out_dir) if out_dir else run.export
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / EXPORT_WEIGHTS
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(weights, buffer.getvalue())
    atomic_write_text(out_dir / OPEN_CLIP_CONFIG, json.dumps(config, indent=2))
    return weights
