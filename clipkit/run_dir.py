"""The run directory's layout, in one place, and the atomic writes everything in it uses.

A run directory is named by `run_name` (`outputs/<run_name>`), never time-stamped, so a
restarted or requeued job finds its checkpoints again. Every other module asks `RunDir`
for a path instead of spelling a file name:

    config.yaml              the resolved config of the latest launch
    open_clip_config.json    open_clip model + preprocess config of the towers
    metrics.jsonl            one JSON record per log interval and eval (rank 0)
    training_curves.png      loss and zero-shot top-1 over steps
    checkpoints/step_*/      DeepSpeed tag directories; checkpoints/latest names the newest complete one
    export/                  open_clip weights + config (`clipkit-export`, end of training)
    eval/                    CLIP_benchmark JSONs of the training-time evals
    data_keys/rank*.jsonl    `data.record_keys=true`: the sample keys of every step
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from clipkit.errors import ClipkitConfigError

OPEN_CLIP_CONFIG = "open_clip_config.json"   # open_clip's own name (`local-dir:` reads it)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes `path` so that a reader (or a kill) sees the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(Path(path), text.encode("utf-8"))


@dataclass(frozen=True)
class RunDir:
    """Paths of one run directory; creating the object touches nothing on disk."""

    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    @property
    def name(self) -> str:
        return self.root.name

    def check_writable(self) -> None:
        """Raises a one-line ClipkitConfigError when the run directory cannot be created or
        written (a path through a file, a read-only mount), without creating anything."""
        existing = self.root
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise ClipkitConfigError(f"run directory {self.root} cannot be created: {existing} is a file, not a "
                                     f"directory (set paths.output_dir or run_name)")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ClipkitConfigError(f"run directory {self.root} cannot be written: {existing} is read-only for "
                                     f"this user or mount (set paths.output_dir)")

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def open_clip_config(self) -> Path:
        return self.root / OPEN_CLIP_CONFIG

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def curves(self) -> Path:
        return self.root / "training_curves.png"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def data_keys(self) -> Path:
        return self.root / "data_keys"
