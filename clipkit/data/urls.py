"""Shard URL specs (`a/{000..009}.tar::pipe:aws s3 cp s3://b/{0..3}.tar -`) to concrete URL lists."""

from __future__ import annotations

import os
from collections.abc import Sequence

from braceexpand import braceexpand

from clipkit.errors import ClipkitConfigError


def is_local(url: str) -> bool:
    """True for a plain filesystem path (not `pipe:` and no `scheme://`)."""
    return not url.startswith("pipe:") and "://" not in url


def expand_urls(spec: str | Sequence[str]) -> list[str]:
    """Brace-expands every `::`-joined source in `spec`, in order.

    Local paths are checked up front so that a typo fails here, in one line, rather
    than as an empty epoch inside a dataloader worker; `pipe:` and remote URLs are
    passed through unchecked.
    """
    parts = [spec] if isinstance(spec, str) else list(spec)
    shown = "::".join(parts)
    urls = [url for part in parts for source in part.split("::") if source.strip()
            for url in braceexpand(source.strip())]
    if not urls:
        raise ClipkitConfigError(f"no shard URLs in '{shown}'")
    missing = [url for url in urls if is_local(url) and not os.path.exists(url)]
    if missing:
        more = f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else ""
        raise ClipkitConfigError(f"shard not found: {missing[0]}{more} in '{shown}'")
    return urls
