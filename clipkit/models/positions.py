"""A text tower with a longer context than its pretrained weights: `model.context_length` and
`model.pos_stretch` (docs/texts.md, "Long text context").

Long-CLIP (Zhang et al. 2024, beichenzbc/Long-CLIP `model/longclip.py::load_from_clip`) stretches
CLIP's 77 learned text positions to 248 while keeping what the first ones learned: positions
below `keep` (20) are copied, and each later one maps to the source coordinate

    c(p) = keep + (p − keep) / ratio          (ratio 4: 4·(77 − 20) + 20 = 248 positions)

read by linear interpolation between the two pretrained positions around it, or past the last
one extrapolated along the last gap: PE[L−1] + (c − (L−1))·(PE[L−1] − PE[L−2]). Long-CLIP then
trains only the positions from `keep` on. `uniform` is open_clip's `resize_text_pos_embed`
instead: every position linearly interpolated (`F.interpolate`, align_corners=False).

Freezing the kept rows must also hold against AdamW's weight decay and under DeepSpeed's
ZeRO 0-3, where the optimizer steps flat fp32 copies of the parameters: a gradient mask would
not stop the decay. So the kept rows are a parameter of their own with requires_grad=False (no
gradient, no optimizer state, no decay, at every ZeRO stage), as in Long-CLIP, and the trained
rows another. open_clip's code reads `model.positional_embedding`; torch's parametrization
(`torch.nn.utils.parametrize`) keeps that attribute as cat(kept, trained), computed in a module
call so ZeRO-3 gathers both halves there. The clipkit checkpoint holds the two halves
(`parametrizations.positional_embedding.original` and `...0.kept`); the open_clip export joins
them into the single `positional_embedding` tensor (`join_kept_positions`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from clipkit.errors import ClipkitConfigError

MODES = ("longclip", "uniform")
# State-dict key suffixes of a positional embedding split by `freeze_leading_positions`.
_TRAINED = "parametrizations.positional_embedding.original"
_KEPT = "parametrizations.positional_embedding.0.kept"


def longclip_length(length: int, keep: int, ratio: float) -> int:
    """keep + ratio·(length − keep): the stretched context; a one-line error unless it is whole."""
    stretched = keep + ratio * (length - keep)
    if abs(stretched - round(stretched)) > 1e-9:
        raise ClipkitConfigError(f"model.pos_stretch: keep {keep} + ratio {ratio} x ({length} - {keep}) = "
                                 f"{stretched:g} positions is not a whole number")
    return round(stretched)


def longclip_stretch(positions: torch.Tensor, *, keep: int = 20, ratio: float = 4) -> torch.Tensor:
    """Long-CLIP's knowledge-preserving stretch: [L, W] -> [keep + ratio·(L − keep), W], same dtype.

    Rows below `keep` are copied; row p >= keep is the source coordinate c = keep + (p − keep)/ratio,
    linearly interpolated between rows floor(c) and floor(c) + 1 (weights 1 − t, t), or, past row
    L − 1, extrapolated PE[L−1] + (c − (L−1))·(PE[L−1] − PE[L−2]). With an integer ratio each
    weight is j/ratio exactly and the sums are formed as Long-CLIP's loop forms them, so ratio 4
    gives its values bit for bit (tests/unit/test_long_context.py).
    """
    length, _ = positions.shape
    if not 0 <= keep <= length - 2:
        raise ClipkitConfigError(f"model.pos_stretch.keep={keep} must be in [0, {length - 2}] for {length} "
                                 f"pretrained positions (the last two set the extrapolation)")
    if ratio < 1:
        raise ClipkitConfigError(f"model.pos_stretch.ratio={ratio} < 1 would shrink the context; use "
                                 f"model.pos_stretch.mode=uniform to shorten it")
    new_length = longclip_length(length, keep, ratio)
    offsets = torch.arange(new_length - keep, dtype=torch.float64)
    gap = torch.floor(offsets / ratio)
    t = (offsets - gap * ratio) / ratio          # j/ratio, exact for an integer ratio
    last = length - 1 - keep                      # gaps that have a right-hand row
    inside = gap < last
    left = (keep + gap.clamp(max=last - 1)).long()
    out = positions.new_empty(new_length, positions.shape[1])
    out[:keep] = positions[:keep]
    # Interpolated rows: (1 − t)·PE[i] + t·PE[i+1], Long-CLIP's `3*a/4 + 1*b/4` (a power-of-two
    # divisor scales exactly, so (3a)/4 == 0.75·a in floating point).
    w_left = (1 - t[inside]).to(positions.dtype)[:, None]
    w_right = t[inside].to(positions.dtype)[:, None]
    rows = left[inside]
    out[keep:][inside] = w_left * positions[rows] + w_right * positions[rows + 1]
    # Extrapolated rows: PE[L−1] + k·(PE[L−1] − PE[L−2])/ratio with k = (c − (L−1))·ratio.
    step = (offsets[~inside] - last * ratio) / ratio
    slope = positions[length - 1] - positions[length - 2]
    out[keep:][~inside] = positions[length - 1] + step.to(positions.dtype)[:, None] * slope
    return out


def uniform_resize(positions: torch.Tensor, new_length: int) -> torch.Tensor:
    """open_clip's `resize_text_pos_embed`: [L, W] -> [new_length, W], every position linearly
    interpolated (align_corners=False, no antialiasing), computed in float32 and cast back."""
    resized = F.interpolate(positions.float().T[None], size=new_length, mode="linear", align_corners=False)
    return resized[0].T.to(positions.dtype).contiguous()


def causal_mask(length: int, like: torch.Tensor | None = None) -> torch.Tensor:
    """open_clip's text causal mask [length, length]: −inf above the diagonal, 0 elsewhere."""
    mask = torch.full((length, length), float("-inf"))
    mask = mask.triu_(1)
    return mask if like is None else mask.to(dtype=like.dtype, device=like.device)


def _check_clip_text_tower(model: nn.Module) -> None:
    if not isinstance(getattr(model, "positional_embedding", None), torch.Tensor) or not hasattr(model, "attn_mask"):
        raise ClipkitConfigError(
            f"model.context_length: changing the context needs open_clip's CLIP text tower (a "
            f"`positional_embedding` and causal `attn_mask` on the model); {type(model).__name__} has none")


def set_text_positions(model: nn.Module, positions: torch.Tensor) -> None:
    """Gives an open_clip `CLIP` the text positions [C, W] (a new trainable parameter) and the
    matching context: `context_length` = C and a [C, C] causal `attn_mask`."""
    _check_clip_text_tower(model)
    if parametrize.is_parametrized(model, "positional_embedding"):
        raise ClipkitConfigError("the text positions are already split into kept and trained rows")
    old = model.positional_embedding
    model.positional_embedding = nn.Parameter(positions.to(old.dtype).clone(), requires_grad=old.requires_grad)
    model.context_length = positions.shape[0]
    if model.attn_mask is not None:
        model.attn_mask = causal_mask(positions.shape[0], like=model.attn_mask)


class KeptRows(nn.Module):
    """The parametrization behind `freeze_leading_positions`: trained [C − keep, W] ->
    cat(kept [keep, W] (frozen), trained) = the [C, W] positional embedding."""

    def __init__(self, kept: torch.Tensor):
        super().__init__()
        self.kept = nn.Parameter(kept.detach().clone(), requires_grad=False)

    def forward(self, trained: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.kept.to(trained.dtype), trained])

    def right_inverse(self, full: torch.Tensor) -> torch.Tensor:
        return full[self.kept.shape[0]:].clone()


def freeze_leading_positions(model: nn.Module, keep: int) -> None:
    """Long-CLIP's freeze: the first `keep` text positions get no gradient, optimizer state or
    weight decay; `model.positional_embedding` still reads as the whole [C, W] tensor."""
    _check_clip_text_tower(model)
    full = model.positional_embedding
    if not 0 < keep < full.shape[0]:
        raise ClipkitConfigError(f"model.pos_stretch.keep={keep} must be in [1, {full.shape[0] - 1}] to freeze "
                                 f"the kept positions of {full.shape[0]}")
    parametrize.register_parametrization(model, "positional_embedding", KeptRows(full.detach()[:keep]), unsafe=True)


def frozen_position_count(model: nn.Module) -> int:
    """How many leading text positions are frozen (0 when none are)."""
    if not parametrize.is_parametrized(model, "positional_embedding"):
        return 0
    return model.parametrizations.positional_embedding[0].kept.shape[0]


def trained_positions(model: nn.Module) -> nn.Parameter:
    """The parameter that holds the trained text positions ([C − keep, W] when the first keep are
    frozen, else the whole [C, W] `positional_embedding`)."""
    if parametrize.is_parametrized(model, "positional_embedding"):
        return model.parametrizations.positional_embedding.original
    return model.positional_embedding


def join_kept_positions(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict whose split text positions (`<prefix>parametrizations.positional_embedding.original`
    [C − keep, W] and `...0.kept` [keep, W]) are joined into `<prefix>positional_embedding` [C, W],
    the single tensor open_clip loads; every other entry is passed through."""
    out = {}
    for key, value in state.items():
        if key.endswith(_KEPT):
            continue
        if key.endswith(_TRAINED):
            prefix = key[: -len(_TRAINED)]
            kept = state.get(prefix + _KEPT)
            if kept is None:
                raise ClipkitConfigError(f"the state dict has {key} but not {prefix + _KEPT}")
            out[prefix + "positional_embedding"] = torch.cat([kept.to(value.dtype), value])
        else:
            out[key] = value
    return out


def _position_shape(state: Mapping[str, object]) -> int | None:
    for key in ("positional_embedding", "text.positional_embedding"):
        for prefix in ("", "module."):
            value = state.get(prefix + key)
            if value is not None and hasattr(value, "shape"):
                return int(value.shape[0])
    return None


def pretrained_positions(path: str | Path) -> int | None:
    """The number of text positions in a local open_clip/CLIP weights file, read without loading
    its tensors; None when the file has none or is no state dict (a TorchScript archive)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            for key in ("positional_embedding", "text.positional_embedding"):
                if key in f.keys():
                    return int(f.get_slice(key).get_shape()[0])
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:   # TorchScript (OpenAI's .pt) or a format open_clip itself reads: it decides
        return None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    return _position_shape(state) if isinstance(state, Mapping) else None


def stretched_positions(positions: torch.Tensor, new_length: int, *, mode: str, keep: int,
                        ratio: float | None) -> torch.Tensor:
    """[L, W] pretrained positions -> [new_length, W] by `mode` (`longclip` or `uniform`).

    longclip: `ratio` None is (new_length − keep)/(L − keep); a given ratio must produce new_length.
    """
    length = positions.shape[0]
    if mode not in MODES:
        raise ClipkitConfigError(f"model.pos_stretch.mode={mode!r} is not one of {', '.join(MODES)}")
    if mode == "uniform":
        return uniform_resize(positions, new_length)
    if ratio is None:
        if length - keep <= 0:
            raise ClipkitConfigError(f"model.pos_stretch.keep={keep} leaves none of {length} positions to stretch")
        ratio = (new_length - keep) / (length - keep)
    elif longclip_length(length, keep, ratio) != new_length:
        derived = (new_length - keep) / (length - keep)
        raise ClipkitConfigError(
            f"model.context_length={new_length}, but model.pos_stretch (longclip, keep {keep}, ratio {ratio:g}) "
            f"stretches {length} positions to {longclip_length(length, keep, ratio)}; set model.context_length="
            f"{longclip_length(length, keep, ratio)} or model.pos_stretch.ratio=null (it is then {derived:.4g})")
    if not math.isfinite(ratio):
        raise ClipkitConfigError(f"model.pos_stretch.ratio={ratio} is not finite")
    return longclip_stretch(positions, keep=keep, ratio=ratio)


def check_text_length(length: int, context_length: int, what: str) -> None:
    """A one-line error when texts tokenized to `length` positions (`what`, e.g.
    `data.texts.long.context_length`) do not fit the model's `context_length`. Shorter is exact
    for a causal CLIP tower (`clipkit.models.outputs` runs the first `length` positions)."""
    if length > context_length:
        raise ClipkitConfigError(f"{what}={length} exceeds the model's text context of {context_length} "
                                 f"positions; lower it or set model.context_length={length}")
