import io
import itertools
from collections import Counter

import numpy as np
import PIL.Image
import pytest
import torch
import webdataset as wds

from clipkit.data import tar_reader
from clipkit.data.stream import ShardStream, StreamPosition, StreamSettings
from clipkit.data.urls import Source
from clipkit.errors import ClipkitConfigError

SAMPLES_PER_SHARD = 3


def _png(value: int = 0) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(np.full((6, 6), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_tar(path, samples):
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)


def make_shards(tmp_path, n=8, per_shard=SAMPLES_PER_SHARD, first=0):
    """n tars whose captions "s<shard> i<sample>" identify where each sample came from."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    urls = []
    for s in range(first, first + n):
        path = tmp_path / f"{s:05d}.tar"
        _write_tar(path, [{"__key__": f"{s}_{i}", "png": _png(s), "txt": f"s{s} i{i}"} for i in range(per_shard)])
        urls.append(str(path))
    return urls


def preprocess(image: PIL.Image.Image) -> torch.Tensor:
    """[3, 6, 6] float32 in 0..1."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def tokenize(captions: list[str]) -> torch.Tensor:
    """[n, 2] int64: (shard, sample) parsed back out of the caption."""
    return torch.tensor([[int(word[1:]) for word in caption.split()] for caption in captions])


def make_stream(sources, *, batch_size=1, rank=0, world_size=1, seed=0, start_batch=0, positions=None, **settings):
    if isinstance(sources[0], str):
        sources = [Source("s", tuple(sources))]
    settings = {"shuffle_buffer": 4, "retry_delay_s": 0.0} | settings
    return ShardStream(sources, StreamSettings(batch_size=batch_size, **settings), preprocess=preprocess,
                       tokenize=tokenize, rank=rank, world_size=world_size, seed=seed, start_batch=start_batch,
                       positions=positions)


def pairs(batches):
    return [tuple(row) for batch, _ in batches for row in batch["text"].tolist()]


def test_ranks_and_streams_partition_every_epoch(tmp_path):
    urls = make_shards(tmp_path)
    for epoch in range(3):
        parts = [[url for url, _ in make_stream(urls, rank=r, world_size=2, streams_per_rank=2).shards_for(epoch, k)]
                 for r in range(2) for k in range(2)]
        assert sorted(url for part in parts for url in part) == sorted(urls)
        assert all(len(part) == 2 for part in parts)
    orders = [make_stream(urls).shards_for(epoch, 0) for epoch in range(3)]
    assert len({tuple(order) for order in orders}) == 3
    assert make_stream(urls, seed=5).shards_for(1, 0) == make_stream(urls, seed=5).shards_for(1, 0)
    assert make_stream(urls, seed=5).shards_for(1, 0) != make_stream(urls, seed=6).shards_for(1, 0)


def test_every_sample_once_per_epoch_and_epochs_differ(tmp_path):
    urls = make_shards(tmp_path)
    per_epoch = len(urls) * SAMPLES_PER_SHARD
    batches = list(itertools.islice(make_stream(urls), 3 * per_epoch))
    epochs = [pairs(batches[e * per_epoch:(e + 1) * per_epoch]) for e in range(3)]
    everything = sorted((s, i) for s in range(len(urls)) for i in range(SAMPLES_PER_SHARD))
    assert all(sorted(epoch) == everything for epoch in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert [(m["epoch"], m["offset"]) for _, m in batches[per_epoch - 1:per_epoch + 1]] == [(0, per_epoch), (1, 1)]
    batch, meta = batches[0]
    assert sorted(batch) == ["image", "text"] and "texts" not in meta
    images, tokens = batch["image"], batch["text"]
    assert images.shape == (1, 3, 6, 6) and images.dtype == torch.float32 and tokens.dtype == torch.int64
    assert meta["index"] == 0 and meta["keys"][0].endswith(".tar#{}_{}".format(*tokens[0].tolist()))


def test_same_seed_same_stream(tmp_path):
    urls = make_shards(tmp_path)
    first = pairs(itertools.islice(make_stream(urls, seed=3, batch_size=5), 6))
    assert first == pairs(itertools.islice(make_stream(urls, seed=3, batch_size=5), 6))
    assert first != pairs(itertools.islice(make_stream(urls, seed=4, batch_size=5), 6))


def test_reads_through_pipe(tmp_path):
    urls = make_shards(tmp_path, n=2)
    batches = itertools.islice(make_stream([f"pipe:cat {url}" for url in urls]), 2 * SAMPLES_PER_SHARD)
    assert sorted(pairs(batches)) == [(s, i) for s in range(2) for i in range(3)]


def test_resampled_mixes_sources_by_weight_in_virtual_epochs(tmp_path):
    a, b = make_shards(tmp_path / "a", n=4), make_shards(tmp_path / "b", n=4, first=4)
    sources = [Source("a", tuple(a), 3.0), Source("b", tuple(b), 1.0)]
    stream = make_stream(sources, mode="resampled", epoch_samples=40, world_size=2, streams_per_rank=2, batch_size=4)
    draws = [source for _, source in itertools.islice(stream.draws(0, 0), 4000)]
    assert draws.count(0) / len(draws) == pytest.approx(0.75, abs=0.03)
    assert list(itertools.islice(stream.draws(0, 0), 20)) != list(itertools.islice(stream.draws(1, 0), 20))
    assert stream.epoch_length() == 10   # 40 samples over 2 ranks x 2 streams
    metas = [m for _, m in itertools.islice(stream, 10)]   # batches 0, 2, 4, ... are stream 0's
    assert [(m["stream"], m["epoch"], m["offset"]) for m in metas[:6]] == [
        (0, 0, 4), (1, 0, 4), (0, 0, 8), (1, 0, 8), (0, 1, 2), (1, 1, 2)]
    assert all(sum(m["sources"]) == 4 for m in metas)
    # Fewer shards than ranks x streams is fine here: streams draw with replacement.
    single = make_stream([Source("a", (a[0],))], mode="resampled", epoch_samples=8, world_size=2, streams_per_rank=2)
    assert len(list(itertools.islice(single, 4))) == 4


@pytest.mark.parametrize("piped", [False, True], ids=["local", "pipe"])
@pytest.mark.parametrize("mode", ["epoch", "resampled"])
def test_resuming_at_a_position_continues_exactly_without_decoding_the_skipped_part(tmp_path, monkeypatch,
                                                                                     mode, piped):
    urls = make_shards(tmp_path, n=4, per_shard=5)
    urls = [f"pipe:cat {url}" for url in urls] if piped else urls
    kw = {"batch_size": 3, "mode": mode, "streams_per_rank": 2, "shuffle_buffer": 6,
          "epoch_samples": 16 if mode == "resampled" else None}
    straight = list(itertools.islice(make_stream(urls, **kw), 14))
    at = 9   # resume after batch 9: stream 0 made batches 0,2,..,8; stream 1 made 1,3,..,9
    positions = [StreamPosition(straight[i][1]["epoch"], straight[i][1]["offset"]) for i in (8, 9)]
    decoded, image_reads = Counter(), Counter()
    resumed_stream = make_stream(urls, start_batch=at + 1, positions=positions, **kw)
    real_decoder = resumed_stream.decoder
    resumed_stream.decoder = lambda data: (decoded.update(["image"]), real_decoder(data))[1]
    real_read = tar_reader.ImageRef.read
    monkeypatch.setattr(tar_reader.ImageRef, "read", lambda self: (image_reads.update(["read"]), real_read(self))[1])
    resumed = list(itertools.islice(resumed_stream, 4))
    assert pairs(resumed) == pairs(straight[at + 1:])
    assert [m["index"] for _, m in resumed] == [10, 11, 12, 13]
    assert decoded["image"] == 4 * 3                         # only the samples handed out
    assert image_reads["read"] == (0 if piped else 4 * 3)    # the skipped images were never read


def test_too_few_shards_for_epoch_mode(tmp_path):
    urls = make_shards(tmp_path, n=3)
    with pytest.raises(ClipkitConfigError, match="3 shards .* 2 ranks x 2 data streams .* data.mode=resampled"):
        make_stream(urls, world_size=2, streams_per_rank=2)
    with pytest.raises(ClipkitConfigError, match="needs data.epoch_samples"):
        make_stream(urls, mode="resampled")


def test_all_unusable_shards_fail_instead_of_spinning(tmp_path):
    for name in ("a.tar", "b.tar"):
        (tmp_path / name).write_bytes(b"not a tar" * 100)
    stream = make_stream([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")])
    with pytest.raises(ClipkitConfigError, match="data source 's' .* all its 2 shards failed.*unopenable shard"):
        next(iter(stream))


def test_undecodable_images_are_counted_and_a_long_run_of_them_fails(tmp_path, monkeypatch):
    path = tmp_path / "x.tar"
    _write_tar(path, [{"__key__": f"bad{i}", "png": b"garbage", "txt": "s0 i0"} for i in range(4)]
               + [{"__key__": "good", "png": _png(), "txt": "s0 i1"}])
    batch, meta = next(iter(make_stream([str(path)], shuffle_buffer=1)))
    assert batch["text"].tolist() == [[0, 1]] and meta["skipped"] == {"undecodable image": 4}
    monkeypatch.setattr("clipkit.data.stream.MAX_UNDECODABLE_IN_A_ROW", 3)
    with pytest.raises(ClipkitConfigError, match="3 images in a row could not be decoded"):
        next(iter(make_stream([str(path)], shuffle_buffer=1)))


def test_open_clip_transforms_on_grayscale_png(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    open_clip = pytest.importorskip("open_clip")
    urls = make_shards(tmp_path, n=1)
    stream = ShardStream([Source("s", tuple(urls))], StreamSettings(batch_size=2),
                         preprocess=open_clip.image_transform(32, is_train=True),
                         tokenize=open_clip.get_tokenizer("ViT-B-32", context_length=16), rank=0, world_size=1, seed=0)
    batch, _ = next(iter(stream))
    images, tokens = batch["image"], batch["text"]
    assert images.shape == (2, 3, 32, 32) and tokens.shape == (2, 16) and tokens.dtype == torch.int64


@pytest.mark.parametrize("bad_shards, limit, what", [(3, 100, "all its 3 shards"), (3, 2, "2 shards in a row")])
def test_a_source_whose_shards_all_fail_stops_the_stream_naming_it(tmp_path, monkeypatch, bad_shards, limit, what):
    monkeypatch.setattr("clipkit.data.stream.MAX_FAILED_SHARDS_IN_A_ROW", limit)
    good = Source("good", tuple(make_shards(tmp_path, n=2)))
    bad = Source("bad", tuple(f"pipe:sh -c 'echo access denied >&2; exit {i + 1}'" for i in range(bad_shards)))
    stream = make_stream([good, bad], open_retries=0)
    with pytest.raises(ClipkitConfigError, match=f"data source 'bad' \\(pipe:.*\\) is unusable: {what} failed") as err:
        list(itertools.islice(iter(stream), 100))
    assert "failed source" in str(err.value) and "\n" not in str(err.value)


def test_a_source_with_some_failing_shards_goes_on_and_counts_them(tmp_path):
    urls = make_shards(tmp_path, n=3)
    source = Source("s", (urls[0], f"pipe:sh -c 'exit 4' {urls[1]}", f"pipe:cat {urls[2]}"))
    batches = list(itertools.islice(iter(make_stream([source], open_retries=0)), 2 * 2 * SAMPLES_PER_SHARD))
    assert sum(m["skipped"].get("failed source", 0) for _, m in batches) == 2   # once per epoch
    assert {tuple(b["text"][0].tolist()) for b, _ in batches} == {(s, i) for s in (0, 2) for i in range(SAMPLES_PER_SHARD)}
