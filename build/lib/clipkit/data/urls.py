"""Shard URL specs (`a/{000..009}.tar::pipe:aws s3 cp s3://b/{0..3}.tar -`) to concrete URL lists and sources."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

from braceexpand import braceexpand

from clipkit.errors import ClipkitConfigError


@dataclass(frozen=True)
class Source:
    """One `::`-separated part of `data.train_urls`: its name in the logs, shards and mixing weight."""

    name: str
    urls: tuple[str, ...]
    weight: float = 1.0


def is_local(url: str) -> bool:
    """True for a plain filesystem path (not `pipe:` and no `scheme://`)."""
    return not url.startswith("pipe:") and "://" not in url


def _parts(spec: str | Sequence[str]) -> list[str]:
    parts = [spec] if isinstance(spec, str) else list(spec)
    return [source.strip() for part in parts for source in part.split("::") if source.strip()]


def _check_local(urls: list[str], shown: str) -> None:
    """Local paths are checked up front so that a typo fails here, in one line, rather than
    as an empty epoch inside a dataloader worker; `pipe:` and remote URLs pass unchecked."""
    if not urls:
        raise ClipkitConfigError(f"no shard URLs in '{shown}'")
    missing = [url for url in urls if is_local(url) and not os.path.exists(url)]
    if missing:
        more = f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else ""
        raise ClipkitConfigError(f"shard not found: {missing[0]}{more} in '{shown}'")


def expand_urls(spec: str | Sequence[str]) -> list[str]:
    """Brace-expands every `::`-joined source in `spec`, in order."""
    shown = spec if isinstance(spec, str) else "::".join(spec)
    urls = [url for source in _parts(spec) for url in braceexpand(source)]
    _check_local(urls, shown)
    return urls


def expand_sources(spec: str | Sequence[str], weights: Sequence[float] | None = None,
                   names: Sequence[str] | None = None) -> list[Source]:
    """One `Source` per `::`-joined part of `spec`; weights default to 1, names to `source0, source1, ...`."""
    shown = spec if isinstance(spec, str) else "::".join(spec)
    parts = _parts(spec)
    _check_local([url for part in parts for url in braceexpand(part)], shown)
    for what, values in (("data.weights", weights), ("data.source_names", names)):
        if values is not None and len(values) != len(parts):
            raise ClipkitConfigError(f"{what} has {len(values)} entries for {len(parts)} '::'-joined sources in '{shown}'")
    weights = [1.0] * len(parts) if weights is None else [float(w) for w in weights]
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise ClipkitConfigError(f"data.weights must be positive numbers, got {list(weights)}")
    names = [f"source{i}" for i in range(len(parts))] if names is None else [str(n) for n in names]
    if len(set(names)) != len(names):
        raise ClipkitConfigError(f"data.source_names must be distinct, got {names}")
    return [Source(name, tuple(braceexpand(part)), weight) for name, part, weight in zip(names, parts, weights)]
