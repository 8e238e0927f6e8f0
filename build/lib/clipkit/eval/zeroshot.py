"""Zero-shot classifier weights: one prompt-ensembled text embedding per class."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from clipkit.errors import ClipkitConfigError


def zeroshot_classifier(
    encode_text: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
) -> torch.Tensor:
    """Class embeddings from prompt templates, as in CLIP / CLIP_benchmark.

    Args:
        encode_text: list of n strings -> [n, D] embeddings (any float dtype, need not
            be normalized). Called once per class with every template filled in.
        classnames: the C class names.
        templates: CLIP_benchmark-style strings with a `{c}` placeholder, e.g.
            "a photo of a {c}.".

    Returns:
        [C, D] float32 on encode_text's device: per class, the mean over templates of
        the L2-normalized prompt embeddings, renormalized to unit length.
    """
    if not classnames or not templates:
        raise ClipkitConfigError("zero-shot classification needs at least one class name and one template")
    bad = [t for t in templates if "{c}" not in t]
    if bad:
        raise ClipkitConfigError(f"zero-shot templates must contain '{{c}}' for the class name; these do not: {bad[:3]}")
    rows = []
    with torch.no_grad():
        for name in classnames:
            # str.replace, not str.format: templates may contain other braces.
            prompts = [t.replace("{c}", name) for t in templates]
            emb = F.normalize(encode_text(prompts).float(), dim=-1)  # [T, D]
            rows.append(F.normalize(emb.mean(dim=0), dim=-1))
    return torch.stack(rows)
