"""Decoupled image pathways: one ViT trunk, several image heads, each with its own text projection.

The *semantic* head is the tower's own pooled projection (open_clip's `visual.ln_post` and
`visual.proj` on the CLS token) and the model's `text_projection`: a model without
`model.heads` is exactly open_clip's. Each head named in `model.heads` (for example
`perceptual`) pools the trunk's output tokens its own way, with its own LayerNorm and
projection, and pairs with a text projection of its own (or the shared one):

    model.heads: {perceptual: {pool: attn, attn_heads: 8, text_projection: own}}

Every head is a pooling that open_clip's `VisionTransformer` can itself be configured with, and
its parameters carry open_clip's names, so the trunk plus one head is a plain open_clip model
(`head_model_config`, `head_state_dict`; `clipkit-export` writes one per head):

    pool   what it reads                               open_clip vision_cfg of the export
    tok    the CLS token                               (the tower's own pooling)
    avg    the mean of the patch tokens (CLS left out) pool_type: avg
    attn   one learned query attending to all tokens  attentional_pool: true, attn_pooler_queries: 1

`attn` is open_clip's attentional pooler (CoCa's, with one query): pooled = ln_post(attn(q, x)) @ proj,
[b, D]. `tok` and `avg` start as copies of the tower's `ln_post` and `proj`, and an own text
projection as a copy of the model's, so a pretrained model's new head starts from what the
pretrained projection knows; `attn` starts from open_clip's init (its widths differ).

Heads live on the open_clip model as `model.heads.<name>` (state keys `heads.<name>.ln_post.weight`,
`heads.<name>.proj`, `heads.<name>.attn_pool.*`, `heads.<name>.text_projection`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from open_clip.transformer import AttentionalPooler
from torch import nn

from clipkit.errors import ClipkitConfigError

SEMANTIC = "semantic"
POOLS = ("attn", "avg", "tok")
TEXT_PROJECTIONS = ("own", "shared")
HEAD_KEYS = ("pool", "attn_heads", "text_projection")


def head_output(name: str, head: str) -> str:
    """The name of output `name` ("image", "text", "text_<r>") as scored by image head `head`:
    `name` itself for the semantic head, `name@head` for an extra head."""
    return name if head == SEMANTIC else f"{name}@{head}"


def split_head(name: str) -> tuple[str, str]:
    """`image@perceptual` -> ("image", "perceptual"); a name without a head -> (name, "semantic")."""
    base, _, head = name.partition("@")
    return base, head or SEMANTIC


@dataclass(frozen=True)
class HeadSpec:
    """One `model.heads.<name>` entry, checked."""

    name: str
    pool: str = "attn"
    attn_heads: int = 8
    text_projection: str = "own"


def parse_heads(heads: Any) -> list[HeadSpec]:
    """`model.heads` -> its HeadSpecs ([] for null); one-line ClipkitConfigError on an unknown key,
    pool or text projection, the reserved name `semantic`, or a name that is not an identifier."""
    if heads is None:
        return []
    if not isinstance(heads, Mapping):
        raise ClipkitConfigError(f"model.heads must map head names to {{pool: attn|avg|tok, text_projection: "
                                 f"own|shared}}, got {heads!r}")
    specs = []
    for name, spec in heads.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ClipkitConfigError(f"model.heads: a head name must be a Python identifier, got {name!r}")
        if name == SEMANTIC:
            raise ClipkitConfigError("model.heads.semantic: the semantic head is the tower's own pooled projection "
                                     "and is always there; name only the extra heads (e.g. perceptual)")
        spec = dict(spec or {})
        unknown = sorted(set(spec) - set(HEAD_KEYS))
        if unknown:
            raise ClipkitConfigError(f"model.heads.{name}.{unknown[0]} is not a head key; use {', '.join(HEAD_KEYS)}")
        parsed = HeadSpec(name, **spec)
        if parsed.pool not in POOLS:
            raise ClipkitConfigError(f"model.heads.{name}.pool={parsed.pool!r} is not one of {', '.join(POOLS)}")
        if parsed.text_projection not in TEXT_PROJECTIONS:
            raise ClipkitConfigError(f"model.heads.{name}.text_projection={parsed.text_projection!r} is not one of "
                                     f"{', '.join(TEXT_PROJECTIONS)}")
        if isinstance(parsed.attn_heads, bool) or not isinstance(parsed.attn_heads, int) or parsed.attn_heads < 1:
            raise ClipkitConfigError(f"model.heads.{name}.attn_heads must be a positive integer, "
                                     f"got {parsed.attn_heads!r}")
        specs.append(parsed)
    return specs


def _is_plain_vit(visual: nn.Module) -> bool:
    return all(hasattr(visual, name) for name in ("_embeds", "transformer", "_pool", "ln_post", "proj"))


class ImageHead(nn.Module):
    """One extra pathway: trunk tokens [b, 1 + N, w] -> pooled, projected [b, D] (not normalized),
    and, when it has its own, the text projection [w_text, D] for its texts."""

    def __init__(self, spec: HeadSpec, visual: nn.Module, text_projection: Any):
        super().__init__()
        self.spec = spec
        width = visual.conv1.out_channels
        output_dim = visual.output_dim
        norm = type(visual.ln_post)
        if spec.pool == "attn":
            if output_dim % spec.attn_heads:
                raise ClipkitConfigError(f"model.heads.{spec.name}.attn_heads={spec.attn_heads} does not divide the "
                                         f"embedding width {output_dim}")
            # open_clip's VisionTransformer(attentional_pool=True, attn_pooler_queries=1): the pooler
            # works at the output width, then ln_post and a square projection.
            self.attn_pool = AttentionalPooler(output_dim, width, n_head=spec.attn_heads, n_queries=1,
                                               norm_layer=norm)
            self.ln_post = norm(output_dim, eps=visual.ln_post.eps)
            self.proj = nn.Parameter(width ** -0.5 * torch.randn(output_dim, output_dim))
        else:
            self.attn_pool = None
            self.ln_post = copy.deepcopy(visual.ln_post)
            self.proj = nn.Parameter(visual.proj.detach().clone())
        if spec.text_projection == "own":
            if isinstance(text_projection, nn.Module):
                self.text_projection = copy.deepcopy(text_projection)
            else:
                self.text_projection = nn.Parameter(text_projection.detach().clone())
        else:
            self.text_projection = None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[b, 1 + N, w] trunk outputs (CLS first) -> [b, D]; the same math as open_clip's
        `VisionTransformer._pool` + `proj` under this head's `head_model_config`."""
        if self.attn_pool is not None:
            pooled = self.ln_post(self.attn_pool(tokens))[:, 0]
        elif self.spec.pool == "avg":
            pooled = self.ln_post(tokens)[:, 1:].mean(dim=1)
        else:
            pooled = self.ln_post(tokens)[:, 0]
        return pooled @ self.proj


def add_image_heads(model: nn.Module, specs: list[HeadSpec], model_name: str) -> None:
    """Attaches `model.heads` (an nn.ModuleDict of ImageHead) to an open_clip CLIP, in place.
    Refuses, in one line, towers that have no patch tokens to pool (ResNets, timm towers) or that
    already pool with an attentional pooler (CoCa), and own text projections on text towers
    without one."""
    if not specs:
        return
    visual = model.visual
    if not _is_plain_vit(visual) or visual.proj is None:
        raise ClipkitConfigError(f"model.heads needs open_clip's ViT image tower (patch tokens, ln_post, proj) to "
                                 f"pool; model={model_name} has {type(visual).__name__}")
    if getattr(visual, "attn_pool", None) is not None or hasattr(model, "text_decoder"):
        raise ClipkitConfigError(f"model.heads: model={model_name} already pools its image tokens with an "
                                 f"attentional pooler (CoCa); extra heads need a ViT that pools its CLS token")
    if getattr(visual, "final_ln_after_pool", False) or getattr(visual, "pool_type", "tok") != "tok":
        raise ClipkitConfigError(f"model.heads: model={model_name} pools with pool_type="
                                 f"{getattr(visual, 'pool_type', '?')} (final_ln_after_pool="
                                 f"{getattr(visual, 'final_ln_after_pool', False)}); extra heads need the CLS pooling")
    projection = getattr(model, "text_projection", None)
    for spec in specs:
        if spec.text_projection == "own" and projection is None:
            raise ClipkitConfigError(f"model.heads.{spec.name}.text_projection=own: model={model_name}'s text tower "
                                     f"has no text_projection to copy; use text_projection: shared")
    model.heads = nn.ModuleDict({spec.name: ImageHead(spec, visual, projection) for spec in specs})


def head_names(model: nn.Module) -> tuple[str, ...]:
    """("semantic", *the extra heads) of a model; ("semantic",) without `model.heads`."""
    heads = getattr(model, "heads", None)
    return (SEMANTIC, *(heads.keys() if isinstance(heads, nn.ModuleDict) else ()))


def head_model_config(model_cfg: Mapping[str, Any], spec: HeadSpec) -> dict[str, Any]:
    """The open_clip model config of the trunk plus head `spec`: the tower's `vision_cfg` with the
    head's pooling (module docstring's table)."""
    config = copy.deepcopy(dict(model_cfg))
    vision = dict(config.get("vision_cfg", {}))
    if spec.pool == "attn":
        vision.update(attentional_pool=True, attn_pooler_queries=1, attn_pooler_heads=spec.attn_heads)
    elif spec.pool == "avg":
        vision["pool_type"] = "avg"
    config["vision_cfg"] = vision
    return config


def head_state_dict(state: Mapping[str, torch.Tensor], head: str) -> dict[str, torch.Tensor]:
    """An open_clip state dict with extra heads (`heads.<name>.*`) -> the state dict of the plain
    open_clip model for `head`: its pooling, ln_post and proj in place of the tower's, its own text
    projection (if any) in place of the model's, and every other head's keys dropped."""
    prefix = f"heads.{head}."
    out = {k: v for k, v in state.items() if not k.startswith("heads.")}
    if head == SEMANTIC:
        return out
    if not any(k.startswith(prefix) for k in state):
        raise ClipkitConfigError(f"the checkpoint has no head {head!r} (its heads: "
                                 f"{', '.join(sorted({k.split('.')[1] for k in state if k.startswith('heads.')}))})")
    for key in [k for k in out if k.startswith(("visual.ln_post.", "visual.proj"))]:
        del out[key]
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        if rest.startswith("text_projection"):
            out[rest] = value
        else:
            out[f"visual.{rest}"] = value
    return out
