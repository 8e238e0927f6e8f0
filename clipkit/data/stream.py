"""The training stream: an endless, rank- and worker-sharded, shuffled feed of (image, tokens) pairs.

Each epoch reshuffles the whole shard list with a seed every rank shares, so the ranks
and their dataloader workers partition it exactly: every shard is read once per epoch.
"""

from __future__ import annotations

import io
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import PIL.Image
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples

from clipkit.errors import ClipkitConfigError

log = logging.getLogger(__name__)

Preprocess = Callable[[PIL.Image.Image], torch.Tensor]
Tokenize = Callable[[list[str]], torch.Tensor]


def check_enough_shards(num_shards: int, world_size: int, num_workers: int) -> None:
    """Raises unless every (rank, worker) gets at least one shard per epoch."""
    readers = world_size * max(1, num_workers)
    if num_shards < readers:
        raise ClipkitConfigError(
            f"{num_shards} shards cannot feed {world_size} ranks x {max(1, num_workers)} data workers "
            f"= {readers} readers; write more shards (smaller shard_size) or lower data workers")


def _shuffled(items: Iterable[Any], buffer_size: int, rng: random.Random) -> Iterator[Any]:
    """Yields `items` through a random-eviction buffer of `buffer_size` (<=1 keeps order)."""
    buffer: list[Any] = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= buffer_size:
            i = rng.randrange(len(buffer))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


class ShardStream(IterableDataset):
    """Endless stream of `(image [3,H,W] float32, tokens [L] int64)` from webdataset tars.

    Bad samples are skipped, never raised: `self.skipped` counts them per reason
    (per process: each dataloader worker keeps its own counts and logs each reason once).
    """

    def __init__(self, urls: list[str], *, preprocess: Preprocess, tokenize: Tokenize,
                 rank: int, world_size: int, seed: int, shuffle_buffer: int = 1000,
                 image_keys: Sequence[str] = ("jpg", "jpeg", "png", "webp"), text_key: str = "txt"):
        super().__init__()
        self.urls = list(urls)
        self.preprocess = preprocess
        self.tokenize = tokenize
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.image_keys = tuple(image_keys)
        self.text_key = text_key
        self.skipped: Counter[str] = Counter()

    def shards_for(self, epoch: int, worker_id: int, num_workers: int) -> list[str]:
        """This rank's `worker_id`-th share of epoch `epoch`'s shard order."""
        shards = list(self.urls)
        random.Random(self.seed * 1_000_003 + epoch).shuffle(shards)
        return shards[self.rank::self.world_size][worker_id::num_workers]

    def _skip(self, reason: str, sample: dict[str, Any]) -> None:
        if not self.skipped[reason]:
            log.warning("skipping sample %s in %s: %s (further ones are only counted)",
                        sample.get("__key__"), sample.get("__url__"), reason)
        self.skipped[reason] += 1

    def _on_shard_error(self, exn: Exception) -> bool:
        """webdataset handler: a corrupt or unopenable tar loses its remaining samples, not the run."""
        reason = f"unreadable shard ({type(exn).__name__})"
        if not self.skipped[reason]:
            # webdataset appends the shard URL to the exception's args.
            log.warning("skipping the rest of shard %s: %s (further ones are only counted)", exn.args[-1], exn.args[0])
        self.skipped[reason] += 1
        return True

    def _decode(self, sample: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
        image_key = next((k for k in self.image_keys if k in sample), None)
        if image_key is None:
            return self._skip("missing image", sample)
        if self.text_key not in sample:
            return self._skip("missing caption", sample)
        try:
            caption = sample[self.text_key].decode("utf-8").strip()
        except UnicodeDecodeError:
            return self._skip("caption is not utf-8", sample)
        if not caption:
            return self._skip("empty caption", sample)
        try:
            with PIL.Image.open(io.BytesIO(sample[image_key])) as raw:
                image = raw.convert("RGB")
        except (OSError, ValueError, PIL.Image.DecompressionBombError):
            return self._skip("undecodable image", sample)
        return self.preprocess(image), self.tokenize([caption])[0]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info else (0, 1)
        check_enough_shards(len(self.urls), self.world_size, num_workers)
        epoch = 0
        while True:
            shards = self.shards_for(epoch, worker_id, num_workers)
            rng = random.Random(f"{self.seed}/{epoch}/{self.rank}/{worker_id}")
            raw = tarfile_samples(({"url": url} for url in shards), handler=self._on_shard_error)
            produced = 0
            for sample in _shuffled(raw, self.shuffle_buffer, rng):
                decoded = self._decode(sample)
                if decoded is not None:
                    produced += 1
                    yield decoded
            if not produced:
                # An epoch with nothing usable would spin forever without yielding.
                raise ClipkitConfigError(f"no usable samples in shards {shards} (skipped: {dict(self.skipped)})")
            epoch += 1


def build_train_loader(urls: list[str], *, preprocess: Preprocess, tokenize: Tokenize, batch_size: int,
                       num_workers: int, rank: int, world_size: int, seed: int,
                       shuffle_buffer: int = 1000) -> DataLoader:
    """DataLoader yielding `(images [B,3,H,W] float32, tokens [B,L] int64)` forever.

    The shard-count check runs here so the error reaches the user before workers fork.
    """
    check_enough_shards(len(urls), world_size, num_workers)
    stream = ShardStream(urls, preprocess=preprocess, tokenize=tokenize, rank=rank,
                         world_size=world_size, seed=seed, shuffle_buffer=shuffle_buffer)
    return DataLoader(stream, batch_size=batch_size, num_workers=num_workers, drop_last=True,
                      persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available())
