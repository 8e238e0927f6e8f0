"""TrainLoader with real DataLoader worker processes: exact resume, worker-count changes, counters, key log."""

import itertools
import json
import multiprocessing

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
    return [(images.clone(), tokens.clone()) for images, tokens in itertools.islice(iter(train_loader), n)]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


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
    with pytest.raises(ClipkitConfigError, match="saved by 2 ranks; resuming on 4"):
        rank_state({"ranks": [saved, saved]}, rank=0, world_size=4)
    shorter = [two_sources[0], Source("b", two_sources[1].urls[:3])]
    with pytest.raises(ClipkitConfigError, match=r"shard count per source\) was \[4, 4\] .* is \[4, 3\]"):
        loader(shorter, "epoch", 0, 0, state=saved)


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
