import io
import itertools
import logging

import numpy as np
import PIL.Image
import pytest
import torch
import webdataset as wds

from clipkit.data.stream import ShardStream, build_train_loader
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


def _shards(tmp_path, n=8):
    """n tars whose captions "s<shard> i<sample>" identify where each sample came from."""
    urls = []
    for s in range(n):
        path = tmp_path / f"{s:05d}.tar"
        _write_tar(path, [{"__key__": f"{s}_{i}", "png": _png(s), "txt": f"s{s} i{i}"}
                          for i in range(SAMPLES_PER_SHARD)])
        urls.append(str(path))
    return urls


def preprocess(image: PIL.Image.Image) -> torch.Tensor:
    """[3, 6, 6] float32 in 0..1."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def tokenize(captions: list[str]) -> torch.Tensor:
    """[n, 2] int64: (shard, sample) parsed back out of the caption."""
    return torch.tensor([[int(word[1:]) for word in caption.split()] for caption in captions])


def _stream(urls, **kw):
    kw = {"rank": 0, "world_size": 1, "seed": 0, "shuffle_buffer": 4} | kw
    return ShardStream(urls, preprocess=preprocess, tokenize=tokenize, **kw)


def test_ranks_and_workers_partition_every_epoch(tmp_path):
    urls = _shards(tmp_path)
    world, workers = 2, 2
    for epoch in range(3):
        parts = [_stream(urls, rank=r, world_size=world).shards_for(epoch, w, workers)
                 for r in range(world) for w in range(workers)]
        flat = [url for part in parts for url in part]
        assert sorted(flat) == sorted(urls)
        assert all(len(part) == 2 for part in parts)
    orders = [_stream(urls).shards_for(epoch, 0, 1) for epoch in range(3)]
    assert len({tuple(order) for order in orders}) == 3
    assert _stream(urls, seed=5).shards_for(1, 0, 1) == _stream(urls, seed=5).shards_for(1, 0, 1)
    assert _stream(urls, seed=5).shards_for(1, 0, 1) != _stream(urls, seed=6).shards_for(1, 0, 1)


def test_every_sample_once_per_epoch_and_epochs_differ(tmp_path):
    urls = _shards(tmp_path)
    per_epoch = len(urls) * SAMPLES_PER_SHARD
    items = list(itertools.islice(_stream(urls), 3 * per_epoch))
    epochs = [[tuple(tokens.tolist()) for _, tokens in items[e * per_epoch:(e + 1) * per_epoch]] for e in range(3)]
    everything = sorted((s, i) for s in range(len(urls)) for i in range(SAMPLES_PER_SHARD))
    assert all(sorted(epoch) == everything for epoch in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    image, tokens = items[0]
    assert image.shape == (3, 6, 6) and image.dtype == torch.float32 and tokens.dtype == torch.int64


def test_same_seed_same_stream(tmp_path):
    urls = _shards(tmp_path)
    first = [t.tolist() for _, t in itertools.islice(_stream(urls, seed=3), 30)]
    again = [t.tolist() for _, t in itertools.islice(_stream(urls, seed=3), 30)]
    assert first == again


def test_reads_through_pipe(tmp_path):
    urls = _shards(tmp_path, n=2)
    items = list(itertools.islice(_stream([f"pipe:cat {url}" for url in urls]), 2 * SAMPLES_PER_SHARD))
    assert sorted(tuple(t.tolist()) for _, t in items) == [(s, i) for s in range(2) for i in range(3)]


def test_bad_samples_are_skipped_and_counted(tmp_path, caplog):
    path = tmp_path / "mixed.tar"
    _write_tar(path, [
        {"__key__": "good", "png": _png(), "txt": "s0 i0"},
        {"__key__": "nocaption", "png": _png()},
        {"__key__": "noimage", "txt": "s0 i1"},
        {"__key__": "garbage", "png": b"not an image", "txt": "s0 i2"},
        {"__key__": "blank", "png": _png(), "txt": "  \n"},
        {"__key__": "blank2", "png": _png(), "txt": ""},
    ])
    corrupt = tmp_path / "corrupt.tar"
    corrupt.write_bytes(b"this is not a tar archive" * 50)
    stream = _stream([str(path), str(corrupt)], shuffle_buffer=1)
    with caplog.at_level(logging.WARNING, logger="clipkit.data.stream"):
        # The third item comes from epoch 2, so epochs 0 and 1 have been read in full.
        items = list(itertools.islice(stream, 3))
    assert [t.tolist() for _, t in items] == [[0, 0]] * 3
    # Epoch 2 may have opened the corrupt shard before its first good sample.
    assert stream.skipped.pop("unreadable shard (ReadError)") >= 2
    assert stream.skipped == {"missing caption": 2, "missing image": 2, "undecodable image": 2, "empty caption": 4}
    assert len([r for r in caplog.records if "empty caption" in r.getMessage()]) == 1


def test_loader_with_workers_yields_batches(tmp_path):
    urls = _shards(tmp_path)
    loader = build_train_loader(urls, preprocess=preprocess, tokenize=tokenize, batch_size=5, num_workers=2,
                                rank=1, world_size=2, seed=0, shuffle_buffer=4)
    batches = list(itertools.islice(loader, 4))
    for images, tokens in batches:
        assert images.shape == (5, 3, 6, 6) and images.dtype == torch.float32
        assert tokens.shape == (5, 2) and tokens.dtype == torch.int64
    rank1_shards = {s for w in range(2) for s in _stream(urls, rank=1, world_size=2).shards_for(0, w, 2)}
    seen_first = {urls[s] for s in batches[0][1][:, 0].tolist()}
    assert seen_first <= rank1_shards


def test_open_clip_transforms_on_grayscale_png(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    open_clip = pytest.importorskip("open_clip")
    urls = _shards(tmp_path, n=1)
    stream = ShardStream(urls, preprocess=open_clip.image_transform(32, is_train=False),
                         tokenize=open_clip.get_tokenizer("ViT-B-32", context_length=16), rank=0, world_size=1, seed=0)
    image, tokens = next(iter(stream))
    assert image.shape == (3, 32, 32) and tokens.shape == (16,) and tokens.dtype == torch.int64


def test_too_few_shards_fails_before_workers_start(tmp_path):
    urls = _shards(tmp_path, n=3)
    with pytest.raises(ClipkitConfigError, match="3 shards .* 2 ranks x 2 data workers"):
        build_train_loader(urls, preprocess=preprocess, tokenize=tokenize, batch_size=2, num_workers=2,
                           rank=0, world_size=2, seed=0)
