"""Image-caption selection (SugarCrepe-style): accuracy against a plain reference, the shard
reader's caption/negative sources, the CLIP_benchmark JSON, and 2 ranks against 1."""

import io
import json
import os
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import webdataset as wds
from torch import nn

from clipkit.data.eval_reader import EvalTexts, sample_texts
from clipkit.errors import ClipkitConfigError
from clipkit.eval import EmbeddedSet, evaluate_embedded
from clipkit.eval.metrics import (
    TIE_ATOL,
    pooled_own_scores,
    retrieval_metrics_exact,
    selection_metrics,
)
from clipkit.eval.runner import SearchConfig
from clipkit.eval.suite import EvalSuite, build_eval_specs
from tests.conftest import free_port


def reference_selection_accuracy(image: np.ndarray, groups: list[np.ndarray], tie_atol: float) -> float:
    """Per image, in float64: the true caption (row 0 of its group) must beat every negative by more than tie_atol."""
    hits = []
    for i, texts in enumerate(groups):
        scores = [float(np.dot(image[i].astype(np.float64), t.astype(np.float64))) for t in texts]
        hits.append(all(s < scores[0] - tie_atol for s in scores[1:]))
    return sum(hits) / len(hits)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def random_selection_set(seed: int, n: int = 60, dim: int = 12) -> tuple[np.ndarray, list[np.ndarray]]:
    """n images, 1-4 negatives each; every 5th image has a negative equal to its true caption
    (an exact tie), every 7th one within TIE_ATOL/4 of it in score (a near tie)."""
    rng = np.random.default_rng(seed)
    image = _unit(rng.standard_normal((n, dim)))
    groups = []
    for i in range(n):
        texts = _unit(image[i] * 0.8 + rng.standard_normal((1 + rng.integers(1, 5), dim)))
        if i % 5 == 0:
            texts[-1] = texts[0]
        groups.append(texts)
    for i in range(0, n, 7):   # a negative whose score is the true one's minus TIE_ATOL/4
        true, neg = groups[i][0].astype(np.float64), groups[i][1].astype(np.float64)
        delta = image[i].astype(np.float64)
        # move neg along the image direction until its score is just below the true caption's
        neg = neg + (np.dot(image[i], true) - np.dot(image[i], neg) - TIE_ATOL / 4) * delta
        groups[i][1] = neg.astype(np.float32)
    return image, groups


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tie_atol", [TIE_ATOL, 0.0, 0.05])
def test_selection_accuracy_equals_plain_reference(seed: int, tie_atol: float) -> None:
    image, groups = random_selection_set(seed)
    text = np.concatenate(groups)
    owners = np.repeat(np.arange(len(groups)), [len(g) for g in groups])
    got = selection_metrics(pooled_own_scores(image, text, owners), owners, len(image), tie_atol=tie_atol)
    assert got == {"acc": pytest.approx(reference_selection_accuracy(image, groups, tie_atol), abs=0)}
    # The set is built so that ties decide some images: exact ties miss at any tolerance.
    assert got["acc"] <= 1 - len(range(0, len(groups), 5)) / len(groups)


def test_near_tie_counts_within_the_tolerance_only() -> None:
    image = np.array([[1.0, 0.0]], np.float32)
    texts = np.array([[0.5, 0.0], [0.5 - TIE_ATOL / 4, 0.0]], np.float32)   # true 0.5, negative just below
    owners = np.array([0, 0])
    scores = pooled_own_scores(image, texts, owners)
    assert selection_metrics(scores, owners, 1)["acc"] == 0.0            # within 1e-6: a tie, a miss
    assert selection_metrics(scores, owners, 1, tie_atol=0.0)["acc"] == 1.0
    exact = np.array([[0.5, 0.0], [0.5, 0.0]], np.float32)
    assert selection_metrics(pooled_own_scores(image, exact, owners), owners, 1, tie_atol=0.0)["acc"] == 0.0


def test_selection_refuses_images_without_negatives_or_unordered_texts() -> None:
    with pytest.raises(ValueError, match="at least|>= 1 negative"):
        selection_metrics(np.zeros(3), np.array([0, 0, 1]), 2)
    with pytest.raises(ValueError, match="together"):
        selection_metrics(np.zeros(4), np.array([0, 1, 0, 1]), 2)
    emb = EmbeddedSet(torch.eye(2), torch.eye(2)[[0, 1, 1]], torch.tensor([0, 0, 1]), torch.tensor([-1, -1]))
    with pytest.raises(ClipkitConfigError, match="selection: .*negative"):
        evaluate_embedded(emb, tasks=["selection"], classifier=None)


def test_retrieval_on_a_selection_set_ranks_the_true_captions_only() -> None:
    image, groups = random_selection_set(3, n=20)
    text = np.concatenate(groups)
    owners = np.repeat(np.arange(len(groups)), [len(g) for g in groups])
    emb = EmbeddedSet(torch.from_numpy(image), torch.from_numpy(text), torch.from_numpy(owners),
                      torch.full((len(image),), -1))
    got = evaluate_embedded(emb, tasks=["retrieval", "selection"], classifier=None, use_gpu=False)
    first = np.r_[True, owners[1:] != owners[:-1]]
    assert got["retrieval"] == retrieval_metrics_exact(text[first], image, owners[first])
    assert got["selection"]["acc"] == reference_selection_accuracy(image, groups, TIE_ATOL)


# -- the shard reader ------------------------------------------------------------------------

def _sample(**members) -> dict:
    return {"__key__": "k", "__url__": "u.tar", **{k: (v if isinstance(v, bytes) else v.encode()) for k, v in members.items()}}


def test_sample_texts_sources() -> None:
    s = _sample(txt="a short caption\nanother line",
                json=json.dumps({"long_caption": "A seven. Thick strokes.\nSlanted left.",
                                 "meta": {"negs": ["n1", " ", "n2"]}, "negatives": "only one"}))
    assert sample_texts(s, EvalTexts()) == ["a short caption", "another line"]            # txt: one per line
    assert sample_texts(s, EvalTexts("json:long_caption")) == ["A seven. Thick strokes.\nSlanted left."]  # never split
    assert sample_texts(s, EvalTexts("json:long_caption", "json:meta.negs")) == [
        "A seven. Thick strokes.\nSlanted left.", "n1", "n2"]
    assert sample_texts(s, EvalTexts("json:long_caption", "json:negatives")) == [
        "A seven. Thick strokes.\nSlanted left.", "only one"]
    assert sample_texts(s, EvalTexts("txt", "rest")) == ["a short caption", "another line"]   # CLIP_benchmark order
    assert sample_texts(s, EvalTexts("json:absent")) == []


@pytest.mark.parametrize("texts,members,match", [
    (EvalTexts("txt", "json:negatives"), {"txt": "one\ntwo", "json": '{"negatives": ["n"]}'}, "has 2 and 1"),
    (EvalTexts("txt", "json:negatives"), {"txt": "one", "json": '{"negatives": []}'}, "has 1 and 0"),
    (EvalTexts("txt", "json:negatives"), {"txt": "one"}, "has 1 and 0"),
    (EvalTexts("txt", "rest"), {"txt": "only the true one"}, "has 1 and 0"),
    (EvalTexts("json:x"), {"json": '{"x": 3}'}, "json:x is a int"),
    (EvalTexts("json:x"), {"json": "{not json"}, "not valid UTF-8 JSON"),
    (EvalTexts("txt"), {"txt": b"\xff\xfe"}, "not UTF-8"),
])
def test_sample_texts_refuses_what_would_change_the_denominator(texts, members, match) -> None:
    with pytest.raises(ClipkitConfigError, match=match) as err:
        sample_texts(_sample(**members), texts)
    assert "\n" not in str(err.value) and "sample k in u.tar" in str(err.value)


def test_text_sources_are_checked_when_the_set_is_built(tmp_path: Path) -> None:
    shard = tmp_path / "0.tar"
    shard.touch()
    with pytest.raises(ClipkitConfigError, match="eval.sets.s.caption_source='json:'"):
        build_eval_specs({"s": {"urls": str(shard), "caption_source": "json:", "tasks": ["retrieval"]}})
    with pytest.raises(ClipkitConfigError, match="eval.sets.s.caption_source='rest'"):
        build_eval_specs({"s": {"urls": str(shard), "caption_source": "rest", "tasks": ["retrieval"]}})
    with pytest.raises(ClipkitConfigError, match="selection task reads webdataset shards"):
        build_eval_specs({"s": {"csv": "/x/a.csv", "tasks": ["selection"]}})
    with pytest.raises(ClipkitConfigError, match="context_length must be >= 2"):
        build_eval_specs({"s": {"urls": str(shard), "context_length": 1}})
    spec, = build_eval_specs({"s": {"urls": str(shard), "tasks": ["retrieval"]}})
    assert spec.texts == EvalTexts("txt", None)   # negatives are read only for the selection task
    spec, = build_eval_specs({"s": {"urls": str(shard), "tasks": ["selection", "retrieval"],
                                    "negatives_source": "json:hard"}})
    assert spec.texts == EvalTexts("txt", "json:hard")


# -- shards through the suite ----------------------------------------------------------------

COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def _png(rgb) -> bytes:
    buf = io.BytesIO()
    PIL.Image.new("RGB", (4, 4), rgb).save(buf, format="PNG")
    return buf.getvalue()


def preprocess(image: PIL.Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)


class ColorObjective(nn.Module):
    """Image: its mean colour; text: the colour it names (tokens are the embedding)."""

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.float()


def color_tokenizer(texts: list[str]) -> torch.Tensor:
    def vec(t: str) -> list[float]:
        hit = [float(c in t.split()) for c in COLORS]
        return hit if any(hit) else [zlib.crc32(t.encode()) % 7 / 7.0, 0.1, 0.1]
    return torch.tensor([vec(t) for t in texts])


def write_selection_set(root: Path, rows: list[tuple[str, str, list[str]]], *, dataset_type: str = "selection",
                        shard_size: int = 2) -> Path:
    """CLIP_benchmark layout: root/test/{0..}.tar + nshards.txt, root/dataset_type.txt.
    rows: (image colour, true caption as txt, negatives as the .json's "negatives")."""
    (root / "test").mkdir(parents=True)
    shards = [rows[i:i + shard_size] for i in range(0, len(rows), shard_size)]
    for s, chunk in enumerate(shards):
        with wds.TarWriter(str(root / "test" / f"{s}.tar")) as writer:
            for j, (color, caption, negatives) in enumerate(chunk):
                writer.write({"__key__": f"{s * shard_size + j:06d}", "png": _png(COLORS[color]), "txt": caption,
                              "json": {"negatives": negatives}})
    (root / "test" / "nshards.txt").write_text(f"{len(shards)}\n")
    (root / "dataset_type.txt").write_text(dataset_type + "\n")
    return root


ROWS = [("red", "a red square", ["a green square", "a blue square"]),
        ("green", "a green square", ["a red square"]),
        ("blue", "a blue square", ["a blue circle", "a red square"]),   # "blue circle" ties the true caption
        ("red", "a red dot", ["a green dot", "a blue dot", "a green blue dot"])]


@pytest.mark.parametrize("dataset_type", ["selection", "image_caption_selection"])
def test_selection_set_writes_clip_benchmark_json(tmp_path: Path, dataset_type: str) -> None:
    root = write_selection_set(tmp_path / "sc", ROWS, dataset_type=dataset_type)
    spec, = build_eval_specs({"sc": {"clip_benchmark": str(root)}})
    assert spec.tasks == ["selection"] and spec.texts == EvalTexts("txt", "json:negatives")
    suite = EvalSuite([spec], preprocess=preprocess, tokenizer=color_tokenizer, batch_size=3,
                      out_dir=tmp_path / "out", model_name="color", pretrained="none")
    metrics = suite.run(ColorObjective(), device="cpu")
    assert metrics == {"sc/acc": 0.75}   # the tie of image 2 is a miss (CLIP_benchmark's argmax would say 1.0)
    record = json.loads((tmp_path / "out" / "sc_selection.json").read_text())
    assert record == {"dataset": "sc", "model": "color", "pretrained": "none", "task": "image_caption_selection",
                      "metrics": {"acc": 0.75}, "language": "en"}


def test_selection_and_retrieval_on_one_set(tmp_path: Path) -> None:
    root = write_selection_set(tmp_path / "sc", ROWS)
    spec, = build_eval_specs({"sc": {"clip_benchmark": str(root), "tasks": ["selection", "retrieval"]}})
    suite = EvalSuite([spec], preprocess=preprocess, tokenizer=color_tokenizer, batch_size=2, out_dir=tmp_path / "o",
                      model_name="color")
    metrics = suite.run(ColorObjective(), device="cpu")
    # Retrieval sees the 4 true captions only: images 0 and 3 (both red) tie, so red queries miss at R@1.
    assert metrics["sc/acc"] == 0.75 and metrics["sc/image_retrieval_recall@1"] == 0.5
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["sc_retrieval.json", "sc_selection.json"]


# -- 2 ranks against 1, with a real tiny open_clip model ---------------------------------------

TINY = {"embed_dim": 32, "vision_cfg": {"image_size": 16, "patch_size": 8, "layers": 1, "width": 64, "head_width": 32},
        "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
WORDS = "red green blue thick thin slanted upright small large bright dark left right centre".split()


def _random_rows(n: int, seed: int = 0) -> list[tuple[str, str, list[str]]]:
    rng = np.random.default_rng(seed)
    def caption() -> str:
        return " ".join(rng.choice(WORDS, size=6))
    return [(list(COLORS)[i % 3], caption(), [caption() for _ in range(1 + i % 3)]) for i in range(n)]


def _tiny_suite(root: Path, out_dir: Path | None):
    from clipkit.models import build_model
    from clipkit.objective import ContrastiveObjective

    bundle = build_model("clipkit-test-selection-tiny", config=TINY)
    spec, = build_eval_specs({"sel": {"clip_benchmark": str(root), "tasks": ["selection", "retrieval"],
                                      "context_length": 12}})
    suite = EvalSuite([spec], preprocess=bundle.preprocess_val, tokenizer=bundle.tokenizer, batch_size=2,
                      out_dir=out_dir, model_name="tiny", search=SearchConfig())
    return bundle, suite, lambda model: ContrastiveObjective(model, loss=None)


def _two_rank_worker(rank: int, port: int, root: str, weights: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        bundle, suite, objective = _tiny_suite(Path(root), None)
        bundle.model.load_state_dict(torch.load(weights))
        metrics = suite.run(objective(bundle.model.eval()), device="cpu")
        torch.save(metrics, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_rank_selection_equals_one_rank(tmp_path: Path) -> None:
    root = write_selection_set(tmp_path / "sel", _random_rows(7), shard_size=3)   # uneven rank shares: 4 and 3
    torch.manual_seed(0)
    bundle, suite, objective = _tiny_suite(root, tmp_path / "one")
    torch.save(bundle.model.state_dict(), tmp_path / "w.pt")
    one = suite.run(objective(bundle.model.eval()), device="cpu")
    assert set(one) >= {"sel/acc", "sel/image_retrieval_recall@1"} and 0 <= one["sel/acc"] <= 1
    mp.spawn(_two_rank_worker, args=(free_port(), str(root), str(tmp_path / "w.pt"), str(tmp_path)), nprocs=2,
             join=True)
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt") == one, rank


# -- late interaction (FILIP) ------------------------------------------------------------------

@pytest.mark.parametrize("block", [1, 3, 256])
def test_late_interaction_selection_equals_per_pair_reference(block: int) -> None:
    from clipkit.eval.late_interaction import late_interaction_metrics, own_image_scores
    from clipkit.losses.functional import filip_similarity

    gen = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(7, 3, 8, generator=gen), dim=-1)
    counts = [2, 3, 4, 2, 3, 2, 5]
    owners = torch.repeat_interleave(torch.arange(7), torch.tensor(counts))
    texts = torch.nn.functional.normalize(torch.randn(len(owners), 5, 8, generator=gen), dim=-1)
    mask = torch.arange(5)[None] < torch.randint(1, 6, (len(owners), 1), generator=gen)
    texts[3] = texts[2]
    mask[3] = mask[2]   # image 1's first negative equals its true caption: a tie, a miss
    got = own_image_scores(filip_similarity, images, texts, mask, owners, block=block)
    want = torch.stack([filip_similarity(images[o:o + 1], None, texts[t:t + 1], mask[t:t + 1])[0, 0]
                        for t, o in enumerate(owners.tolist())])
    torch.testing.assert_close(got, want.float(), atol=1e-6, rtol=0)
    metrics = late_interaction_metrics(filip_similarity, image_tokens=images, tasks=["selection", "retrieval"],
                                       text_tokens=texts, text_mask=mask, text_image_index=owners)
    first = np.r_[True, owners.numpy()[1:] != owners.numpy()[:-1]]
    groups = [want.double().numpy()[owners.numpy() == i] for i in range(7)]
    assert metrics["selection"]["acc"] == np.mean([all(g[1:] < g[0] - TIE_ATOL) for g in groups])
    only_true = late_interaction_metrics(filip_similarity, image_tokens=images, tasks=["retrieval"],
                                         text_tokens=texts[first], text_mask=mask[first],
                                         text_image_index=owners[first])
    assert metrics["retrieval"] == only_true["retrieval"]
