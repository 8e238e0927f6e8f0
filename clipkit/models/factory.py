"""Builds open_clip towers, transforms and tokenizer from the `model:` config group.

`model.name` is any open_clip architecture (`ViT-B-32`, `RN50`, ...), random init unless
`model.pretrained` names a tag or a local file. `model.config` is an inline open_clip
model config (the same schema as open_clip's JSON files, e.g. `conf/model/tiny.yaml`);
it is registered under `model.name` so tokenizer and transforms come from open_clip's
own factory exactly as for a built-in name.

The learnable temperature and bias belong to the loss (`conf/loss/*.yaml`), so they are
taken off the open_clip module here and handed over as `pretrained_logit_scale/bias`
when a checkpoint supplied them. Keeping them off the model also spares DeepSpeed the
0-dim parameters it cannot handle (deepspeed 0.19.8).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
from torch import nn

from clipkit.errors import ClipkitConfigError


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
    """Makes `name` a known open_clip architecture (open_clip reads configs from files)."""
    cfg_dir = Path(tempfile.mkdtemp(prefix="clipkit_model_cfg_"))
    (cfg_dir / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(cfg_dir)


def open_clip_config(name: str) -> dict[str, Any]:
    """The open_clip model config registered under `name`."""
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ClipkitConfigError(
            f"model.name={name!r} is not an open_clip architecture; pick one of "
            f"open_clip.list_models() or give an inline model.config")
    return cfg


def build_model(name: str, *, pretrained: str | None = None, config: dict[str, Any] | None = None,
                precision: str = "fp32") -> ModelBundle:
    """Creates the towers, train/val transforms and tokenizer for one architecture.

    Args:
        name: open_clip architecture name, or the name to register `config` under.
        pretrained: open_clip pretrained tag or a local checkpoint path (nothing is downloaded
            unless a tag is given and the hub is reachable).
        config: inline open_clip model config dict; None uses open_clip's built-in `name`.
        precision: open_clip precision string for tower weights ("fp32" while DeepSpeed owns casting).
    """
    if config is not None:
        _register_inline_config(name, config)
    model_cfg = open_clip_config(name)
    if pretrained is not None and Path(pretrained).suffix and not Path(pretrained).exists():
        raise ClipkitConfigError(f"model.pretrained file not found: {pretrained}")
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        name, pretrained=pretrained, precision=precision)
    tokenizer = open_clip.get_tokenizer(name)

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
    return ModelBundle(model, preprocess_train, preprocess_val, tokenizer, name, model_cfg, scale, bias)
