import io

import numpy as np
import PIL.Image
import pytest
import torch
import webdataset as wds

from clipkit.data.eval_reader import iter_eval_batches, read_set_metadata
from clipkit.errors import ClipkitConfigError


def _png() -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(np.zeros((5, 5), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def preprocess(image: PIL.Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)


def _eval_set(tmp_path, sizes=(4, 3, 4)):
    """Shards of sizes `sizes`; sample k overall has key k{k:02d}, label k % 3 (none when k % 5 == 4)."""
    (tmp_path / "test").mkdir()
    urls, k = [], 0
    for s, size in enumerate(sizes):
        path = tmp_path / "test" / f"{s:05d}.tar"
        with wds.TarWriter(str(path)) as writer:
            for _ in range(size):
                sample = {"__key__": f"k{k:02d}", "png": _png(), "txt": f"first {k}\nsecond {k}\n"}
                if k % 5 != 4:
                    sample["cls"] = str(k % 3)
                writer.write(sample)
                k += 1
        urls.append(str(path))
    return urls, k


def test_ranks_split_by_sample_and_cover_the_set_once(tmp_path):
    urls, total = _eval_set(tmp_path)
    keys = {}
    for rank in range(2):
        batches = list(iter_eval_batches(urls, preprocess=preprocess, batch_size=4, rank=rank, world_size=2))
        keys[rank] = [key for batch in batches for key in batch.keys]
        assert all(b.images.shape[1:] == (3, 5, 5) and b.images.dtype == torch.float32 for b in batches)
    assert keys[0] == [f"k{k:02d}" for k in range(0, total, 2)]
    assert keys[1] == [f"k{k:02d}" for k in range(1, total, 2)]


def test_labels_and_multiline_captions(tmp_path):
    urls, total = _eval_set(tmp_path)
    batches = list(iter_eval_batches(urls, preprocess=preprocess, batch_size=4))
    assert [b.images.shape[0] for b in batches] == [4, 4, 3]
    labels = torch.cat([b.labels for b in batches])
    assert labels.dtype == torch.int64
    assert labels.tolist() == [-1 if k % 5 == 4 else k % 3 for k in range(total)]
    assert batches[0].captions[1] == ["first 1", "second 1"]


def test_sets_without_captions_give_empty_lists(tmp_path):
    path = tmp_path / "0.tar"
    with wds.TarWriter(str(path)) as writer:
        writer.write({"__key__": "a", "png": _png(), "cls": "2"})
    (batch,) = iter_eval_batches([str(path)], preprocess=preprocess, batch_size=8)
    assert batch.captions == [[]] and batch.labels.tolist() == [2]


def test_undecodable_eval_image_is_an_error(tmp_path):
    path = tmp_path / "0.tar"
    with wds.TarWriter(str(path)) as writer:
        writer.write({"__key__": "bad", "png": b"junk", "txt": "x"})
    with pytest.raises(ClipkitConfigError, match="bad"):
        list(iter_eval_batches([str(path)], preprocess=preprocess, batch_size=8))


def test_metadata_from_shard_dir_or_parent(tmp_path):
    urls, _ = _eval_set(tmp_path)
    assert read_set_metadata(str(tmp_path / "test")) == (None, None)
    (tmp_path / "classnames.txt").write_text("cat\ndog\n")
    (tmp_path / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n{c}.\n")
    expected = (["cat", "dog"], ["a photo of a {c}.", "{c}."])
    assert read_set_metadata(str(tmp_path / "test")) == expected
    assert read_set_metadata(str(tmp_path / "test" / "{00000..00002}.tar")) == expected
    (tmp_path / "test" / "classnames.txt").write_text("near\n")
    assert read_set_metadata(str(tmp_path / "test"))[0] == ["near"]
