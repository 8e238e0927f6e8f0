"""Checkpoints: save and resume through the DeepSpeed engine, atomically; export to open_clip.

Under a run directory (`clipkit.run_dir.RunDir`):
    checkpoints/step_00000500/   DeepSpeed tag directory (model, optimizer, client state), plus
                                 the launch's config.yaml and open_clip_config.json
    checkpoints/latest           name of the newest *complete* tag, replaced atomically
    checkpoints/universal/<tag>/ DeepSpeed's universal form of a ZeRO 1-3 tag, made on a resume
                                 on another number of ranks (renamed into place when complete)

A save writes the tag directory first and flips `latest` only after every rank has
finished, so a process killed mid-save, or a save that fails (a full disk), leaves `latest`
on the previous good checkpoint.

Every checkpoint file clipkit reads goes through `torch.load(weights_only=True)` first
(`load_file`): tensors, containers and the few DeepSpeed classes in `_deepspeed_globals`,
never arbitrary pickled code. DeepSpeed's own loads (`engine.load_checkpoint`, zero_to_fp32)
use `weights_only=False`, so clipkit vets a tag's files before handing it to them
(`read_tag`), and refuses a tag written for another model with the keys and shapes that differ.

Resuming on another number of ranks (a SLURM requeue on other nodes): the client state records
the world size and ZeRO stage each checkpoint was written with (`layout`). A ZeRO-0 checkpoint
holds the whole optimizer state in rank 0's model states and loads as it is. A ZeRO 1-3
checkpoint is partitioned by rank: rank 0 converts it with DeepSpeed's `ds_to_universal`, and
the engine, built with `checkpoint.load_universal`, re-partitions it on load. A change of ZeRO
stage together with the number of ranks is refused (`check_resume_layout`, before the engine exists).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pickle
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from clipkit import distributed
from clipkit.errors import ClipkitConfigError
from clipkit.models.factory import open_clip_state_shapes
from clipkit.models.heads import SEMANTIC, head_model_config, head_state_dict, parse_heads
from clipkit.models.positions import join_kept_positions
from clipkit.run_dir import OPEN_CLIP_CONFIG, RunDir, atomic_write_bytes, atomic_write_text

LATEST = "latest"
EXPORT_WEIGHTS = "open_clip_pytorch_model.bin"
# open_clip's `local-dir:` loading takes this name first.
EXPORT_SAFETENSORS = "open_clip_model.safetensors"
# Rank 0's model states: stages 0-2, and ZeRO-3 (one file per rank).
_MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
# Files of the launch that wrote a checkpoint, copied into its tag directory.
_RUN_FILES = ("config.yaml", OPEN_CLIP_CONFIG)
# checkpoints/universal/<tag>: DeepSpeed's universal form of <tag>, for a resume on another number of ranks.
UNIVERSAL = "universal"
# Objective parameters that open_clip keeps on the model itself rather than in a loss: each
# clipkit loss holds them in its `temperature` (a `clipkit.losses.logit_scale.LogitScale`).
# Extra image heads (`model.heads`) have theirs in `loss.head_temperatures.<head>`.
_LOSS_SCALARS = ("logit_scale", "logit_bias")


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a lost mount); the previous one is intact."""


def _deepspeed_globals() -> list[type]:
    """The classes DeepSpeed 0.19 pickles into its checkpoint files besides tensors and plain
    containers, found by loading every file of ZeRO 0-3 checkpoints in fp32 and bf16 with
    weights_only=True (DynamicLossScaler: fp16 runs on GPU)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _reason(err: BaseException) -> str:
    """The line of a torch.load error that says what went wrong."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    refused = [line for line in lines if "GLOBAL" in line]   # the object a safe load refused
    return (refused or lines or [type(err).__name__])[0]


def load_file(path: str | Path, *, mmap: bool = False) -> Any:
    """One checkpoint file through `torch.load(weights_only=True)`, on the CPU.

    `mmap=True` maps tensors instead of reading them (cheap vetting). Raises a one-line
    ClipkitConfigError naming the file when it is truncated or corrupt, or holds objects a
    safe load refuses.
    """
    try:
        with torch.serialization.safe_globals(_deepspeed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise ClipkitConfigError(f"checkpoint file {path} holds objects a safe load refuses ({_reason(err)}); "
                                 f"clipkit only loads tensors and DeepSpeed's own state") from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise ClipkitConfigError(f"checkpoint file {path} cannot be read, it is truncated or corrupt "
                                 f"({_reason(err)})") from None


def read_tag(tag_dir: str | Path) -> dict[str, Any]:
    """Vets every `*.pt` file of a DeepSpeed tag directory with `load_file` (memory-mapped) and
    returns rank 0's model states (`module`, `param_shapes`, ...)."""
    tag_dir = Path(tag_dir)
    if not tag_dir.is_dir():
        raise ClipkitConfigError(f"checkpoint directory not found: {tag_dir}")
    states = None
    for path in sorted(tag_dir.glob("*.pt")):
        loaded = load_file(path, mmap=True)
        if path.name in _MODEL_STATES:
            states = loaded
    if states is None:
        raise ClipkitConfigError(f"checkpoint {tag_dir} is incomplete: it has no {' or '.join(_MODEL_STATES)}")
    return states


def _model_states(tag_dir: Path) -> Any:
    """Rank 0's model states of a tag (memory-mapped safe load), without vetting the other files."""
    for name in _MODEL_STATES:
        if (tag_dir / name).is_file():
            return load_file(tag_dir / name, mmap=True)
    raise ClipkitConfigError(f"checkpoint {tag_dir} is incomplete: it has no {' or '.join(_MODEL_STATES)}")


@dataclass(frozen=True)
class SavedLayout:
    """What a checkpoint was written with: the number of (data-parallel) ranks and the ZeRO stage."""

    world_size: int
    zero_stage: int


def saved_layout(tag_dir: str | Path) -> SavedLayout:
    """The layout in a tag's client state (`layout`), or, for checkpoints from before it was
    recorded, in DeepSpeed's own `dp_world_size` and config."""
    states = _model_states(Path(tag_dir))
    layout = states.get("layout")
    if layout is not None:
        return SavedLayout(int(layout["world_size"]), int(layout["zero_stage"]))
    zero = (states.get("ds_config") or {}).get("zero_optimization") or {}
    return SavedLayout(int(states["dp_world_size"]), int(zero.get("stage", 0)))


def check_resume_layout(saved: SavedLayout, tag: str, *, world_size: int, zero_stage: int) -> bool:
    """Whether resuming checkpoint `tag` on `world_size` ranks at ZeRO `zero_stage` needs DeepSpeed's
    universal checkpoint (the engine is then built with `checkpoint.load_universal`).

    Raises a one-line ClipkitConfigError when the number of ranks changed together with the ZeRO stage.
    """
    if saved.world_size == world_size:
        return False
    moved = f"checkpoint {tag} was written by {saved.world_size} ranks at ZeRO stage {saved.zero_stage}"
    if zero_stage != saved.zero_stage:
        raise ClipkitConfigError(f"{moved}; resume it on {world_size} ranks at the same stage "
                                 f"(trainer.zero_stage={saved.zero_stage})")
    # Every stage follows (tests/e2e/test_resize_resume.py): 0 as saved, since rank 0's model states
    # hold the whole optimizer; 1-3 through DeepSpeed's universal checkpoint, with two repairs after
    # ZeRO-3's load (`restore_param_groups`, `unshare_step_counts`).
    return zero_stage > 0


def convert_to_universal(tag_dir: str | Path, out_dir: str | Path) -> Path:
    """DeepSpeed's `ds_to_universal` of one ZeRO 1-3 tag directory into `out_dir`, atomically.

    It writes under a temporary name beside `out_dir` and renames that into place when complete,
    so a conversion cut short (a kill, a full disk) is never loaded; the next try starts over.
    Runs in this process, one file at a time (DeepSpeed's default forks worker processes).
    """
    from deepspeed.checkpoint import ds_to_universal

    tag_dir, out_dir = Path(tag_dir), Path(out_dir)
    scratch = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(scratch, ignore_errors=True)
    # ds_to_universal also writes a `latest_universal` file beside its output: it stays in `scratch`.
    args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(scratch / out_dir.name),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):   # its prints and progress bars
        ds_to_universal.main(args)
    os.replace(scratch / out_dir.name, out_dir)
    shutil.rmtree(scratch, ignore_errors=True)
    return out_dir


def restore_untrained_state(module: torch.nn.Module, saved: Mapping[str, torch.Tensor]) -> list[str]:
    """Copies buffers (BatchNorm statistics) and frozen parameters from a saved module state.

    A universal load restores only what the optimizer holds, and DeepSpeed then skips the module
    state. Entries whose shape differs (ZeRO-3's partitioned placeholders) are left alone.
    Returns the names copied.
    """
    params = [(name, p) for name, p in module.named_parameters() if not p.requires_grad]
    copied = []
    with torch.no_grad():
        for name, tensor in [*module.named_buffers(), *params]:
            value = saved.get(name)
            if value is not None and tensor.numel() and tuple(value.shape) == tuple(tensor.shape):
                tensor.copy_(value.to(tensor.dtype))
                copied.append(name)
    return copied


def restore_param_groups(optimizer, saved_groups: list[dict[str, Any]]) -> None:
    """Sets each parameter group's hyperparameters (lr, betas, weight decay, ...) to the saved group's.

    DeepSpeed 0.19.8's ZeRO-3 universal load gives every group the first group's, so biases,
    norms and the temperature would be decayed like the matrices; ZeRO 1/2 load them per group,
    which this repeats.
    """
    if len(saved_groups) != len(optimizer.param_groups):
        raise ClipkitConfigError(f"the checkpoint's optimizer has {len(saved_groups)} parameter groups, this run's "
                                 f"{len(optimizer.param_groups)}")
    for group, saved in zip(optimizer.param_groups, saved_groups):
        group.update({key: value for key, value in saved.items() if key != "params"})


def unshare_step_counts(optimizer) -> None:
    """Gives each parameter's optimizer state its own step counter.

    DeepSpeed 0.19.8's ZeRO-3 universal load puts one step tensor into every group's state, and
    torch's Adam increments it in place, once per group: the second group's bias correction
    would then use step 2t.
    """
    basic = getattr(optimizer, "optimizer", optimizer)   # the torch optimizer inside ZeRO's
    for state in basic.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def saved_shapes(states: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """{objective key: shape} of the weights in DeepSpeed model states. ZeRO-3 stores empty
    placeholders in `module`; its `param_shapes` (trainable) and `frozen_param_shapes` hold the
    real shapes, and stages 0-2 agree with them."""
    shapes = {key: tuple(value.shape) for key, value in states["module"].items()}
    for group in states.get("param_shapes") or []:
        shapes.update({key: tuple(shape) for key, shape in group.items()})
    shapes.update({key: tuple(shape) for key, shape in (states.get("frozen_param_shapes") or {}).items()})
    return shapes


def module_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """{state-dict key: full shape} of a module, also when ZeRO-3 has partitioned it (`ds_shape`)."""
    return {key: tuple(getattr(value, "ds_shape", value.shape))
            for key, value in module.state_dict(keep_vars=True).items()}


def _few(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def check_same_model(saved: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]],
                     what: str, fix: str) -> None:
    """Raises a ClipkitConfigError listing the keys and shapes in which a checkpoint (`saved`)
    differs from the model it is loaded into (`expected`)."""
    wrong = [f"{key} {list(saved[key])} vs {list(shape)}" for key, shape in expected.items()
             if key in saved and tuple(saved[key]) != tuple(shape)]
    missing = [key for key in expected if key not in saved]
    unexpected = [key for key in saved if key not in expected]
    if not (wrong or missing or unexpected):
        return
    parts = [f"{len(wrong)} shapes differ (checkpoint vs model): {_few(wrong)}"] if wrong else []
    parts += [f"{len(missing)} model keys are not in the checkpoint: {_few(missing)}"] if missing else []
    parts += [f"{len(unexpected)} checkpoint keys are not in the model: {_few(unexpected)}"] if unexpected else []
    raise ClipkitConfigError(f"{what} was written for a different model: {'; '.join(parts)}; {fix}")


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
        """Collective: every rank must call it. Returns the tag written.

        Raises CheckpointWriteError, naming the last complete checkpoint, when this rank's part
        cannot be written; `latest` then still names that checkpoint. (The other ranks' closing
        barrier fails when this rank exits: `clipkit.distributed.lost_peer`.)
        """
        tag = tag_for_step(step)
        if distributed.rank() == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            # A conversion of an older checkpoint of this step (a run resumed from before it) is stale.
            shutil.rmtree(self.dir / UNIVERSAL / tag, ignore_errors=True)
        distributed.barrier()
        layout = {"world_size": distributed.world_size(), "zero_stage": int(engine.zero_optimization_stage())}
        try:
            engine.save_checkpoint(str(self.dir), tag=tag, client_state={**client_state, "layout": layout},
                                   save_latest=False)
        except OSError as err:
            raise self._write_error(tag, err) from err
        distributed.barrier()
        if distributed.rank() == 0:
            try:
                self._copy_run_files(tag)
                atomic_write_text(self.dir / LATEST, tag)
            except OSError as err:
                raise self._write_error(tag, err) from err
            self._prune(keep=tag)
        distributed.barrier()
        return tag

    def _write_error(self, tag: str, err: OSError) -> CheckpointWriteError:
        last = self.latest_tag()
        after = (f"the last complete checkpoint is {last} (resume with trainer.resume=latest)" if last
                 else "there is no complete checkpoint yet")
        error = CheckpointWriteError(f"checkpoint {tag} could not be written ({err.strerror or err}); {after}")
        error.errno = err.errno
        return error

    def _copy_run_files(self, tag: str) -> None:
        """The launch's config.yaml and open_clip_config.json (`RunDir`, the parent of `dir`) go
        with the checkpoint: a later launch rewrites the run's copies, an export needs this one."""
        for name in _RUN_FILES:
            source = self.dir.parent / name
            if source.is_file():
                atomic_write_bytes(self.dir / tag / name, source.read_bytes())

    def check_resume(self, tag: str, *, world_size: int, zero_stage: int) -> bool:
        """Cheap, before any process group: whether resuming `tag` on `world_size` ranks needs the
        universal checkpoint; a one-line ClipkitConfigError when it cannot be resumed there."""
        return check_resume_layout(saved_layout(self.dir / tag), tag, world_size=world_size, zero_stage=zero_stage)

    def universal_dir(self, tag: str) -> Path:
        """Collective: the universal form of `tag`, converted by rank 0 unless it exists already."""
        out = self.dir / UNIVERSAL / tag
        if distributed.rank() == 0 and not out.is_dir():
            out.parent.mkdir(parents=True, exist_ok=True)
            convert_to_universal(self.dir / tag, out)
        distributed.barrier()
        return out

    def load(self, engine, tag: str, *, universal: bool = False) -> dict[str, Any]:
        """Restores model, optimizer and scheduler; returns the saved client state.

        The tag's files are vetted with safe loads first, and a checkpoint of another model is
        refused with the keys and shapes that differ, before DeepSpeed's own load touches them.
        `universal` (collective; `check_resume`): the tag goes through DeepSpeed's universal
        checkpoint, for an engine built with `checkpoint.load_universal`.
        """
        root = self.universal_dir(tag).parent if universal else self.dir
        states = read_tag(root / tag)
        if universal:
            for path in sorted((root / tag / "zero").rglob("*.pt")):
                load_file(path, mmap=True)
        check_same_model(saved_shapes(states), module_shapes(engine.module), f"checkpoint {self.dir / tag}",
                         f"resume with the model it was trained with ({self.dir / tag / 'config.yaml'}) "
                         f"or start a new run_name=...")
        path, client_state = engine.load_checkpoint(str(root), tag=tag)
        if path is None:
            raise ClipkitConfigError(f"could not load checkpoint {self.dir / tag}")
        if universal:
            restore_untrained_state(engine.module, states["module"])
            restore_param_groups(engine.optimizer, load_file(root / tag / "zero" / "optimizer_state.pt")["param_groups"])
            unshare_step_counts(engine.optimizer)
        return client_state

    def _prune(self, keep: str) -> None:
        tags = sorted(p.name for p in self.dir.glob("step_*") if p.is_dir())
        for old in tags[: max(0, len(tags) - self.keep_last)]:
            if old != keep:
                shutil.rmtree(self.dir / old, ignore_errors=True)
                shutil.rmtree(self.dir / UNIVERSAL / old, ignore_errors=True)


def fp32_state_dict(tag_dir: str | Path) -> dict[str, torch.Tensor]:
    """The objective's full fp32 weights from one DeepSpeed tag directory, any ZeRO stage.

    ZeRO/bf16 checkpoints hold the fp32 master weights partitioned in their optimizer
    shards (consolidated with DeepSpeed's zero_to_fp32, after `read_tag` vetted every file);
    plain fp32 stage-0 checkpoints hold them in the module state.
    """
    tag_dir = Path(tag_dir)
    states = read_tag(tag_dir)
    if any(tag_dir.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    else:
        state = states["module"]
    return {k: v.float() for k, v in state.items()}


def to_open_clip_state_dict(objective_state: dict[str, torch.Tensor], head: str = SEMANTIC) -> dict[str, torch.Tensor]:
    """Objective keys (`model.*`, `loss.*`) -> open_clip keys; loss scalars become 0-dim; text
    positions split into frozen and trained rows (`model.pos_stretch`) become one tensor again.

    With extra image heads (`model.heads`), the state of the plain open_clip model for `head`
    (`clipkit.models.heads.head_state_dict`), with that head's temperature and bias
    (`loss.head_temperatures.<head>`; the semantic head's is `loss.temperature`)."""
    out = {}
    prefix = "loss.temperature." if head == SEMANTIC else f"loss.head_temperatures.{head}."
    for key, value in objective_state.items():
        if key.startswith("model."):
            out[key[len("model."):]] = value
        elif key.startswith(prefix) and key[len(prefix):] in _LOSS_SCALARS:
            out[key[len(prefix):]] = value.reshape(())
    return join_kept_positions(head_state_dict(out, head))


def export_open_clip(run_dir: str | Path, out_dir: str | Path | None = None, tag: str | None = None) -> Path:
    """Writes `open_clip_model.safetensors`, `open_clip_pytorch_model.bin` and `open_clip_config.json`
    from a run's checkpoint.

    The result loads with `open_clip.create_model_and_transforms("local-dir:<out_dir>")` (which
    takes the safetensors file), or with `create_model_and_transforms(name, pretrained=<the .bin>)`
    for a built-in architecture name. The model config is the one the checkpoint was written
    with (its tag directory's copy; the run's for checkpoints from before those copies), and a
    checkpoint that does not fit it is refused with the keys and shapes that differ.
    A run with extra image heads (`model.heads`) gets one more open_clip model per head in
    `<out_dir>/<head>/`: the trunk with that head's pooling, projections and temperature;
    `<out_dir>` itself holds the semantic head (the tower's own). Returns the .bin path.
    """
    run = RunDir(run_dir)
    ckpt = Checkpointer(run.checkpoints)
    tag = tag or ckpt.latest_tag()
    if tag is None:
        raise ClipkitConfigError(f"{run.root} has no complete checkpoint to export")
    config_path = ckpt.dir / tag / OPEN_CLIP_CONFIG
    if not config_path.is_file():
        config_path = run.open_clip_config
    config = json.loads(config_path.read_text())
    objective_state = fp32_state_dict(ckpt.dir / tag)
    out_dir = Path(out_dir) if out_dir else run.export
    weights = _write_open_clip(to_open_clip_state_dict(objective_state), config, out_dir,
                               f"checkpoint {ckpt.dir / tag}", f"its model config is {config_path}")
    for spec in _run_heads(ckpt.dir / tag, run):
        head_config = {**config, "model_cfg": head_model_config(config["model_cfg"], spec)}
        _write_open_clip(to_open_clip_state_dict(objective_state, spec.name), head_config, out_dir / spec.name,
                         f"checkpoint {ckpt.dir / tag}, head {spec.name}", f"model.heads.{spec.name}={spec}")
    return weights


def _run_heads(tag_dir: Path, run: RunDir) -> list:
    """The extra image heads (`model.heads`) of the launch that wrote a checkpoint."""
    config_path = tag_dir / "config.yaml"
    if not config_path.is_file():
        config_path = run.config
    if not config_path.is_file():
        return []
    from omegaconf import OmegaConf

    model = OmegaConf.to_container(OmegaConf.load(config_path), resolve=False).get("model") or {}
    return parse_heads(model.get("heads"))


def _write_open_clip(state: dict[str, torch.Tensor], config: dict[str, Any], out_dir: Path, what: str,
                     config_note: str) -> Path:
    """One open_clip model folder: weights (.bin and .safetensors) and `open_clip_config.json`."""
    if "logit_bias" in state:
        # open_clip only creates `logit_bias` when the config asks for it (SigLIP models).
        config = {**config, "model_cfg": {**config["model_cfg"], "init_logit_bias": float(state["logit_bias"].detach())}}
    check_same_model({k: tuple(v.shape) for k, v in state.items()}, open_clip_state_shapes(config["model_cfg"]),
                     what, config_note)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / EXPORT_WEIGHTS
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(weights, buffer.getvalue())
    # safetensors refuses tensors that share memory (zero_to_fp32 returns views of flat buffers).
    atomic_write_bytes(out_dir / EXPORT_SAFETENSORS,
                       safetensors.torch.save({k: v.detach().contiguous().clone() for k, v in state.items()}))
    atomic_write_text(out_dir / OPEN_CLIP_CONFIG, json.dumps(config, indent=2))
    return weights
