"""Zero-shot classifier weights: one prompt-ensembled text embedding per class.

Built once per checkpoint and set: every class x template prompt in one pass, identical prompts
encoded once, sorted by length so each batch of the trimmed text tower (`encode_text_pooled`
runs only up to a batch's last real token) carries few pads. ImageNet's 1,000 classes x 80
templates are 80,000 prompts; `benchmarks/eval_bench.py --zeroshot` measures their cost.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from clipkit.errors import ClipkitConfigError


def class_prompts(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """The C x T prompts, class-major: prompt c * T + t is template t filled with class c.

    str.replace, not str.format: templates may contain other braces."""
    if not classnames or not templates:
        raise ClipkitConfigError("zero-shot classification needs at least one class name and one template")
    bad = [t for t in templates if "{c}" not in t]
    if bad:
        raise ClipkitConfigError(f"zero-shot templates must contain '{{c}}' for the class name; these do not: {bad[:3]}")
    return [t.replace("{c}", name) for name in classnames for t in templates]


def classifier_key(classnames: Sequence[str], templates: Sequence[str], extra: str = "") -> str:
    """A short digest of the class names, templates (and e.g. the context length) for cache file names."""
    blob = json.dumps([list(classnames), list(templates), extra]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def zeroshot_classifier(
    encode_text: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    batch_size: int = 4096,
    stats: dict[str, int] | None = None,
) -> torch.Tensor:
    """Class embeddings from prompt templates, as in CLIP / CLIP_benchmark.

    Args:
        encode_text: list of n strings -> [n, D] embeddings (any float dtype, need not be
            normalized). Called with up to `batch_size` distinct prompts at a time, across
            classes, shortest first (it may batch further itself).
        classnames: the C class names.
        templates: CLIP_benchmark-style strings with a `{c}` placeholder, e.g.
            "a photo of a {c}.".
        stats: if given, receives `prompts` (C x T) and `encoded` (distinct prompts).

    Returns:
        [C, D] float32 on encode_text's device: per class, the mean over templates of the
        L2-normalized prompt embeddings, renormalized to unit length. A prompt that occurs
        twice (a repeated template, or two classes whose prompts coincide) is encoded once and
        still counts once per occurrence in its class's mean.
    """
    prompts = class_prompts(classnames, templates)
    distinct = sorted(set(prompts), key=lambda p: (len(p), p))
    row = {p: i for i, p in enumerate(distinct)}
    with torch.no_grad():
        parts = [F.normalize(encode_text(distinct[i:i + batch_size]).float(), dim=-1)
                 for i in range(0, len(distinct), batch_size)]
        emb = torch.cat(parts)                                              # [U, D]
        index = torch.tensor([row[p] for p in prompts], device=emb.device)
        per_prompt = emb[index].view(len(classnames), len(templates), -1)    # [C, T, D]
    if stats is not None:
        stats.update(prompts=len(prompts), encoded=len(distinct))
    return F.normalize(per_prompt.mean(dim=1), dim=-1)
