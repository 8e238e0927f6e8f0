"""The long-caption digits demo: the same digits shards as `clipkit-shards digits`, long captions
measured from the pixels, hard negatives that swap one attribute, and the two held-out eval sets."""

import itertools
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from test_data_stream import preprocess
from test_data_texts import char_tokenize

from clipkit.data.digits import write_digits_shards
from clipkit.data.digits_captions import (
    ATTRIBUTES,
    SENTENCES,
    WORDS,
    measure,
    tertiles,
    word_index,
    write_digits_caption_shards,
)
from clipkit.data.eval_reader import DATASET_TYPE_FILE, clip_benchmark_set
from clipkit.data.loader import build_sources, build_train_loader
from clipkit.errors import ClipkitConfigError


def _members(folder):
    out = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                out[member.name] = tar.extractfile(member).read()
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    stats = write_digits_caption_shards(root / "captions", image_size=8, shard_size=400)
    write_digits_shards(root / "plain", image_size=8, shard_size=400)
    return root, stats


def test_the_digits_shards_are_todays_plus_a_json(demo):
    root, stats = demo
    assert stats["count"] == 1797 and stats["train"]["count"] == 1437 and stats["test"]["count"] == 360
    for split in ("train", "test"):
        plain, captions = _members(root / "plain" / split), _members(root / "captions" / split)
        assert {n: b for n, b in captions.items() if not n.endswith(".json")} == plain
        assert {n.rsplit(".", 1)[0] for n in captions if n.endswith(".json")} == {n.rsplit(".", 1)[0] for n in plain}
    for name in ("classnames.txt", "zeroshot_classification_templates.txt"):
        assert (root / "captions" / name).read_text() == (root / "plain" / name).read_text()


def test_long_captions_describe_the_measured_attributes_and_negatives_swap_one(demo):
    root, _ = demo
    members = _members(root / "captions" / "train")
    docs = [json.loads(b) for n, b in members.items() if n.endswith(".json")]
    counts = Counter()
    for doc in docs:
        sentences = doc["long_caption"].split(". ")
        assert len(sentences) == 1 + len(ATTRIBUTES)
        for attribute in ATTRIBUTES:
            assert SENTENCES[attribute].format(doc["attributes"][attribute]) in doc["long_caption"]
            counts[attribute, doc["attributes"][attribute]] += 1
        assert 2 <= len(doc["negatives"]) <= 3 and len(set(doc["negatives"])) == len(doc["negatives"])
        swapped = []
        for negative in doc["negatives"]:
            lost = [a for a in ATTRIBUTES if SENTENCES[a].format(doc["attributes"][a]) not in negative]
            assert len(lost) == 1   # exactly one attribute changed, to another word of it
            assert any(SENTENCES[lost[0]].format(w) in negative for w in WORDS[lost[0]]
                       if w != doc["attributes"][lost[0]])
            assert len(negative.split(". ")) == len(sentences)
            swapped.append(lost[0])
        assert len(set(swapped)) == len(swapped)
    # Bins are the train split's tertiles: each word about a third of the train digits.
    for attribute in ATTRIBUTES:
        for word in WORDS[attribute]:
            assert counts[attribute, word] / len(docs) == pytest.approx(1 / 3, abs=0.02), (attribute, word)


def test_measures_on_drawn_digits():
    thin, thick = np.zeros((8, 8)), np.zeros((8, 8))
    thin[1:7, 4] = 16
    thick[1:7, 3:6] = 16
    assert measure(thick)["thickness"] > measure(thin)["thickness"]
    right, left = np.zeros((8, 8)), np.zeros((8, 8))
    for row in range(1, 7):   # row 1 is the top
        right[row, 7 - row] = 16
        left[row, row] = 16
    assert measure(right)["slant"] > 0.5 > -0.5 > measure(left)["slant"]
    assert abs(measure(thin)["slant"]) < 1e-9
    assert measure(np.roll(thin, -3, axis=1))["position"] < measure(thin)["position"]
    small, large = np.zeros((8, 8)), np.zeros((8, 8))
    small[3:5, 3:5], large[0:8, 0:8] = 16, 16
    assert measure(large)["size"] > measure(small)["size"]
    faint = thin * 0.4
    assert measure(faint)["brightness"] < measure(thin)["brightness"]
    edges = tertiles(np.arange(9.0))
    assert [word_index(v, edges) for v in (0.0, 3.0, 5.0, 8.0)] == [0, 1, 1, 2]   # edges 8/3, 16/3


def test_held_out_retrieval_and_selection_sets(demo):
    root, stats = demo
    test_keys = {n.split(".")[0] for n in _members(root / "captions" / "test")}
    docs = {n.split(".")[0]: json.loads(b) for n, b in _members(root / "captions" / "test").items()
            if n.endswith(".json")}
    for name, kind in (("long_retrieval", "retrieval"), ("selection", "selection")):
        assert (root / "captions" / name / DATASET_TYPE_FILE).read_text().strip() == kind
        urls, dataset_type = clip_benchmark_set(str(root / "captions" / name), "test")
        assert dataset_type == kind and len(urls) >= 2 and stats[name]["count"] == 360
        members = _members(root / "captions" / name / "test")
        keys = {n.split(".")[0] for n in members}
        assert keys == test_keys
        for key in keys:
            assert members[f"{key}.txt"].decode() == docs[key]["long_caption"] and f"{key}.cls" not in members
            if name == "selection":
                assert json.loads(members[f"{key}.json"]) == {"negatives": docs[key]["negatives"]}
            else:
                assert f"{key}.json" not in members


def test_refuses_to_overwrite_and_is_deterministic(demo, tmp_path):
    root, _ = demo
    with pytest.raises(ClipkitConfigError, match="overwrite"):
        write_digits_caption_shards(root / "captions", image_size=8, shard_size=400)
    write_digits_caption_shards(tmp_path / "again", image_size=8, shard_size=400)
    for folder in ("train", "test", "selection/test"):
        assert _members(tmp_path / "again" / folder) == _members(root / "captions" / folder)


def test_training_reads_the_demo_with_text_roles(demo):
    root, _ = demo
    cfg = OmegaConf.create({
        "train_urls": str(root / "captions" / "train" / "{00000..00003}.tar"), "global_batch_size": 4, "workers": 0,
        "shuffle_buffer": 8, "texts": {
            "alt": {"sources": ["txt"]},
            "long": {"sources": ["json:long_caption"], "k": 2, "select": "subcaptions", "context_length": 64},
            "neg": {"sources": ["json:negatives"], "k": 2, "select": "sample", "negative": True}}})
    train = build_train_loader(cfg, build_sources(cfg), preprocess=preprocess, tokenize=char_tokenize, rank=0,
                               world_size=1, seed=0)
    for batch in itertools.islice(iter(train), 3):
        assert batch["text_long"].shape == (4, 2, 64) and batch["text_long_valid"].all()
        assert batch["text_neg"].shape == (4, 2, 12) and batch["text_neg_valid"].all()
        assert batch["image"].shape == (4, 3, 8, 8) and batch["text_alt"].dtype == torch.int64
