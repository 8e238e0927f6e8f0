"""On-disk embedding cache: an EmbeddedSet saved as .npy files, keyed by (model, set, checkpoint tag).

`eval.cache_dir: <dir>` turns it on; a second eval of the same checkpoint on the same set
(another search index, another k) then skips the encoders. Layout:
`<cache_dir>/<model>/<set>/<tag>/{image_emb,text_emb,text_image_index,labels}.npy`, and the
zero-shot head beside it: `<cache_dir>/<model>/<set>/<tag>-zeroshot/classifier-<digest>.npy`
(the digest covers the class names, templates and context length).
The key does not see preprocessing or set contents: change the tag (or clear the
directory) when those change. Under several processes the directory must be shared
(every rank checks it, rank 0 writes it), or ranks would disagree about embedding.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from clipkit.eval.embed import EmbeddedSet

FIELDS = ("image_emb", "text_emb", "text_image_index", "labels")


def _slug(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", part).strip("_") or "_"


def cache_path(cache_dir: str | os.PathLike, model: str, set_name: str, tag: str) -> Path:
    return Path(cache_dir) / _slug(model) / _slug(set_name) / _slug(tag)


def load_embedded(path: Path) -> EmbeddedSet | None:
    """The cached set at `path` as CPU tensors, or None when it is absent."""
    if not all((path / f"{f}.npy").exists() for f in FIELDS):
        return None
    return EmbeddedSet(**{f: torch.from_numpy(np.load(path / f"{f}.npy")) for f in FIELDS})


def save_embedded(path: Path, emb: EmbeddedSet) -> None:
    """Writes every field to a temp directory beside `path`, then renames it: never half a cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        for f in FIELDS:
            np.save(tmp / f"{f}.npy", getattr(emb, f).detach().cpu().numpy())
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_array(path: Path) -> torch.Tensor | None:
    """One cached array (the zero-shot head, [C, D]) as a CPU tensor, or None when absent."""
    return torch.from_numpy(np.load(path)) if path.exists() else None


def save_array(path: Path, array: torch.Tensor) -> None:
    """Writes `array` to a temp file beside `path`, then renames it: never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".npy")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array.detach().cpu().numpy())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
