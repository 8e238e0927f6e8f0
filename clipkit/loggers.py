"""Metric sinks for rank 0: JSONL always (`metrics.jsonl` in the run dir), wandb when
`logger=wandb` (`WANDB_MODE=offline` works with no account and no network)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from clipkit.run_dir import RunDir


class JsonlLogger:
    """Appends one JSON object per `log` call; flushed each line so a crash loses nothing.

    Each line also gets `time`, the wall clock in unix seconds (a float), unless the record
    brings its own: steps alone cannot tell a slow stretch from a requeued job's wait in the queue.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()}
        clean.setdefault("time", time.time())
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class WandbLogger:
    def __init__(self, *, project: str, run_name: str, run_dir: str | Path, config: dict[str, Any],
                 mode: str, entity: str | None = None, tags: list[str] | None = None):
        import wandb

        # id=run_name makes a resumed run append to the same wandb run.
        self._run = wandb.init(project=project, name=run_name, id=run_name, resume="allow",
                               dir=str(run_dir), config=config, mode=mode, entity=entity,
                               tags=list(tags or []))

    def log(self, record: dict[str, Any]) -> None:
        step = record.get("step")
        self._run.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def close(self) -> None:
        self._run.finish()


class MetricLoggers:
    """Fans one record out to every sink; a no-op on ranks other than 0."""

    def __init__(self, sinks: list):
        self.sinks = sinks

    def log(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def build_loggers(wandb_cfg: dict[str, Any] | None, *, run_dir: RunDir, run_name: str,
                  config: dict[str, Any], is_main: bool) -> MetricLoggers:
    """`wandb_cfg` is `logger.wandb` (null disables wandb)."""
    if not is_main:
        return MetricLoggers([])
    sinks: list = [JsonlLogger(run_dir.metrics)]
    if wandb_cfg:
        sinks.append(WandbLogger(run_name=run_name, run_dir=run_dir.root, config=config, **wandb_cfg))
    return MetricLoggers(sinks)
