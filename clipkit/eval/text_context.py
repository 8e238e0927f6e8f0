"""Eval captions at a set's own context length (`eval.sets.<name>.context_length`).

Long-caption retrieval (Long-CLIP's Urban-1k, DCI, DOCCI; the digits demo's long captions)
tokenizes a set's captions at more tokens than CLIP's 77, so the text tower must have at least
that many positions: `model.context_length` (with `model.pos_stretch` when a 77-position
checkpoint is loaded, docs/texts.md, "Long text context"). A set asking for more positions than the model has is refused with one
line before anything is embedded, instead of failing inside the tower.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clipkit.errors import ClipkitConfigError
from clipkit.models.positions import check_text_length

Tokenizer = Callable[..., torch.Tensor]   # (texts, context_length=None) -> [n, L] long, as open_clip's


def model_text_positions(model: nn.Module) -> int | None:
    """The number of text positions the model has, or None when it says nothing (no check then).

    Accepts an open_clip model or an objective holding one as `.model`. open_clip's `CLIP` and
    `TextTransformer` keep it as `context_length`, and clipkit's `model.context_length` (with or
    without `model.pos_stretch`) updates it with the positions (`clipkit.models.positions`).
    Otherwise the rows of the tower's positional table count; under ZeRO-3 a partitioned
    parameter keeps its full shape in `ds_shape`.
    """
    model = getattr(model, "model", model)
    for tower in (model, getattr(model, "text", None)):
        if isinstance(getattr(tower, "context_length", None), int):
            return int(tower.context_length)
    for tower in (model, getattr(model, "text", None)):
        table = getattr(tower, "positional_embedding", None)
        if isinstance(table, torch.Tensor):
            shape = tuple(getattr(table, "ds_shape", table.shape))
            if len(shape) == 2:
                return int(shape[0])
    return None


def check_context_length(set_name: str, context_length: int | None, positions: int | None) -> None:
    """One-line config error when `eval.sets.<set_name>.context_length` exceeds the model's positions
    (the same words as a text role's `data.texts.<role>.context_length`)."""
    if context_length is not None and positions is not None:
        check_text_length(context_length, positions, f"eval.sets.{set_name}.context_length")


def check_text_context(specs: Sequence, model: nn.Module) -> None:
    """`check_context_length` for every eval set spec (anything with `name` and `context_length`)."""
    positions = model_text_positions(model)
    for spec in specs:
        check_context_length(spec.name, spec.context_length, positions)


def set_tokenizer(tokenizer: Tokenizer, context_length: int | None, positions: int | None) -> Tokenizer:
    """The tokenizer of one eval set: n strings -> [n, max(context_length, positions)] long.

    None keeps `tokenizer` (the model's own length). Otherwise captions are tokenized (and
    truncated, EOT kept as open_clip does) at `context_length`, then right-padded to the model's
    `positions`: open_clip's `encode_text` adds its whole positional table, so it takes exactly
    that many tokens. The padding is the tokenizer's own pad token (read off an empty string),
    so the result is what tokenizing at the model's length would give for any caption that fits
    in `context_length`; clipkit's trimmed text encoder drops the trailing pads again.
    """
    if context_length is None:
        return tokenizer
    if context_length < 2:
        raise ClipkitConfigError(f"an eval set's context_length must be >= 2 (start and end tokens), got {context_length}")
    pad_id: int | None = None

    def tokenize(texts: list[str]) -> torch.Tensor:
        nonlocal pad_id
        tokens = tokenizer(texts, context_length=context_length)
        if positions is not None and tokens.shape[1] < positions:
            if pad_id is None:
                pad_id = int(tokenizer([""], context_length=positions)[0, -1])
            tokens = F.pad(tokens, (0, positions - tokens.shape[1]), value=pad_id)
        return tokens
    return tokenize
