"""Builds open_clip towers, transforms and tokenizer from the `model:` config group.

`model.name` is any open_clip architecture (`ViT-B-32`, `RN50`, ...), random init unless
`model.pretrained` names a tag or a local file. `model.config` is an inline open_clip
model config (the same schema as open_clip's JSON files, e.g. `conf/model/tiny_vit.yaml`);
it is registered under `model.name` so tokenizer and transforms come from open_clip's
own factory exactly as for a built-in name.

The learnable temperature and bias belong to the loss (`conf/loss/*.yaml`), so they are
taken off the open_clip module here and handed over as `pretrained_logit_scale/bias`
when a checkpoint supplied them. Keeping them off the model also spares DeepSpeed the
0-dim parameters it cannot handle (deepspeed 0.19.8).

`model.context_length` gives the text tower another context than the architecture's; pretrained
positions reach it by `model.pos_stretch` (Long-CLIP's stretch by default, `clipkit.models.positions`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

from clipkit.errors import ClipkitConfigError
from clipkit.models.positions import (
    freeze_leading_positions,
    frozen_position_count,
    pretrained_positions,
    set_text_positions,
    stretched_positions,
    trained_positions,
)
from clipkit.schema import LockImageConfig, LockTextConfig, PosStretchConfig


@dataclass
class ModelBundle:
    model: nn.Module                       # open_clip CLIP without logit_scale/logit_bias
    preprocess_train: Callable             # PIL image -> [3, H, W] float32
    preprocess_val: Callable
    tokenizer: Callable[[list[str]], torch.Tensor]  # n captions -> [n, context_length] long
    name: str
    model_cfg: dict[str, Any]              # open_clip model config (embed_dim, vision_cfg, text_cfg, ...)
    pretrained_logit_scale: float | None = None   # log-scale from a pretrained checkpoint
    pretrained_logit_bias: float | None = None


def _register_inline_config(name: str, config: dict[str, Any]) -> None:
    """Makes `name` a known open_clip architecture.

    open_clip's public registry reads configs from files: the file is written to a temporary
    directory only while `add_model_config` reads it into open_clip's in-memory registry, so
    no process leaves a directory behind. The directory stays in open_clip's search path,
    where its later rescans skip it as missing.
    """
    with tempfile.TemporaryDirectory(prefix="clipkit_model_cfg_") as cfg_dir:
        (Path(cfg_dir) / f"{name}.json").write_text(json.dumps(config))
        open_clip.add_model_config(cfg_dir)


def open_clip_config(name: str) -> dict[str, Any]:
    """The open_clip model config registered under `name`."""
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ClipkitConfigError(
            f"model.name={name!r} is not an open_clip architecture; pick one of "
            f"open_clip.list_models() or give an inline model.config")
    return cfg


def meta_model(model_cfg: dict[str, Any]) -> nn.Module:
    """The open_clip model that `model_cfg` describes, built on the meta device: no memory, no
    weights; for checking shapes and structure before anything is built for real."""
    name = "clipkit-shape-check"
    _register_inline_config(name, model_cfg)
    with _without_random_init_warning():
        return open_clip.create_model(name, device="meta")


def open_clip_state_shapes(model_cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """{state-dict key: shape} of the complete open_clip model (logit_scale included) that
    `model_cfg` describes (`meta_model`)."""
    return {key: tuple(value.shape) for key, value in meta_model(model_cfg).state_dict().items()}


@contextlib.contextmanager
def _without_random_init_warning():
    """Drops open_clip's root-logger warning "No pretrained weights loaded ... initialized
    randomly" (random init is clipkit's default, not news); every other record passes."""
    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")

    root = logging.getLogger()
    targets = [root, *root.handlers]
    for target in targets:
        target.addFilter(keep)
    try:
        yield
    finally:
        for target in targets:
            target.removeFilter(keep)


def check_pretrained_file(name: str, pretrained: str | None, key: str = "model.pretrained") -> None:
    """Refuses a `pretrained` that names a file (it has a suffix or a slash) which is not there,
    before any model is built; a bare word is an open_clip tag (`missing_weights_explained`)."""
    if pretrained is None or Path(pretrained).is_file():
        return
    text = str(pretrained)
    if Path(text).suffix or os.sep in text or text.startswith(("~", ".")):
        raise ClipkitConfigError(f"{key} file not found: {text}; give the path of an open_clip checkpoint "
                                 f"(.pt, .bin or .safetensors), or a pretrained tag of {name} "
                                 f"(open_clip.list_pretrained_tags_by_model('{name}'))")


@contextlib.contextmanager
def missing_weights_explained(name: str, pretrained: str | None, key: str = "model.pretrained"):
    """Turns open_clip's errors for weights it cannot find into one ClipkitConfigError saying what
    to do: an unknown tag (the model's tags listed), or a known tag whose file is neither in the
    local Hugging Face cache nor downloadable (offline, HF_HUB_OFFLINE=1, or no network). open_clip's
    own root-logger error for them is dropped: the exception (raised or explained) says it."""
    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("Failed to download weights", "Pretrained tag or path"))

    root = logging.getLogger()
    targets = [root, *root.handlers]
    for target in targets:
        target.addFilter(keep)
    try:
        yield
    except (RuntimeError, FileNotFoundError) as err:
        text = str(err)
        if pretrained is None or not ("is not a known tag" in text or "Failed to download" in text):
            raise
        check_pretrained_file(name, pretrained, key)
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise ClipkitConfigError(f"{key}={pretrained} is neither a file nor a pretrained tag of {name} "
                                     f"(its tags: {', '.join(tags) or 'none'}); give a checkpoint path or one of "
                                     "the tags") from None
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no")
        why = "HF_HUB_OFFLINE=1 is set" if offline else "the download failed"
        raise ClipkitConfigError(
            f"{key}={pretrained}: the {name} weights of tag '{pretrained}' are not in the local Hugging Face "
            f"cache and {why}; fetch them once where the network is reachable (python -c \"import open_clip; "
            f"open_clip.create_model('{name}', pretrained='{pretrained}')\"), then run with HF_HUB_OFFLINE=1, "
            f"or give a local file: {key}=/path/to/open_clip_pytorch_model.bin") from None
    finally:
        for target in targets:
            target.removeFilter(keep)


def build_model(name: str, *, pretrained: str | None = None, config: dict[str, Any] | None = None,
                precision: str = "fp32", patch_dropout: float = 0.0, context_length: int | None = None,
                pos_stretch: PosStretchConfig | None = None) -> ModelBundle:
    """Creates the towers, train/val transforms and tokenizer for one architecture.

    Args:
        name: open_clip architecture name, or the name to register `config` under.
        pretrained: open_clip pretrained tag or a local checkpoint path (nothing is downloaded
            unless a tag is given and the hub is reachable).
        config: inline open_clip model config dict; None uses open_clip's built-in `name`.
        precision: open_clip precision string for tower weights ("fp32" while DeepSpeed owns casting).
        patch_dropout: FLIP's training-time patch dropout ratio for a ViT (0 = off); open_clip
            keeps CLS and 1 + int(N·(1 − p)) tokens, in train mode only.
        context_length: text positions C; None: the architecture's. The model's `context_length`,
            its [C, C] causal `attn_mask`, the tokenizer and the returned `model_cfg` all say C.
        pos_stretch: how pretrained positions of another length reach C (None: Long-CLIP's
            defaults, `PosStretchConfig()`); a random init simply gets C positions.
    """
    if config is not None:
        _register_inline_config(name, config)
    model_cfg = copy.deepcopy(open_clip_config(name))
    check_pretrained_file(name, pretrained)
    if not 0.0 <= patch_dropout < 1.0:
        raise ClipkitConfigError(f"model.patch_dropout must be in [0, 1), got {patch_dropout}")
    architecture = int(model_cfg.get("text_cfg", {}).get("context_length", 77))
    target = architecture if context_length is None else int(context_length)
    if target < 1:
        raise ClipkitConfigError(f"model.context_length must be positive, got {context_length}")
    local = pretrained is not None and Path(pretrained).is_file()
    source = (pretrained_positions(pretrained) if local else None) or architecture
    if source != architecture and context_length is None:
        raise ClipkitConfigError(f"model.pretrained={pretrained} has {source} text positions, model.name={name} "
                                 f"{architecture}; set model.context_length={source} (or the length to stretch to)")
    with _without_random_init_warning(), missing_weights_explained(name, pretrained):
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            name, pretrained=pretrained if source == architecture else None, precision=precision,
            force_patch_dropout=patch_dropout or None)
    if source != architecture:
        # A local file of another length (e.g. an export of a Long-CLIP run): the model takes its
        # length first, so open_clip's loader finds matching shapes and resizes nothing.
        set_text_positions(model, model.positional_embedding.detach().new_zeros(source, _text_width(model)))
        open_clip.load_checkpoint(model, pretrained)
    if target != source:
        _set_context(model, target, pos_stretch or PosStretchConfig(), stretch=pretrained is not None)
    tokenizer = open_clip.get_tokenizer(name)
    if target != architecture:
        # What the export's open_clip_config.json says, so open_clip builds the same model.
        model_cfg["text_cfg"]["context_length"] = target
        tokenizer = open_clip.get_tokenizer(name, context_length=target)

    scale = bias = None
    if pretrained is not None:
        scale = float(model.logit_scale.detach().reshape(()))
        if getattr(model, "logit_bias", None) is not None:
            bias = float(model.logit_bias.detach().reshape(()))
    # The loss owns temperature and bias; see module docstring.
    del model.logit_scale
    if getattr(model, "logit_bias", None) is not None:
        del model.logit_bias
    model.logit_bias = None
    if hasattr(model, "text_decoder") and pretrained is None:
        # open_clip 3.3 never initializes MultimodalTransformer.text_projection (its
        # init_parameters is not called and would fail), so the decoder's output projection
        # is torch.empty: whatever memory held, often zeros (constant logits). std 0.02 (the
        # GPT-2/BERT output-layer init) starts the logits near uniform: caption CE ≈ ln V.
        with torch.no_grad():
            nn.init.normal_(model.text_decoder.text_projection, std=0.02)
    if hasattr(model, "text_decoder"):
        # CoCa.forward copies exp(logit_scale) into its output dict; clipkit never reads that
        # entry. A plain tensor attribute: not a parameter, not in the state dict.
        model.logit_scale = torch.zeros(())
    return ModelBundle(model, preprocess_train, preprocess_val, tokenizer, name, model_cfg, scale, bias)


def _text_width(model: nn.Module) -> int:
    positions = getattr(model, "positional_embedding", None)
    if not isinstance(positions, torch.Tensor) or hasattr(model, "text_decoder"):
        raise ClipkitConfigError(f"model.context_length: changing the context needs open_clip's CLIP text tower "
                                 f"(`positional_embedding` and a causal `attn_mask` on the model); "
                                 f"{type(model).__name__} has another")
    return positions.shape[1]


def _set_context(model: nn.Module, target: int, stretch_cfg: PosStretchConfig, *, stretch: bool) -> None:
    """Gives the text tower `target` positions: the pretrained ones stretched by `stretch_cfg`
    (and the kept ones frozen) when `stretch`, else a fresh init (open_clip's: normal, std 0.01)."""
    width = _text_width(model)
    if not stretch:
        fresh = torch.empty(target, width, dtype=model.positional_embedding.dtype)
        set_text_positions(model, nn.init.normal_(fresh, std=0.01))
        return
    freeze = stretch_cfg.freeze_kept
    if freeze is None:
        freeze = stretch_cfg.mode == "longclip"
    if freeze and stretch_cfg.mode != "longclip":
        raise ClipkitConfigError(f"model.pos_stretch.freeze_kept=true needs mode=longclip; "
                                 f"mode={stretch_cfg.mode} keeps no pretrained position as it was")
    with torch.no_grad():
        positions = stretched_positions(model.positional_embedding.detach(), target, mode=stretch_cfg.mode,
                                        keep=stretch_cfg.keep, ratio=stretch_cfg.ratio)
    set_text_positions(model, positions)
    if freeze and stretch_cfg.keep > 0:
        freeze_leading_positions(model, stretch_cfg.keep)


def lock_towers(model: nn.Module, *, image: LockImageConfig | None, text: LockTextConfig | None) -> None:
    """LiT (Zhai et al. 2022): freeze the image and/or text tower with open_clip's own lock.

    Args:
        image: None, or `model.lock_image` (unlocked_groups: N, 0 = all locked; freeze_bn_stats).
        text: None, or `model.lock_text` (unlocked_layers: N; freeze_layer_norm).
    Locked parameters get requires_grad=False, so they get no gradient and no optimizer
    state; frozen BN statistics become FrozenBatchNorm2d and stay fixed in train mode.
    """
    if image is not None:
        model.lock_image_tower(unlocked_groups=image.unlocked_groups, freeze_bn_stats=image.freeze_bn_stats)
    if text is not None:
        model.lock_text_tower(unlocked_layers=text.unlocked_layers, freeze_layer_norm=text.freeze_layer_norm)
        if frozen_position_count(model):
            # Split positions (`pos_stretch.freeze_kept`) read as a computed tensor, which open_clip's
            # lock passes over; they belong to its embedding group, with the token embedding.
            trained_positions(model).requires_grad_(model.token_embedding.weight.requires_grad)


def build_teacher_model(name: str, pretrained: str, config: dict[str, Any] | None = None) -> nn.Module:
    """A complete open_clip model (its logit_scale kept) from a local checkpoint, for distillation."""
    if config is not None:
        _register_inline_config(name, config)
    open_clip_config(name)
    if not Path(pretrained).exists():
        raise ClipkitConfigError(f"model.teacher.pretrained file not found: {pretrained} (train or export "
                                 f"the teacher first, e.g. `make demo` then clipkit-export)")
    return open_clip.create_model(name, pretrained=pretrained)


def compile_towers(model: nn.Module) -> list[str]:
    """`trainer.compile=true`: torch.compile each transformer stack of the towers, in place.

    `nn.Module.compile` compiles a module's forward without wrapping it, so parameter names (and
    with them checkpoints and the open_clip export) stay those of the eager model. The stacks
    are compiled rather than whole towers because TailDrop, FILIP and CoCa call a tower's parts
    (`_embeds`, `transformer`, `_pool`) directly. Returns the compiled modules' names.
    """
    stacks = {"visual.transformer": getattr(getattr(model, "visual", None), "transformer", None),
              "transformer": getattr(model, "transformer", None),
              "text.transformer": getattr(getattr(model, "text", None), "transformer", None),
              "text_decoder": getattr(model, "text_decoder", None)}
    compiled = []
    for name, module in stacks.items():
        if isinstance(module, nn.Module):
            module.compile()
            compiled.append(name)
    return compiled

