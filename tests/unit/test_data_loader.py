"""TrainLoader with real DataLoader worker processes: exact resume, worker-count changes, counters, key log."""

import itertools
import json
import multiprocessing
from collections import Counter
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_data_stream import _png, make_shards, preprocess, tokenize
from test_data_tar_reader import write_tar

from clipkit.data.loader import TrainLoader, build_sources, build_train_loader, rank_state, stream_settings
from clipkit.data.stream import StreamSettings
from clipkit.data.urls import Source
from clipkit.errors import ClipkitConfigError
from clipkit.preemption import ignore_preemption_signals


def noisy_preprocess(image):
    """The test preprocess plus one torch.rand draw, like a random augmentation."""
    return preprocess(image) + torch.rand(1)


def settings(mode, **kw):
    return StreamSettings(**({"batch_size": 3, "mode": mode, "streams_per_rank": 2, "shuffle_buffer": 4,
                              "retry_delay_s": 0.0, "epoch_samples": 30 if mode == "resampled" else None} | kw))


def loader(sources, mode, workers, rank, state=None, keys_path=None, **kw):
    return TrainLoader(sources, settings(mode, **kw), preprocess=noisy_preprocess, tokenize=tokenize,
                       num_workers=workers, rank=rank, world_size=2, seed=7, state=state, keys_path=keys_path,
                       worker_init_fn=ignore_preemption_signals)  # as training runs them


def take(train_loader, n):
    return [{name: t.clone() for name, t in batch.items()} for batch in itertools.islice(iter(train_loader), n)]


def same(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    return [Source("a", tuple(make_shards(root / "a", n=4, per_shard=5)), 3.0),
            Source("b", tuple(make_shards(root / "b", n=4, per_shard=5, first=4)), 1.0)]


@pytest.mark.parametrize("mode", ["epoch", "resampled"])
def test_resume_continues_exactly_on_every_rank_with_fewer_workers(two_sources, mode):
    total, at = 14, 5
    for rank in range(2):
        straight = take(loader(two_sources, mode, 2, rank), total)
        first = loader(two_sources, mode, 2, rank)
        head = take(first, at)
        # Workers have prefetched past batch 5 by now; the state counts only what was handed out.
        state = first.state_dict()
        assert state["batches"] == at and same(head, straight[:at])
        for workers in (2, 1, 0):   # any divisor of the 2 streams per rank
            assert same(take(loader(two_sources, mode, workers, rank, state=state), total - at), straight[at:])


def test_worker_count_that_does_not_divide_the_streams_is_refused(two_sources):
    saved = loader(two_sources, "epoch", 0, 0).state_dict()
    cfg = OmegaConf.create({"workers": 3, "global_batch_size": 6, "shuffle_buffer": 4, "streams_per_rank": None})
    with pytest.raises(ClipkitConfigError, match=r"data.workers=3 must divide the 2 data streams per rank this run "
                                                 r"was started with; use one of \[1, 2\]"):
        stream_settings(cfg, world_size=2, saved=saved)
    assert stream_settings(OmegaConf.merge(cfg, {"workers": 1}), world_size=2, saved=saved).streams_per_rank == 2
    with pytest.raises(ClipkitConfigError, match="data.workers=3 must divide"):
        stream_settings(OmegaConf.merge(cfg, {"streams_per_rank": 4}), world_size=2)


def test_a_changed_data_layout_is_refused(two_sources):
    saved = loader(two_sources, "epoch", 0, 0).state_dict()
    with pytest.raises(ClipkitConfigError, match="data.global_batch_size / ranks was 3 .* and is 4 now"):
        loader(two_sources, "epoch", 0, 0, state=saved, batch_size=4)
    with pytest.raises(ClipkitConfigError, match="data.global_batch_size was 6 when the checkpoint was written on 2 "
                                                 "ranks and is 12 now; resume on 4 ranks with the same global batch"):
        rank_state({"ranks": [saved, saved]}, rank=0, world_size=4, settings=settings("epoch", batch_size=3))
    shorter = [two_sources[0], Source("b", two_sources[1].urls[:3])]
    with pytest.raises(ClipkitConfigError, match=r"shard count per source\) was \[4, 4\] .* is \[4, 3\]"):
        loader(shorter, "epoch", 0, 0, state=saved)


def sized_loader(sources, world_size, rank, streams, workers, batch_size, state=None, keys_path=None):
    return TrainLoader(sources, settings("epoch", batch_size=batch_size, streams_per_rank=streams),
                       preprocess=noisy_preprocess, tokenize=tokenize, num_workers=workers, rank=rank,
                       world_size=world_size, seed=7, state=state, keys_path=keys_path)


def logged(paths) -> list[tuple[str, int]]:
    return [(key, epoch) for path in paths for r in map(json.loads, path.read_text().splitlines())
            for key, epoch in zip(r["keys"], r["epochs"], strict=True)]


@pytest.mark.parametrize("world_size, streams, workers", [(1, 2, 2), (3, 2, 1), (3, 1, 1), (2, 3, 0), (6, 1, 0)])
def test_a_run_resized_reads_every_sample_of_each_epoch_once(two_sources, tmp_path, world_size, streams, workers):
    """2 ranks x 2 streams (batch 3) -> `world_size` ranks x `streams`, with the global batch of 6 kept.
    Each epoch has 40 samples, 10 per old stream: after 7 batches stream 0 of a rank is in epoch 1
    and stream 1 still in epoch 0."""
    every_key = {f"{url}#{int(Path(url).stem)}_{i}" for source in two_sources for url in source.urls for i in range(5)}
    first = [sized_loader(two_sources, 2, rank, 2, 2, 3, keys_path=tmp_path / f"old{rank}.jsonl") for rank in range(2)]
    for train in first:
        take(train, 7)
    saved = {"ranks": [train.state_dict() for train in first]}
    assert [[p[0] for p in state["streams"]] for state in saved["ranks"]] == [[1, 0], [1, 0]]
    new_settings = settings("epoch", batch_size=6 // world_size, streams_per_rank=streams)
    states = [rank_state(saved, rank, world_size, new_settings) for rank in range(world_size)]
    second = [sized_loader(two_sources, world_size, rank, streams, workers, 6 // world_size, state=states[rank],
                           keys_path=tmp_path / f"new{rank}.jsonl") for rank in range(world_size)]
    for train in second:
        take(train, 20)   # 2 x 7 x 3 + 20 x 6 samples: 4 epochs
    read = logged([tmp_path / f"old{r}.jsonl" for r in range(2)] + [tmp_path / f"new{r}.jsonl" for r in range(world_size)])
    finished = min(p.current_epoch for train in second for p in train.positions)
    assert finished >= 2
    for epoch in range(max(e for _, e in read) + 1):
        counts = Counter(key for key, e in read if e == epoch)
        assert counts == Counter(every_key) if epoch < finished else max(counts.values()) == 1, epoch
    # The per-source counters went on from the checkpoint's, summed over the old ranks.
    assert sum(sum(train.samples_per_source) for train in second) == 2 * 7 * 3 + world_size * 20 * 6 // world_size
    assert all(train.batches == 27 for train in second)


def test_resampled_run_resized_reads_each_virtual_epoch_in_full(two_sources):
    """Resampled: the draws of a virtual epoch are not distinct samples; what is exact is their
    number: each finished virtual epoch yields all its draws (2 x 2 old streams x ceil(30 / 4) = 32)."""
    def make(world_size, rank, streams, batch_size, state=None):
        return TrainLoader(two_sources, settings("resampled", batch_size=batch_size, streams_per_rank=streams),
                           preprocess=noisy_preprocess, tokenize=tokenize, num_workers=0, rank=rank,
                           world_size=world_size, seed=7, state=state)

    first = [make(2, rank, 2, 3) for rank in range(2)]
    old_reads = [meta_epochs(train, 5) for train in first]
    saved = {"ranks": [train.state_dict() for train in first]}
    states = [rank_state(saved, rank, 3, settings("resampled", batch_size=2, streams_per_rank=1)) for rank in range(3)]
    new_reads = [meta_epochs(make(3, rank, 1, 2, state=states[rank]), 25) for rank in range(3)]
    per_epoch = Counter(epoch for reads in old_reads + new_reads for epoch in reads)
    # Stream 0 of each old rank had started virtual epoch 1: epochs 0 and 1 are the old layout's,
    # epoch 2 the new one's (3 streams x ceil(30 / 3)).
    assert (per_epoch[0], per_epoch[1], per_epoch[2]) == (32, 32, 30)


def meta_epochs(train, batches) -> list[int]:
    """Epoch of every sample of the next `batches` batches (through the key log's source, the batch meta)."""
    epochs = []
    original = train._consume
    train._consume = lambda meta: (epochs.extend(meta["epochs"]), original(meta))
    take(train, batches)
    return epochs


def test_the_same_layout_resumes_from_the_saved_state_as_it_is(two_sources):
    saved = {"ranks": [loader(two_sources, "epoch", 0, rank).state_dict() for rank in range(2)]}
    assert rank_state(saved, 1, 2, settings("epoch")) is saved["ranks"][1]


def test_counts_from_worker_processes_reach_stats(tmp_path):
    """Each shard: one sample of every bad kind, then 3 good ones; a batch is one shard's good samples."""
    urls = []
    for s in range(4):
        members = [("nocap.png", _png()), ("noimg.txt", b"x"), ("blank.png", _png()), ("blank.txt", b" "),
                   ("latin.png", _png()), ("latin.txt", b"caf\xe9"), ("../up.png", _png()), ("../up.txt", b"x"),
                   ("broken.png", b"garbage"), ("broken.txt", b"s0 i0")]
        members += [m for i in range(3) for m in ((f"g{i}.png", _png()), (f"g{i}.txt", f"s{s} i{i}".encode()))]
        urls.append(write_tar(tmp_path / f"{s}.tar", members))
    sources = [Source("first", tuple(urls[:2])), Source("second", tuple(urls[2:]))]
    train = TrainLoader(sources, StreamSettings(batch_size=3, streams_per_rank=2, shuffle_buffer=1),
                        preprocess=preprocess, tokenize=tokenize, num_workers=2, rank=0, world_size=1, seed=0)
    take(train, 8)   # two epochs of 4 shards
    stats = train.stats()
    assert stats == {"data/samples/first": 12, "data/samples/second": 12, "data/epoch": 1,
                     **{f"data/skipped/{r}": 8 for r in ("missing_image", "missing_caption", "empty_caption",
                                                         "caption_not_utf-8", "unsafe_member_path",
                                                         "undecodable_image")},
                     **{f"data/skipped/{r}": 0 for r in ("unopenable_shard", "failed_source", "stalled_source",
                                                         "truncated_tar")}}


def test_key_log_reads_as_the_exact_data_order_after_a_resume(two_sources, tmp_path):
    path = tmp_path / "keys" / "rank00000.jsonl"
    first = loader(two_sources, "epoch", 2, 0, keys_path=path)
    stream = iter(first)
    for _ in range(4):
        next(stream)
    state = first.state_dict()
    for _ in range(3):   # consumed after the checkpoint by the "killed" run
        next(stream)
    del stream
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == list(range(1, 8))
    take(loader(two_sources, "epoch", 2, 0, state=state, keys_path=path), 6)
    resumed = [json.loads(line) for line in path.read_text().splitlines()]
    take(loader(two_sources, "epoch", 2, 0, keys_path=tmp_path / "straight.jsonl"), 10)
    straight = [json.loads(line) for line in (tmp_path / "straight.jsonl").read_text().splitlines()]
    assert resumed == straight and [r["step"] for r in straight] == list(range(1, 11))
    assert all(len(r["keys"]) == 3 and all("#" in k for k in r["keys"]) for r in straight)


def test_build_from_the_data_config_section(two_sources):
    spec = "::".join("{}/{{{:05d}..{:05d}}}.tar".format(s.urls[0].rsplit("/", 1)[0], first, first + 3)
                     for s, first in zip(two_sources, (0, 4)))
    cfg = OmegaConf.create({"mode": "resampled", "train_urls": spec, "weights": [3.0, 1.0], "source_names": None,
                            "epoch_samples": 100, "global_batch_size": 16, "workers": 2, "streams_per_rank": None,
                            "shuffle_buffer": 8, "open_retries": 0, "retry_delay_s": 0.0, "jpeg_draft": True})
    sources = build_sources(cfg)
    assert [(s.name, len(s.urls), s.weight) for s in sources] == [("source0", 4, 3.0), ("source1", 4, 1.0)]
    train = build_train_loader(cfg, sources, preprocess=preprocess, tokenize=tokenize, rank=0, world_size=2, seed=0)
    take(train, 40)
    stats = train.stats()
    assert stats["data/samples/source0"] + stats["data/samples/source1"] == 40 * 8
    assert stats["data/samples/source0"] / (40 * 8) == pytest.approx(0.75, abs=0.12)
    for bad, message in [({"mode": "epoch"}, "only apply to data.mode=resampled"),
                         ({"epoch_samples": None}, "needs data.epoch_samples"),
                         ({"weights": [1.0]}, "data.weights has 1 entries for 2"),
                         ({"weights": [1.0, 0.0]}, "must be positive"),
                         ({"mode": "shuffled"}, "data.mode must be one of epoch|resampled")]:
        with pytest.raises(ClipkitConfigError, match=message):
            build_sources(OmegaConf.merge(cfg, bad))


def test_a_workers_config_error_arrives_as_one_line(tmp_path):
    (tmp_path / "a.tar").write_bytes(b"not a tar" * 100)
    (tmp_path / "b.tar").write_bytes(b"not a tar" * 100)
    train = TrainLoader([Source("s", (str(tmp_path / "a.tar"), str(tmp_path / "b.tar")))],
                        StreamSettings(batch_size=2, streams_per_rank=1), preprocess=preprocess, tokenize=tokenize,
                        num_workers=1, rank=0, world_size=1, seed=0)
    with pytest.raises(ClipkitConfigError) as caught:
        next(iter(train))
    assert str(caught.value).startswith("data source 's' ") and "\n" not in str(caught.value)


def _live_children() -> set[int]:
    return {p.pid for p in multiprocessing.active_children() if p.is_alive()}


def test_workers_are_stopped_when_an_error_or_an_early_stop_ends_the_iteration(tmp_path, two_sources):
    """Training's workers ignore SIGTERM (preemption), so neither DataLoader's terminate() fallback nor
    multiprocessing's at-exit terminate can stop one: a worker the loader left behind made the
    interpreter's exit wait on it forever (a CI run hung there after its last test)."""
    before = _live_children()
    (tmp_path / "a.tar").write_bytes(b"not a tar" * 100)
    broken = TrainLoader([Source("s", (str(tmp_path / "a.tar"),))], StreamSettings(batch_size=2, streams_per_rank=1),
                         preprocess=preprocess, tokenize=tokenize, num_workers=1, rank=0, world_size=1, seed=0,
                         worker_init_fn=ignore_preemption_signals)
    # `caught` keeps the error's traceback, and through it the iterator, alive (as in the hung run).
    with pytest.raises(ClipkitConfigError) as caught:
        next(iter(broken))
    assert _live_children() == before and caught.tb is not None, "the failed iteration left a worker running"
    batches = iter(loader(two_sources, "resampled", 2, 0))
    next(batches)
    assert len(_live_children() - before) == 2
    batches.close()  # what dropping a half-read loader does
    assert _live_children() == before, "the abandoned iteration left workers running"
