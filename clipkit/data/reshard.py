"""Resuming the training stream on another number of ranks (or data streams), exactly.

A run reads its data as *readers*: rank r's stream k is reader `r * K + k` of `world_size * K`.
The unit of work is a **share**: what one reader of one layout reads in one epoch,

    Share(epoch, world_size, streams_per_rank, rank, stream)

Its samples are a pure function of the share (`clipkit.data.stream.ShardStream.share_samples`):
in `data.mode=epoch` the reader's slice of the epoch's shuffled shard list through its shuffle
buffer, in `data.mode=resampled` the first `ceil(epoch_samples / (world_size * K))` samples of
the reader's seeded draws (a slice of the virtual epoch). The shares of one epoch, in any one
layout, hold every sample of that epoch exactly once (resampled: every draw of the virtual epoch).

A stream's position (`StreamPosition`) is a list of **pending shares**, each with the number of
its samples already consumed, then "the stream's own share of `epoch` from `offset`, and of
every later epoch". A run that never changed its layout has no pending shares, and its position
is the plain `(epoch, offset)` of before.

On a resume with another layout (`reshard`), every old reader hands in what it has left:

- its pending shares, each from its offset;
- if it reads its own shares: its current share from its offset, and its whole share of every
  later epoch up to `last`, the newest epoch any old reader has started. Readers drift apart
  (shards differ in size), so one may still be in epoch e while another is in e + 1: both of
  their e + 1 shares belong to the old layout's dealing of e + 1, and both are handed in.

These pending shares are sorted (by epoch, then by old reader index) and dealt round-robin to the
new readers; a new reader reads its dealt shares and then its own shares from epoch `last + 1`
on. Every sample of an epoch up to `last` is thus read exactly once in the old layout's shares,
and every later epoch in the new layout's; nothing is reshuffled. Pending shares are saved with
the position, so a second resize (2 -> 3 -> 1 ranks) hands them in again.

A share whose rest is empty (a reader that had just finished its epoch) is still dealt: its
reader re-reads it to find that out, as a same-size resume re-reads a stream's epoch up to its
position.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, order=True)
class Share:
    """Reader `rank * streams_per_rank + stream` of a `world_size`-rank layout's samples of `epoch`.

    Ordered by epoch, then (in one layout) by reader index: the order `reshard` deals them in.
    """

    epoch: int
    world_size: int
    streams_per_rank: int
    rank: int
    stream: int

    @property
    def reader(self) -> int:
        return self.rank * self.streams_per_rank + self.stream


@dataclass(frozen=True)
class Pending:
    """A share of which `offset` samples were consumed."""

    share: Share
    offset: int = 0


@dataclass(frozen=True)
class StreamPosition:
    """Where a stream resumes: the rest of each `pending` share, in order, then its own share
    of `epoch` from `offset` and of every later epoch. Without pending shares, `offset`
    samples of `epoch` have been consumed."""

    epoch: int = 0
    offset: int = 0
    pending: tuple[Pending, ...] = ()

    @property
    def current_epoch(self) -> int:
        """The epoch of the samples the stream reads next (its first pending share's)."""
        return self.pending[0].share.epoch if self.pending else self.epoch

    @property
    def current_offset(self) -> int:
        return self.pending[0].offset if self.pending else self.offset


def position_to_state(position: StreamPosition) -> list:
    """JSON-able form kept in the checkpoint: `[epoch, offset]`, plus
    `[[epoch, world_size, streams_per_rank, rank, stream, offset], ...]` when shares are pending."""
    if not position.pending:
        return [position.epoch, position.offset]
    pending = [[p.share.epoch, p.share.world_size, p.share.streams_per_rank, p.share.rank, p.share.stream, p.offset]
               for p in position.pending]
    return [position.epoch, position.offset, pending]


def position_from_state(state: Sequence) -> StreamPosition:
    """Inverse of `position_to_state` (also reads the plain `[epoch, offset]` of data state version 1)."""
    epoch, offset, *rest = state
    pending = tuple(Pending(Share(*p[:5]), p[5]) for p in (rest[0] if rest else ()))
    return StreamPosition(int(epoch), int(offset), pending)


def walk(position: StreamPosition, own_share: Callable[[int], Share],
         read: Callable[[Share, int], Iterable[tuple[int, T]]]) -> Iterator[tuple[StreamPosition, T]]:
    """`(position after it, item)` forever, from `position`: the rest of each pending share, then
    the stream's own share (`own_share(epoch)`) of `position.epoch` from `position.offset` and of
    every later epoch.

    `read(share, skip)` yields `(offset after it, item)` for the share's items after its first
    `skip` (which it passes over; it raises if the share is shorter).
    """
    pending = list(position.pending)
    for i, (share, skip) in enumerate((p.share, p.offset) for p in pending):
        rest = tuple(pending[i + 1:])
        for offset, item in read(share, skip):
            yield StreamPosition(position.epoch, position.offset, (Pending(share, offset), *rest)), item
    epoch, skip = position.epoch, position.offset
    while True:
        for offset, item in read(own_share(epoch), skip):
            yield StreamPosition(epoch, offset), item
        epoch, skip = epoch + 1, 0


def remaining(positions: Sequence[Sequence[StreamPosition]]) -> tuple[list[Pending], int]:
    """What a layout's readers have left of the epochs it started: `(pending shares, last)`.

    `positions[rank][stream]` are the streams' positions (`len(positions)` ranks x
    `len(positions[0])` streams). `last` is the newest epoch any stream has started reading its
    own shares of; the returned shares, sorted by epoch and old reader, are all that is left of
    every epoch up to `last`, and nothing of any later epoch has been read.
    """
    world_size, streams = len(positions), len(positions[0])
    if any(len(rank) != streams for rank in positions):
        raise ValueError(f"ranks hold different numbers of streams: {[len(rank) for rank in positions]}")
    flat = [p for rank in positions for p in rank]
    # A stream with pending shares has not started its own epoch (all such streams wait at the same one).
    last = max((p.epoch for p in flat if not p.pending), default=min(p.epoch for p in flat) - 1)
    work: list[Pending] = []
    for rank, rank_positions in enumerate(positions):
        for stream, p in enumerate(rank_positions):
            work.extend(p.pending)
            if p.epoch <= last:
                work.append(Pending(Share(p.epoch, world_size, streams, rank, stream), p.offset))
                work.extend(Pending(Share(e, world_size, streams, rank, stream)) for e in range(p.epoch + 1, last + 1))
    work.sort(key=lambda p: p.share)
    shares = [p.share for p in work]
    if len(set(shares)) != len(shares):
        raise ValueError("a share is pending twice; the saved data positions are inconsistent")
    return work, last


def reshard(positions: Sequence[Sequence[StreamPosition]], world_size: int,
            streams_per_rank: int) -> list[list[StreamPosition]]:
    """Old layout's `positions[rank][stream]` -> the new layout's, `[world_size][streams_per_rank]`.

    The old readers' remaining shares (`remaining`) are dealt round-robin, in their order, to the
    new readers `rank * streams_per_rank + stream`; each new reader then reads its own shares
    from the epoch after the newest one the old layout started.
    """
    work, last = remaining(positions)
    readers = world_size * streams_per_rank
    dealt: list[list[Pending]] = [[] for _ in range(readers)]
    for i, pending in enumerate(work):
        dealt[i % readers].append(pending)
    return [[StreamPosition(last + 1, 0, tuple(dealt[rank * streams_per_rank + stream]))
             for stream in range(streams_per_rank)] for rank in range(world_size)]


def reshard_states(ranks: Sequence[dict[str, Any]], world_size: int, streams_per_rank: int) -> list[dict[str, Any]]:
    """Per-rank data states of a checkpoint (`TrainLoader.state_dict`, one per saved rank) -> the
    states of `world_size` ranks with `streams_per_rank` streams each.

    The streams are re-dealt (`reshard`). The per-source sample counts and skip counts, which the
    trainer logs summed over ranks, are summed into rank 0's state; the other ranks start at zero.
    The global batch stays what it was: the caller checks that it did not change.
    """
    batches = {state["batches"] for state in ranks}
    if len(batches) != 1:
        raise ValueError(f"the saved ranks consumed different numbers of batches: {sorted(batches)}")
    global_batch = ranks[0]["batch_size"] * len(ranks)
    if global_batch % world_size:
        raise ValueError(f"the global batch {global_batch} does not split over {world_size} ranks")
    positions = reshard([[position_from_state(p) for p in state["streams"]] for state in ranks],
                        world_size, streams_per_rank)
    samples = [sum(counts) for counts in zip(*(state["samples_per_source"] for state in ranks))]
    skipped: Counter[str] = Counter()
    for state in ranks:
        skipped.update(state["skipped"])
    new = []
    for rank in range(world_size):
        new.append({**ranks[0], "world_size": world_size, "batch_size": global_batch // world_size,
                    "streams_per_rank": streams_per_rank,
                    "streams": [position_to_state(p) for p in positions[rank]],
                    "samples_per_source": samples if rank == 0 else [0] * len(samples),
                    "skipped": dict(skipped) if rank == 0 else {}})
    return new
