"""`clipkit.data.reshard` on the pure level: readers simulated over fake shards (no files), with the
real dealing (`ShardStream.share_shards`), shuffle buffer (`_shuffled`) and position walk (`walk`).

The property: over a run resized any number of times, every sample key of every finished epoch
is read exactly once, and no key twice in any epoch.
"""

import random
from collections import Counter
from collections.abc import Callable

import pytest

from clipkit.data.reshard import (
    Pending,
    Share,
    StreamPosition,
    position_from_state,
    position_to_state,
    remaining,
    reshard,
    reshard_states,
    walk,
)
from clipkit.data.stream import ShardStream, StreamSettings, _shuffled
from clipkit.data.urls import Source

SEED = 11
# Shards of uneven sizes, so that readers drift apart: some finish an epoch while others are mid-way.
SHARD_SIZES = [1, 7, 2, 5, 3, 9, 4, 1, 6, 2, 8, 3]
URLS = [f"shard{i:02d}.tar" for i in range(len(SHARD_SIZES))]
SIZE = dict(zip(URLS, SHARD_SIZES))
EVERY_KEY = {f"{url}#{i}" for url in URLS for i in range(SIZE[url])}


def dealer(mode: str = "epoch", epoch_samples: int | None = None) -> ShardStream:
    """A ShardStream only asked about shares (it opens no file)."""
    settings = StreamSettings(batch_size=1, mode=mode, epoch_samples=epoch_samples, shuffle_buffer=5)
    return ShardStream([Source("s", tuple(URLS))], settings, preprocess=None, tokenize=None, rank=0, world_size=1,
                       seed=SEED)


def epoch_content(stream: ShardStream) -> Callable[[Share], list[str]]:
    """A share's sample keys in epoch mode, in shuffle-buffer order (as `ShardStream.share_samples`)."""
    def content(share: Share) -> list[str]:
        keys = (f"{url}#{i}" for url, _ in stream.share_shards(share) for i in range(SIZE[url]))
        rng = random.Random(f"shuffle/{SEED}/{share.epoch}/{share.rank}/{share.stream}")
        return list(_shuffled(keys, 5, rng))
    return content


def resampled_content(stream: ShardStream) -> Callable[[Share], list[tuple[Share, int]]]:
    """A share's draws in resampled mode, each named by its share and place: every draw is distinct."""
    return lambda share: [(share, i) for i in range(stream.share_length(share))]


def read_from(content):
    def read(share, skip):
        items = content(share)
        if len(items) < skip:
            raise AssertionError(f"{share} has {len(items)} items, {skip} were consumed")
        yield from ((i + 1, item) for i, item in enumerate(items) if i >= skip)
    return read


def consume(positions, content, amounts) -> tuple[list[list[StreamPosition]], list[tuple[int, str]]]:
    """Each reader (rank-major) reads `amounts[reader]` items from its position.
    Returns the new positions and the `(epoch, item)` read."""
    world_size, streams = len(positions), len(positions[0])
    read, out = read_from(content), []
    new = [list(rank) for rank in positions]
    for rank in range(world_size):
        for stream in range(streams):
            own = lambda epoch, r=rank, k=stream: Share(epoch, world_size, streams, r, k)  # noqa: E731
            walker = walk(positions[rank][stream], own, read)
            for _ in range(amounts[rank * streams + stream]):
                position, item = next(walker)
                out.append((position.current_epoch, item))
                new[rank][stream] = position
    return new, out


def fresh(world_size, streams):
    return [[StreamPosition() for _ in range(streams)] for _ in range(world_size)]


def check_epochs(read, positions, every_epoch: Callable[[int], Counter]):
    """Every epoch all readers are past holds exactly its items once; later ones hold none twice.
    Returns how many epochs were complete."""
    done = min(p.current_epoch for rank in positions for p in rank)
    by_epoch: dict[int, Counter] = {}
    for epoch, item in read:
        by_epoch.setdefault(epoch, Counter())[item] += 1
    for epoch, counts in sorted(by_epoch.items()):
        if epoch < done:
            assert counts == every_epoch(epoch), f"epoch {epoch}"
        else:
            assert max(counts.values()) == 1, f"epoch {epoch}: {[k for k, n in counts.items() if n > 1]}"
    return done


def once_each(_epoch):
    return Counter(EVERY_KEY)


def run_layouts(layouts, content, rng, every_epoch=once_each, final=400):
    """Runs a fresh start at layouts[0], resizes to each later layout in turn, with random,
    uneven amounts read by each reader before every resize; then reads `final` items per reader."""
    positions, read = fresh(*layouts[0]), []
    for world_size, streams in layouts[1:]:
        readers = len(positions) * len(positions[0])
        positions, part = consume(positions, content, [rng.randrange(0, 40) for _ in range(readers)])
        read += part
        positions = reshard(positions, world_size, streams)
        assert (len(positions), len(positions[0])) == (world_size, streams)
        # A checkpoint in between: the pending shares survive the state form.
        positions = [[position_from_state(position_to_state(p)) for p in rank] for rank in positions]
    positions, part = consume(positions, content, [final] * (len(positions) * len(positions[0])))
    return check_epochs(read + part, positions, every_epoch)


LAYOUTS = {"2->1": [(2, 1), (1, 1)], "2->3": [(2, 1), (3, 1)], "1->4": [(1, 1), (4, 1)],
           "2x2->3x1": [(2, 2), (3, 1)], "2->3->1": [(2, 1), (3, 1), (1, 1)],
           "2x2->1x3->4x1->2x2": [(2, 2), (1, 3), (4, 1), (2, 2)]}


@pytest.mark.parametrize("layouts", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("seed", range(5))
def test_every_key_of_every_epoch_once_across_resizes(layouts, seed):
    complete = run_layouts(layouts, epoch_content(dealer()), random.Random(seed))
    assert complete >= 3


@pytest.mark.parametrize("layouts", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_resampled_every_draw_of_a_virtual_epoch_once(layouts):
    """Resampled shares are slices of the virtual epoch: a finished epoch holds every draw of every
    share of exactly one layout once (which layout depends on when the resize came)."""
    stream = dealer("resampled", epoch_samples=50)

    def every_draw(epoch):
        layout = {(share.world_size, share.streams_per_rank) for share, _ in by_epoch[epoch]}
        assert len(layout) == 1, f"epoch {epoch} mixes layouts {layout}"
        (world_size, streams), = layout
        shares = [Share(epoch, world_size, streams, r, k) for r in range(world_size) for k in range(streams)]
        return Counter((share, i) for share in shares for i in range(stream.share_length(share)))

    by_epoch: dict[int, Counter] = {}
    content = resampled_content(stream)
    positions, read = fresh(*layouts[0]), []
    rng = random.Random(3)
    for world_size, streams in layouts[1:]:
        positions, part = consume(positions, content, [rng.randrange(0, 60) for _ in range(len(positions) *
                                                                                          len(positions[0]))])
        read += part
        positions = reshard(positions, world_size, streams)
    positions, part = consume(positions, content, [150] * (len(positions) * len(positions[0])))
    for epoch, item in read + part:
        by_epoch.setdefault(epoch, Counter())[item] += 1
    assert check_epochs(read + part, positions, every_draw) >= 3


def test_streams_in_different_epochs_hand_in_every_share_up_to_the_newest_started_epoch():
    # Reader 0 is 5 samples into epoch 0; reader 1 finished epoch 0 and is 2 into epoch 1.
    positions = [[StreamPosition(0, 5)], [StreamPosition(1, 2)]]
    work, last = remaining(positions)
    assert last == 1
    assert work == [Pending(Share(0, 2, 1, 0, 0), 5), Pending(Share(1, 2, 1, 0, 0), 0), Pending(Share(1, 2, 1, 1, 0), 2)]
    # Dealt round-robin in that order; then every new reader reads its own shares from epoch 2.
    three = reshard(positions, 3, 1)
    assert [rank[0] for rank in three] == [StreamPosition(2, 0, (w,)) for w in work]
    one = reshard(positions, 1, 1)
    assert one == [[StreamPosition(2, 0, tuple(work))]]
    # 1 rank x 2 streams: reader 0 gets shares 0 and 2, reader 1 share 1.
    assert reshard(positions, 1, 2) == [[StreamPosition(2, 0, (work[0], work[2])), StreamPosition(2, 0, (work[1],))]]


def test_a_second_resize_hands_in_pending_and_own_shares():
    # After 2 -> 3: reader 0 still has a pending share of epoch 0; reader 1 finished its pending
    # share and started its own epoch 1 (of the 3-rank layout); reader 2 had none and is in epoch 1.
    old = Share(0, 2, 1, 1, 0)
    positions = [[StreamPosition(1, 0, (Pending(old, 4),))], [StreamPosition(1, 3)], [StreamPosition(1, 0)]]
    work, last = remaining(positions)
    assert last == 1
    assert work == [Pending(old, 4), Pending(Share(1, 3, 1, 0, 0), 0), Pending(Share(1, 3, 1, 1, 0), 3),
                    Pending(Share(1, 3, 1, 2, 0), 0)]
    # No reader had started its own epoch yet: nothing of epoch 1 is handed in, and epoch 1 is the new layout's.
    waiting = [[StreamPosition(1, 0, (Pending(old, 4),))], [StreamPosition(1, 0, (Pending(Share(0, 2, 1, 0, 0), 9),))]]
    work, last = remaining(waiting)
    assert last == 0 and [w.share.epoch for w in work] == [0, 0]
    assert reshard(waiting, 1, 1)[0][0].epoch == 1


def test_walk_reads_pending_shares_from_their_offsets_then_its_own_epochs():
    content = {Share(0, 2, 1, 1, 0): ["a", "b", "c"], Share(0, 2, 1, 0, 0): ["d", "e"]}
    own = lambda epoch: Share(epoch, 1, 1, 0, 0)  # noqa: E731
    content.update({own(e): [f"own{e}.{i}" for i in range(2)] for e in range(1, 4)})
    position = StreamPosition(1, 0, (Pending(Share(0, 2, 1, 1, 0), 1), Pending(Share(0, 2, 1, 0, 0), 2)))
    walker = walk(position, own, read_from(content.__getitem__))
    got = [next(walker) for _ in range(5)]
    assert [item for _, item in got] == ["b", "c", "own1.0", "own1.1", "own2.0"]
    assert got[0][0] == StreamPosition(1, 0, (Pending(Share(0, 2, 1, 1, 0), 2), Pending(Share(0, 2, 1, 0, 0), 2)))
    assert got[1][0].pending[0].offset == 3 and got[1][0].current_epoch == 0
    assert [p for p, _ in got[2:]] == [StreamPosition(1, 1), StreamPosition(1, 2), StreamPosition(2, 1)]


def test_position_state_form_keeps_version_1_states():
    assert position_from_state([3, 17]) == StreamPosition(3, 17)
    assert position_to_state(StreamPosition(3, 17)) == [3, 17]
    position = StreamPosition(2, 0, (Pending(Share(1, 2, 2, 1, 0), 5),))
    assert position_to_state(position) == [2, 0, [[1, 2, 2, 1, 0, 5]]]
    assert position_from_state(position_to_state(position)) == position


def test_states_keep_the_counters_summed_and_the_global_batch():
    def state(rank, streams, samples, skipped):
        return {"version": 1, "mode": "epoch", "seed": 0, "world_size": 2, "batch_size": 6, "epoch_samples": None,
                "shards_per_source": [4, 4], "streams_per_rank": 2, "batches": 10, "streams": streams,
                "samples_per_source": samples, "skipped": skipped}
    ranks = [state(0, [[0, 30], [0, 31]], [40, 20], {"missing image": 2}),
             state(1, [[1, 2], [0, 29]], [30, 30], {"missing image": 1, "empty caption": 4})]
    three = reshard_states(ranks, 3, 1)
    assert [s["batch_size"] for s in three] == [4, 4, 4] and all(s["world_size"] == 3 for s in three)
    assert all(s["batches"] == 10 and s["streams_per_rank"] == 1 for s in three)
    assert three[0]["samples_per_source"] == [70, 50] and three[1]["samples_per_source"] == [0, 0]
    assert three[0]["skipped"] == {"missing image": 3, "empty caption": 4} and three[2]["skipped"] == {}
    positions = [[position_from_state(p) for p in s["streams"]] for s in three]
    assert positions == reshard([[StreamPosition(0, 30), StreamPosition(0, 31)],
                                 [StreamPosition(1, 2), StreamPosition(0, 29)]], 3, 1)
    with pytest.raises(ValueError, match="does not split over 5 ranks"):
        reshard_states(ranks, 5, 1)
