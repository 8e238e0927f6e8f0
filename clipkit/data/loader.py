"""The training loader: a DataLoader over `ShardStream` that tracks what the trainer consumed.

DataLoader workers run ahead (prefetch), so the data position saved in a checkpoint is
taken from the batches the trainer actually received, never from what workers produced:
each batch carries its stream's position after it, and `TrainLoader` keeps, per stream,
the position of the last batch it handed out. The checkpoint holds that state for every
rank (`gather_state`, in `client_state["data"]`); a resumed run passes it back through
`build_train_loader(..., resume=...)` and every stream skips, without decoding, to where
it stood. Per-source sample counts and skip counts ride along with the batches too, so
they reach the trainer's log from worker processes (`stats`).

Batches are dicts of tensors (`clipkit.data.stream.ShardStream`): `{"image", "text"}`, or with
text roles (`data.texts`) `{"image", "text_<role>", "text_<role>_valid", ...}`.

`data.workers` may change between save and resume when the new value divides
`data.streams_per_rank` (by default the workers of the run's first launch). The number of
ranks, and `data.streams_per_rank` when set, may change too: the saved streams are then
re-dealt to the new ones (`clipkit.data.reshard`), so that no sample of a started epoch is
repeated or skipped. Any other change of the data layout (global batch size, seed, mode,
shard counts) is refused with a one-line error.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from clipkit import distributed
from clipkit.data.decode import Preprocess
from clipkit.data.reshard import StreamPosition, position_from_state, position_to_state, reshard_states
from clipkit.data.stream import MODES, Batch, ShardStream, StreamSettings, Tokenize, check_enough_shards
from clipkit.data.tar_reader import SKIP_REASONS
from clipkit.data.texts import TextRole, role_skip_reasons, roles_from_config
from clipkit.data.urls import Source, expand_sources
from clipkit.errors import ClipkitConfigError
from clipkit.run_dir import atomic_write_text

log = logging.getLogger(__name__)
STATE_VERSION = 1
# Saved layout fields that must match on resume, with the config key a user would change.
_LAYOUT = {"mode": "data.mode", "seed": "seed", "world_size": "the number of ranks",
           "batch_size": "data.global_batch_size / ranks", "epoch_samples": "data.epoch_samples",
           "shards_per_source": "data.train_urls (shard count per source)"}


def build_sources(data_cfg: DictConfig) -> list[Source]:
    """Checks the `data:` section's mode-dependent keys and expands its shard sources."""
    mode = data_cfg.get("mode", "epoch")
    if mode not in MODES:
        raise ClipkitConfigError(f"data.mode must be one of {'|'.join(MODES)}, got {mode!r}")
    weights, names = data_cfg.get("weights"), data_cfg.get("source_names")
    if mode == "epoch" and (weights is not None or data_cfg.get("epoch_samples") is not None):
        raise ClipkitConfigError("data.weights and data.epoch_samples only apply to data.mode=resampled")
    if mode == "resampled" and not data_cfg.get("epoch_samples"):
        raise ClipkitConfigError("data.mode=resampled needs data.epoch_samples (virtual epoch length in samples)")
    return expand_sources(data_cfg.train_urls, _plain(weights), _plain(names))


def _plain(value: Any) -> list | None:
    return None if value is None else list(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def skip_reasons(roles: Sequence[TextRole] | None) -> tuple[str, ...]:
    """Every skip reason a reader with these text roles counts, in the order `TrainLoader.stats` sums them
    (the same on every rank): `SKIP_REASONS`, then the roles' (`clipkit.data.texts.role_skip_reasons`)."""
    return SKIP_REASONS + role_skip_reasons(roles)


def stream_settings(data_cfg: DictConfig, *, world_size: int, saved: dict[str, Any] | None = None) -> StreamSettings:
    """`data:` section -> `StreamSettings`; `saved` is this rank's state from a checkpoint."""
    workers = max(1, int(data_cfg.workers))
    streams = data_cfg.get("streams_per_rank") or (saved["streams_per_rank"] if saved else workers)
    if streams % workers:
        started = saved and not data_cfg.get("streams_per_rank")
        raise ClipkitConfigError(
            f"data.workers={workers} must divide the {streams} data streams per rank "
            f"{'this run was started with' if started else '(data.streams_per_rank)'}; "
            f"use one of {_divisors(streams)}"
            + (" (or set data.streams_per_rank to re-deal the streams)" if started else ""))
    return StreamSettings(
        batch_size=int(data_cfg.global_batch_size) // world_size, mode=data_cfg.get("mode", "epoch"),
        streams_per_rank=int(streams), shuffle_buffer=int(data_cfg.shuffle_buffer),
        epoch_samples=data_cfg.get("epoch_samples"), open_retries=int(data_cfg.get("open_retries", 3)),
        retry_delay_s=float(data_cfg.get("retry_delay_s", 2.0)),
        read_timeout_s=float(data_cfg.get("read_timeout_s", 60.0)), jpeg_draft=bool(data_cfg.get("jpeg_draft", True)),
        texts=roles_from_config(data_cfg.get("texts")))


def key_log_path(keys_dir: Path, rank: int) -> Path:
    return keys_dir / f"rank{rank:05d}.jsonl"


def trim_key_log(path: Path, step: int) -> None:
    """Drops the lines after `step` (batches a killed run consumed but never saved)."""
    kept = []
    if step and path.exists():
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


class KeyLog:
    """`data.record_keys=true`: `{"step": s, "keys": ["<url>#<key>", ...], "epochs": [epoch of each key]}`
    per consumed batch, one file per rank; with text roles also `"texts": {role: per key, per chosen
    text its indices}` (indices into the role's pool, or into its sentences for select: subcaptions).

    Batch s of a rank is the one trained at step s. A resumed run first drops the lines
    after its checkpoint (batches a killed run consumed but never saved), then appends, so
    the file always reads as the run's exact data order.
    """

    def __init__(self, path: Path, resume_step: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        trim_key_log(path, resume_step)
        self._file = path.open("a", encoding="utf-8")

    def write(self, step: int, keys: Sequence[str], epochs: Sequence[int],
              texts: dict[str, list] | None = None) -> None:
        record = {"step": step, "keys": list(keys), "epochs": list(epochs)}
        if texts is not None:
            record["texts"] = texts
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()


class TrainLoader:
    """Iterable of batch dicts for one rank, endless: `{"image": [B,3,H,W] float32, "text": [B,L] int64}`,
    or with text roles `{"image", "text_<r>": [B,K_r,L_r] int64, "text_<r>_valid": [B,K_r] bool, ...}`.

    `batches` is how many batches the trainer has received in this run and those it resumed.
    """

    def __init__(self, sources: Sequence[Source], settings: StreamSettings, *, preprocess: Preprocess,
                 tokenize: Tokenize, num_workers: int, rank: int, world_size: int, seed: int,
                 state: dict[str, Any] | None = None, keys_path: Path | None = None,
                 worker_init_fn: Callable[[int], None] | None = None):
        """`worker_init_fn` runs in each data worker (the recipe passes
        `clipkit.preemption.ignore_preemption_signals`)."""
        self.sources = list(sources)
        self.worker_init_fn = worker_init_fn
        self.settings = settings
        self.preprocess = preprocess
        self.tokenize = tokenize
        self.num_workers = num_workers
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        if settings.mode == "epoch":
            check_enough_shards(sum(len(s.urls) for s in self.sources), world_size, settings.streams_per_rank)
        if state is not None:
            self._check_layout(state)
        self.batches = state["batches"] if state else 0
        self.positions = ([position_from_state(p) for p in state["streams"]] if state
                          else [StreamPosition() for _ in range(settings.streams_per_rank)])
        self.samples_per_source = list(state["samples_per_source"]) if state else [0] * len(self.sources)
        self.skipped: Counter[str] = Counter(state["skipped"] if state else {})
        self.keys = KeyLog(keys_path, self.batches) if keys_path is not None else None
        self.last_batch_keys: list[str] = []   # "<url>#<key>" of the last batch handed out

    def _layout(self) -> dict[str, Any]:
        s = self.settings
        return {"mode": s.mode, "seed": self.seed, "world_size": self.world_size, "batch_size": s.batch_size,
                "epoch_samples": s.epoch_samples, "shards_per_source": [len(src.urls) for src in self.sources]}

    def _check_layout(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ClipkitConfigError(f"checkpoint data state version {state.get('version')} is not {STATE_VERSION}")
        now = self._layout()
        for key, what in _LAYOUT.items():
            if state[key] != now[key]:
                raise ClipkitConfigError(f"cannot resume the data stream exactly: {what} was {state[key]} when the "
                                         f"checkpoint was written and is {now[key]} now")

    def state_dict(self) -> dict[str, Any]:
        """This rank's data position after the batches the trainer consumed."""
        return {"version": STATE_VERSION, **self._layout(), "streams_per_rank": self.settings.streams_per_rank,
                "batches": self.batches, "streams": [position_to_state(p) for p in self.positions],
                "samples_per_source": list(self.samples_per_source), "skipped": dict(self.skipped)}

    def gather_state(self) -> dict[str, Any]:
        """Collective: `{"ranks": [state of rank 0, rank 1, ...]}`, what a checkpoint stores.

        DeepSpeed writes the client state from rank 0 only, so every rank's position is gathered there.
        """
        return {"ranks": distributed.all_gather_object(self.state_dict())}

    def stats(self) -> dict[str, float]:
        """Collective: samples per source and skips per reason summed over ranks, and the
        oldest epoch any stream is in (`data/epoch`), for the trainer's log."""
        reasons = skip_reasons(self.settings.texts)
        counts = torch.tensor([*self.samples_per_source, *(self.skipped[r] for r in reasons)], dtype=torch.float64)
        counts = distributed.all_reduce(counts, "sum").tolist()
        epoch = distributed.all_reduce(torch.tensor([min(p.current_epoch for p in self.positions)]), "min")
        record = {f"data/samples/{s.name}": int(n) for s, n in zip(self.sources, counts)}
        record.update({f"data/skipped/{r.replace(' ', '_')}": int(n)
                       for r, n in zip(reasons, counts[len(self.sources):])})
        record["data/epoch"] = int(epoch.item())
        return record

    def _consume(self, meta: dict[str, Any]) -> None:
        if meta["index"] != self.batches:
            raise RuntimeError(f"data batch {meta['index']} arrived where batch {self.batches} was expected")
        self.positions[meta["stream"]] = position_from_state(meta["position"])
        for i, n in enumerate(meta["sources"]):
            self.samples_per_source[i] += n
        self.skipped.update(meta["skipped"])
        self.batches += 1
        self.last_batch_keys = list(meta["keys"])
        if self.keys is not None:
            self.keys.write(self.batches, meta["keys"], meta["epochs"], meta.get("texts"))

    def __iter__(self) -> Iterator[Batch]:
        dataset = ShardStream(self.sources, self.settings, preprocess=self.preprocess, tokenize=self.tokenize,
                              rank=self.rank, world_size=self.world_size, seed=self.seed, start_batch=self.batches,
                              positions=self.positions)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                            pin_memory=torch.cuda.is_available(),
                            worker_init_fn=self.worker_init_fn if self.num_workers else None)
        batches = iter(loader)
        try:
            for batch, meta in batches:
                self._consume(meta)
                yield batch
        except ClipkitConfigError as err:
            # A worker's error arrives wrapped in its traceback; keep the one-line message.
            message = str(err).strip().splitlines()[-1]
            raise ClipkitConfigError(message.split("ClipkitConfigError: ", 1)[-1]) from None
        finally:
            _stop_workers(batches)


def _stop_workers(batches: Iterator) -> None:
    """Stops a DataLoader iterator's worker processes now, whatever ended the iteration.

    The workers may ignore SIGTERM (the recipe's `worker_init_fn`), so neither DataLoader's
    terminate() fallback nor multiprocessing's at-exit terminate can stop one; left to the
    garbage collector (an error's traceback keeps the iterator alive), a live worker made
    the interpreter's exit wait on it forever. The orderly shutdown sends each worker its
    stop sentinel; a worker still alive after that is killed.
    """
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is None:  # num_workers=0: nothing to stop
        return
    shutdown()
    for worker in getattr(batches, "_workers", ()):
        if worker.is_alive():
            worker.kill()
            worker.join()


def rank_state(resume: dict[str, Any], rank: int, world_size: int, settings: StreamSettings) -> dict[str, Any]:
    """This rank's entry of a checkpoint's `client_state["data"]`; re-dealt (`reshard_states`) when
    the checkpoint was written by another number of ranks or of streams per rank."""
    ranks = resume["ranks"]
    saved = ranks[0]
    if len(ranks) == world_size and saved["streams_per_rank"] == settings.streams_per_rank:
        return ranks[rank]
    if any(state.get("version") != STATE_VERSION for state in ranks):
        raise ClipkitConfigError(f"checkpoint data state version {saved.get('version')} is not {STATE_VERSION}")
    then, now = saved["batch_size"] * len(ranks), settings.batch_size * world_size
    if then != now:
        raise ClipkitConfigError(f"data.global_batch_size was {then} when the checkpoint was written on {len(ranks)} "
                                 f"ranks and is {now} now; resume on {world_size} ranks with the same global batch")
    log.info("data: re-dealing %d ranks x %d streams of the checkpoint to %d ranks x %d streams", len(ranks),
             saved["streams_per_rank"], world_size, settings.streams_per_rank)
    return reshard_states(ranks, world_size, settings.streams_per_rank)[rank]


def build_train_loader(data_cfg: DictConfig, sources: Sequence[Source], *, preprocess: Preprocess,
                       tokenize: Tokenize, rank: int, world_size: int, seed: int,
                       resume: dict[str, Any] | None = None, keys_dir: Path | None = None,
                       worker_init_fn: Callable[[int], None] | None = None) -> TrainLoader:
    """`data:` section -> the rank's `TrainLoader`, continuing from `resume` (a checkpoint's data state).

    `sources` come from `build_sources(data_cfg)`, checked before the process group exists.
    """
    settings = stream_settings(data_cfg, world_size=world_size, saved=resume["ranks"][0] if resume else None)
    saved = rank_state(resume, rank, world_size, settings) if resume is not None else None
    if saved is not None and keys_dir is not None and rank == 0:
        # Ranks the resumed run no longer has: their logs end at the checkpoint too.
        for path in (key_log_path(keys_dir, gone) for gone in range(world_size, len(resume["ranks"]))):
            if path.exists():
                trim_key_log(path, saved["batches"])
    return TrainLoader(sources, settings, preprocess=preprocess, tokenize=tokenize,
                       num_workers=int(data_cfg.workers), rank=rank, world_size=world_size, seed=seed, state=saved,
                       keys_path=key_log_path(keys_dir, rank) if keys_dir is not None else None,
                       worker_init_fn=worker_init_fn)
