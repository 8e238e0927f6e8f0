"""The training stream: per rank, K deterministic sample streams, interleaved one batch at a time.

`data.mode` picks how a stream finds its shards:
  epoch      each shard once per epoch. The shard list is shuffled with (seed, epoch), the
             same on every rank, dealt to the ranks and then to the K streams of each rank.
  resampled  shards drawn with replacement: a source by `data.weights` (sources are the
             `::`-joined parts of `data.train_urls`), then one of its shards uniformly, from
             an RNG seeded by (seed, virtual epoch, rank, stream). A virtual epoch is
             `data.epoch_samples` samples over all ranks.
Each stream passes its samples through its own shuffle buffer, seeded by (seed, epoch, rank, stream).

Exact resume rests on this: the samples of stream k are a pure function of (seed, epoch,
rank, k) and a position within the epoch, counted in samples that left the shuffle buffer
(before the image is decoded, so skipping ahead decodes nothing). Batch i of a rank is
stream i % K's next batch, whichever dataloader worker builds it, so the rank's batch
sequence does not depend on the number of workers W as long as W divides K
(`data.streams_per_rank`, by default the workers of the run's first launch).

Each batch is a dict of tensors, dim 0 the sample: `{"image", "text"}` with one caption per
sample, or `{"image", "text_<role>", "text_<role>_valid"}` per text role (`data.texts`,
`clipkit.data.texts`), whose choice of texts is a pure function of (seed, epoch, sample, role).

What a stream reads in one epoch is a `Share` of (epoch, world size, K, rank, stream). A run
resumed on another number of ranks (or K) first reads the shares the old layout left
unfinished, dealt to its streams as "pending" shares of their positions
(`clipkit.data.reshard`), then its own.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from clipkit.data.decode import DECODE_ERRORS, ImageDecoder, Preprocess
from clipkit.data.reshard import Share, StreamPosition, position_to_state, walk
from clipkit.data.tar_reader import SOURCE_FAILURES, RawSample, ShardReader
from clipkit.data.texts import TextRole, role_rng, select_texts, tokenize_role
from clipkit.data.urls import Source
from clipkit.errors import ClipkitConfigError

# Captions -> [n, L] int64; with text roles also called with `context_length=` (open_clip's tokenizers).
Tokenize = Callable[..., torch.Tensor]
Batch = dict[str, torch.Tensor]
MODES = ("epoch", "resampled")
# A stream that decodes nothing for this long is reading the wrong members or broken data.
MAX_UNDECODABLE_IN_A_ROW = 1000
# A source is given up (the run stops) when all its shards failed, or this many of them in a
# row: with retries a lost shard costs seconds, so a dead bucket of 40,000 shards would
# otherwise keep a run busy for days before every shard had been tried.
MAX_FAILED_SHARDS_IN_A_ROW = 100


@dataclass(frozen=True)
class StreamSettings:
    """Plain-typed view of the `data:` config section (see `conf/data/webdataset.yaml`)."""

    batch_size: int                      # per rank
    mode: str = "epoch"
    streams_per_rank: int = 1
    shuffle_buffer: int = 1000
    epoch_samples: int | None = None     # resampled: virtual epoch length over all ranks
    open_retries: int = 3
    retry_delay_s: float = 2.0
    read_timeout_s: float = 60.0         # a pipe: command silent this long is killed and retried
    jpeg_draft: bool = True
    image_exts: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
    text_ext: str = "txt"
    texts: tuple[TextRole, ...] | None = None   # data.texts; None: one caption per sample from text_ext


def check_enough_shards(num_shards: int, world_size: int, streams_per_rank: int) -> None:
    """Epoch mode: raises unless every (rank, stream) gets at least one shard per epoch."""
    readers = world_size * streams_per_rank
    if num_shards < readers:
        raise ClipkitConfigError(
            f"{num_shards} shards cannot feed {world_size} ranks x {streams_per_rank} data streams "
            f"= {readers} readers in data.mode=epoch; write more shards (smaller shard_size), lower "
            f"data.workers, or use data.mode=resampled")


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


def batch_seed(seed: int, rank: int, stream: int, batch: int) -> int:
    """Seed of the augmentation RNG for one batch, so a resumed run augments identically."""
    return random.Random(f"augment/{seed}/{rank}/{stream}/{batch}").getrandbits(63)


class _Cursor:
    """One stream inside a worker: its sample iterator and the skips since its last batch."""

    def __init__(self, reader: ShardReader, samples: Iterator[tuple[StreamPosition, RawSample]]):
        self.reader = reader
        self.samples = samples
        self.undecodable_in_a_row = 0


class ShardStream(IterableDataset):
    """Endless `(batch, meta)` for one rank. `batch` without text roles: `{"image": [B,3,H,W]
    float32, "text": [B,L] int64}`; with roles, per role r: `"text_<r>": [B,K_r,L_r] int64` and
    `"text_<r>_valid": [B,K_r] bool` instead of "text" (`clipkit.data.texts.tokenize_role`).

    `start_batch` batches were consumed before; `positions[k]` is stream k's position after
    them. `meta` says which batch this is and where its stream stands after it:
    `{"index", "stream", "epoch", "offset", "position", "keys", "epochs", "sources": [count per
    source], "skipped": {reason: count since the stream's previous batch}}`: `position` is the
    whole position (`clipkit.data.reshard.position_to_state`), `epoch` and `offset` its current
    share's, `epochs` the epoch of each key. With roles `meta["texts"]` is `{role: per sample, per
    chosen text its indices}` (`clipkit.data.texts.select_texts`).
    """

    def __init__(self, sources: Sequence[Source], settings: StreamSettings, *, preprocess: Preprocess,
                 tokenize: Tokenize, rank: int, world_size: int, seed: int, start_batch: int = 0,
                 positions: Sequence[StreamPosition] | None = None):
        super().__init__()
        if settings.mode not in MODES:
            raise ClipkitConfigError(f"data.mode must be one of {'|'.join(MODES)}, got {settings.mode!r}")
        self.sources = list(sources)
        self.settings = settings
        self.decoder = ImageDecoder(preprocess, jpeg_draft=settings.jpeg_draft)
        self.tokenize = tokenize
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start_batch = start_batch
        k = settings.streams_per_rank
        self.positions = list(positions) if positions is not None else [StreamPosition() for _ in range(k)]
        if len(self.positions) != k:
            raise ClipkitConfigError(f"{len(self.positions)} stream positions for {k} streams per rank")
        self.shards = [(url, i) for i, source in enumerate(self.sources) for url in source.urls]
        if settings.mode == "epoch":
            check_enough_shards(len(self.shards), world_size, k)
        elif not settings.epoch_samples or settings.epoch_samples < 1:
            raise ClipkitConfigError("data.mode=resampled needs data.epoch_samples (virtual epoch length in samples)")

    # -- which shards a stream reads ------------------------------------------------------

    def own_share(self, epoch: int, stream: int) -> Share:
        """This rank's `stream`-th share of epoch `epoch` in the run's own layout."""
        return Share(epoch, self.world_size, self.settings.streams_per_rank, self.rank, stream)

    def share_shards(self, share: Share) -> list[tuple[str, int]]:
        """Epoch mode: `(url, source)` of `share`: its rank's part of its epoch's shuffled shard
        list (the same on every rank), then its stream's part of that."""
        shards = list(self.shards)
        random.Random(self.seed * 1_000_003 + share.epoch).shuffle(shards)
        return shards[share.rank::share.world_size][share.stream::share.streams_per_rank]

    def share_draws(self, share: Share) -> Iterator[tuple[str, int]]:
        """Resampled mode: `share`'s endless `(url, source)`, drawn with replacement by source weight."""
        rng = random.Random(f"draw/{self.seed}/{share.epoch}/{share.rank}/{share.stream}")
        indices, weights = range(len(self.sources)), [source.weight for source in self.sources]
        while True:
            source = rng.choices(indices, weights)[0]
            yield rng.choice(self.sources[source].urls), source

    def share_length(self, share: Share) -> int | None:
        """Resampled mode: samples in `share`, its slice of the virtual epoch (None in epoch mode)."""
        if self.settings.mode == "epoch":
            return None
        return math.ceil(self.settings.epoch_samples / (share.world_size * share.streams_per_rank))

    def shards_for(self, epoch: int, stream: int) -> list[tuple[str, int]]:
        """Epoch mode: `(url, source)` of this rank's `stream`-th share of epoch `epoch`."""
        return self.share_shards(self.own_share(epoch, stream))

    def draws(self, epoch: int, stream: int) -> Iterator[tuple[str, int]]:
        """Resampled mode: endless `(url, source)` of this rank's `stream` in virtual epoch `epoch`."""
        return self.share_draws(self.own_share(epoch, stream))

    def epoch_length(self) -> int | None:
        """Resampled mode: samples per stream per virtual epoch (None in epoch mode)."""
        return self.share_length(self.own_share(0, 0))

    # -- samples ---------------------------------------------------------------------------

    def _read(self, shards: Iterable[tuple[str, int]], reader: ShardReader, failed: dict[int, set[str]]
              ) -> Iterator[RawSample]:
        """The samples of `shards` in order. `failed[source]` holds the source's shards that failed
        (lost to a broken source, or without a usable sample) since one of its shards last read well;
        a source whose every shard, or MAX_FAILED_SHARDS_IN_A_ROW of them, failed stops the run."""
        for url, source in shards:
            produced = 0
            for sample in reader.samples(url, source):
                produced += 1
                yield sample
            lost = failed.setdefault(source, set())
            if produced and reader.failure not in SOURCE_FAILURES:
                lost.clear()
                continue
            lost.add(url)
            urls = self.sources[source].urls
            if len(lost) >= min(len(urls), MAX_FAILED_SHARDS_IN_A_ROW):
                # Without this a dead source would be retried forever (and an all-bad dataset spin here).
                what = f"all its {len(urls)} shards" if len(lost) == len(urls) else f"{len(lost)} shards in a row"
                raise ClipkitConfigError(
                    f"data source {self.sources[source].name!r} ({urls[0]}, ...) is unusable: {what} failed or had "
                    f"no usable sample (last: {url}: {reader.failure or 'no usable sample'}; skipped so far: "
                    f"{dict(reader.skipped)})")

    def share_samples(self, share: Share, reader: ShardReader, failed: dict[int, set[str]]) -> Iterator[RawSample]:
        """The samples of one share, in shuffle-buffer order (no image decoded yet)."""
        if self.settings.mode == "epoch":
            shards: Iterable[tuple[str, int]] = self.share_shards(share)
        else:
            shards = self.share_draws(share)
        rng = random.Random(f"shuffle/{self.seed}/{share.epoch}/{share.rank}/{share.stream}")
        samples = _shuffled(self._read(shards, reader, failed), self.settings.shuffle_buffer, rng)
        length = self.share_length(share)
        return samples if length is None else islice(samples, length)

    def epoch_samples(self, stream: int, epoch: int, reader: ShardReader, failed: dict[int, set[str]]
                      ) -> Iterator[RawSample]:
        """One epoch of one of this rank's streams, in shuffle-buffer order (no image decoded yet)."""
        return self.share_samples(self.own_share(epoch, stream), reader, failed)

    def _share_from(self, share: Share, skip: int, stream: int, reader: ShardReader, failed: dict[int, set[str]]
                    ) -> Iterator[tuple[int, RawSample]]:
        """`(offset after it, sample)` of `share` after its first `skip` samples, which are passed
        over undecoded; the skips counted while passing them were counted by the run that
        consumed them, so they are dropped again."""
        before = Counter(reader.skipped) if skip else None
        offset = 0
        for offset, sample in enumerate(self.share_samples(share, reader, failed), start=1):
            if offset > skip:
                yield offset, sample
            elif offset == skip:
                reader.skipped.clear()
                reader.skipped.update(before)
        if offset < skip:
            raise ClipkitConfigError(
                f"cannot resume data stream {stream}: epoch {share.epoch} now has {offset} samples, the checkpoint "
                f"consumed {skip}; the shards changed since it was written")

    def samples_from(self, stream: int, position: StreamPosition, reader: ShardReader
                     ) -> Iterator[tuple[StreamPosition, RawSample]]:
        """`(position after it, sample)` forever, starting at `position` (its pending shares first).

        The samples of a share before its offset are skipped undecoded.
        """
        failed: dict[int, set[str]] = {}
        return walk(position, lambda epoch: self.own_share(epoch, stream),
                    lambda share, skip: self._share_from(share, skip, stream, reader, failed))

    # -- batches ---------------------------------------------------------------------------

    def _cursor(self, stream: int) -> _Cursor:
        s = self.settings
        reader = ShardReader(Counter(), image_exts=s.image_exts, text_ext=s.text_ext,
                             open_retries=s.open_retries, retry_delay_s=s.retry_delay_s,
                             read_timeout_s=s.read_timeout_s, roles=s.texts)
        return _Cursor(reader, self.samples_from(stream, self.positions[stream], reader))

    def _decode(self, cursor: _Cursor, sample: RawSample) -> torch.Tensor | None:
        try:
            image = self.decoder(sample.image_bytes())
        except DECODE_ERRORS:
            cursor.reader.skip("undecodable image", f"sample {sample.key} in {sample.url}")
            cursor.undecodable_in_a_row += 1
            if cursor.undecodable_in_a_row >= MAX_UNDECODABLE_IN_A_ROW:
                raise ClipkitConfigError(f"{MAX_UNDECODABLE_IN_A_ROW} images in a row could not be decoded "
                                         f"(last: {sample.key} in {sample.url})") from None
            return None
        cursor.undecodable_in_a_row = 0
        return image

    def make_batch(self, cursor: _Cursor, index: int) -> tuple[Batch, dict[str, Any]]:
        """Batch `index` of this rank: the next `batch_size` decodable samples of stream `index % K`."""
        k = self.settings.streams_per_rank
        stream = index % k
        images, samples, keys, epochs, per_source = [], [], [], [], [0] * len(self.sources)
        # Random augmentations draw from torch's global RNG: seed it per batch (and restore
        # it afterwards, which matters with workers=0) so a resumed run augments the same.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(batch_seed(self.seed, self.rank, stream, index // k))
            while len(images) < self.settings.batch_size:
                position, sample = next(cursor.samples)
                image = self._decode(cursor, sample)
                if image is None:
                    continue
                images.append(image)
                samples.append(sample)
                keys.append(f"{sample.url}#{sample.key}")
                epochs.append(position.current_epoch)
                per_source[sample.source] += 1
        meta = {"index": index, "stream": stream, "epoch": position.current_epoch,
                "offset": position.current_offset, "position": position_to_state(position), "keys": keys,
                "epochs": epochs, "sources": per_source, "skipped": dict(cursor.reader.skipped)}
        cursor.reader.skipped.clear()
        batch = {"image": torch.stack(images)}
        if self.settings.texts is None:
            batch["text"] = self.tokenize([sample.caption for sample in samples])
        else:
            meta["texts"] = {}
            for role in self.settings.texts:
                tokens, valid, used = self.role_batch(role, samples, epochs)
                batch[f"text_{role.name}"], batch[f"text_{role.name}_valid"] = tokens, valid
                meta["texts"][role.name] = used
        return batch, meta

    def role_batch(self, role: TextRole, samples: Sequence[RawSample], epochs: Sequence[int]
                   ) -> tuple[torch.Tensor, torch.Tensor, list[list[list[int]]]]:
        """One role's `(tokens [b,K,L] int64, valid [b,K] bool, per sample the indices of its texts)`."""
        chosen, used = [], []
        for sample, epoch in zip(samples, epochs):
            picked = select_texts(role, sample.texts[role.name],
                                  role_rng(self.seed, epoch, sample.url, sample.key, role.name))
            chosen.append([text for text, _ in picked])
            used.append([list(indices) for _, indices in picked])
        tokens, valid = tokenize_role(self.tokenize, role, chosen)
        return tokens, valid, used

    def __iter__(self) -> Iterator[tuple[Batch, dict[str, Any]]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        k = self.settings.streams_per_rank
        if k % workers:
            raise ClipkitConfigError(f"data.workers={workers} must divide data.streams_per_rank={k}")
        cursors: dict[int, _Cursor] = {}
        # DataLoader hands batch t of this iteration to worker t % workers, and W divides K,
        # so this worker always serves the same K/W streams.
        index = self.start_batch + worker
        while True:
            stream = index % k
            if stream not in cursors:
                cursors[stream] = self._cursor(stream)
            yield self.make_batch(cursors[stream], index)
            index += workers
