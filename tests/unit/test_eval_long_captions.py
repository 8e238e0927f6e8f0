"""Long-caption retrieval: a set's own context_length and caption source, through the suite with
a real tiny open_clip model whose text tower is long enough, against a plain reference."""

import io
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds

from clipkit.errors import ClipkitConfigError
from clipkit.eval.cache import cache_path, load_embedded
from clipkit.eval.metrics import retrieval_metrics_exact
from clipkit.eval.suite import EvalSuite, build_eval_specs
from clipkit.eval.text_context import check_text_context, model_text_positions, set_tokenizer

POSITIONS = 64   # the tiny model's text context; CLIP's default tokenizer length would be 77
LONG = {"embed_dim": 32, "vision_cfg": {"image_size": 16, "patch_size": 8, "layers": 1, "width": 64, "head_width": 32},
        "text_cfg": {"context_length": POSITIONS, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
WORDS = ("a seven drawn with thick strokes slanted to the left small in the frame bright on a dark ground "
         "thin upright large centred dim curved straight loop tail top bottom").split()


@pytest.fixture(scope="module")
def long_model():
    from clipkit.models import build_model

    torch.manual_seed(0)
    return build_model("clipkit-test-long-context", config=LONG)


def long_captions(n: int, seed: int = 0) -> list[str]:
    """Captions of 44-52 words: longer than 40 tokens, shorter than 64."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(44, 53)))) + "." for _ in range(n)]


def write_long_set(root: Path, captions: list[str]) -> Path:
    """CLIP_benchmark retrieval layout; the long caption in the .json, a short one in txt."""
    rng = np.random.default_rng(1)
    (root / "test").mkdir(parents=True)
    with wds.TarWriter(str(root / "test" / "0.tar")) as writer:
        for i, caption in enumerate(captions):
            buf = io.BytesIO()
            PIL.Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
            writer.write({"__key__": f"{i:06d}", "png": buf.getvalue(), "txt": f"digit {i % 10}",
                          "json": {"long_caption": caption}})
    (root / "test" / "nshards.txt").write_text("1\n")
    (root / "dataset_type.txt").write_text("retrieval\n")
    return root


def reference_embeddings(bundle, root: Path, captions: list[str], context_length: int):
    """Plain open_clip: tokens at `context_length`, zero-padded to the model's positions, its own
    (untrimmed) encode_text; images through its encode_image. -> (images [N, D], texts [N, D])."""
    model = bundle.model.eval()
    images = [bundle.preprocess_val(PIL.Image.open(io.BytesIO(s["png"])).convert("RGB"))
              for s in wds.WebDataset(str(root / "test" / "0.tar"), shardshuffle=False)]
    tokens = bundle.tokenizer(captions, context_length=context_length)
    tokens = torch.cat([tokens, tokens.new_zeros(len(tokens), POSITIONS - context_length)], dim=1)
    with torch.no_grad():
        return (F.normalize(model.encode_image(torch.stack(images)), dim=-1),
                F.normalize(model.encode_text(tokens), dim=-1))


def test_long_caption_retrieval_at_the_sets_context_length(long_model, tmp_path: Path) -> None:
    from clipkit.objective import ContrastiveObjective

    captions = long_captions(9)
    assert min(len(long_model.tokenizer.encode(c)) for c in captions) + 2 > 40   # each is cut at 40 tokens
    root = write_long_set(tmp_path / "long", captions)
    spec, = build_eval_specs({"long": {"clip_benchmark": str(root), "caption_source": "json:long_caption",
                                       "context_length": 40}})
    assert spec.tasks == ["retrieval"] and spec.context_length == 40
    suite = EvalSuite([spec], preprocess=long_model.preprocess_val, tokenizer=long_model.tokenizer, batch_size=4,
                      out_dir=tmp_path / "out", model_name="tiny", cache_dir=tmp_path / "cache")
    metrics = suite.run(ContrastiveObjective(long_model.model.eval(), loss=None), device="cpu", tag="t")

    images, texts = reference_embeddings(long_model, root, captions, 40)
    got = load_embedded(cache_path(tmp_path / "cache", "tiny", "long", "t"))
    torch.testing.assert_close(got.image_emb, images, atol=2e-6, rtol=0)
    torch.testing.assert_close(got.text_emb, texts, atol=2e-6, rtol=0)   # the long captions, not the txt
    assert got.text_image_index.tolist() == list(range(9))
    want = retrieval_metrics_exact(texts.numpy(), images.numpy(), np.arange(9))
    assert metrics == {f"long/{k}": v for k, v in want.items()}
    for k in (1, 5, 10):
        assert f"long/image_retrieval_recall@{k}" in metrics and f"long/text_retrieval_recall@{k}" in metrics
    # The cut at 40 tokens is real: the model's full 64 tokens embed these captions differently.
    _, full = reference_embeddings(long_model, root, captions, POSITIONS)
    assert (full - texts).abs().max() > 1e-3


def test_set_tokenizer_pads_to_the_models_positions(long_model) -> None:
    short = ["a thin upright seven.", "a loop"]
    tokenize = set_tokenizer(long_model.tokenizer, 40, POSITIONS)
    assert torch.equal(tokenize(short), long_model.tokenizer(short))   # what fits in 40 tokens is unchanged
    long = long_captions(2)
    cut = tokenize(long)
    assert cut.shape == (2, POSITIONS) and (cut[:, 40:] == 0).all()
    assert torch.equal(cut[:, :40], long_model.tokenizer(long, context_length=40))
    assert set_tokenizer(long_model.tokenizer, None, POSITIONS) is long_model.tokenizer


def test_context_length_beyond_the_models_positions_is_one_line(long_model, tmp_path: Path) -> None:
    from clipkit.objective import ContrastiveObjective

    root = write_long_set(tmp_path / "long", long_captions(2))
    specs = build_eval_specs({"long": {"clip_benchmark": str(root), "caption_source": "json:long_caption",
                                       "context_length": 248}})
    objective = ContrastiveObjective(long_model.model.eval(), loss=None)
    assert model_text_positions(objective) == model_text_positions(long_model.model) == POSITIONS
    want = (r"^eval.sets.long.context_length=248 exceeds the model's text context of 64 positions; lower it or set "
            r"model.context_length=248$")
    with pytest.raises(ClipkitConfigError, match=want) as err:
        check_text_context(specs, long_model.model)
    assert "\n" not in str(err.value)
    suite = EvalSuite(specs, preprocess=long_model.preprocess_val, tokenizer=long_model.tokenizer, batch_size=4,
                      out_dir=None, model_name="tiny")
    with pytest.raises(ClipkitConfigError, match=want):
        suite.run(objective, device="cpu")
