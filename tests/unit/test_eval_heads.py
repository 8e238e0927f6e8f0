"""Eval sets scored by image heads (`model.heads`): which heads score a set and in which order,
one-line refusals, and linear CKA against its definition."""

from __future__ import annotations

import pytest
import torch

from clipkit.errors import ClipkitConfigError
from clipkit.eval.metrics import linear_cka
from clipkit.eval.suite import EvalSetSpec, build_eval_specs, check_heads, set_heads


def spec(captions="short", heads=None):
    return EvalSetSpec("s", [], ["retrieval"], None, None, captions=captions, heads=heads)


def test_a_set_is_scored_by_every_head_its_levels_head_first():
    both = ("semantic", "perceptual")
    assert set_heads(spec(), both) == ["semantic", "perceptual"]
    assert set_heads(spec("long"), both) == ["perceptual", "semantic"]
    assert set_heads(spec("long"), ("semantic",)) == ["semantic"]        # one-head model: as before
    assert set_heads(spec("long", ["semantic"]), both) == ["semantic"]
    check_heads([spec(heads=["perceptual"])], both)
    with pytest.raises(ClipkitConfigError, match=r"eval.sets.s.heads names perceptual, which the model does not have "
                                                 r"\(its heads: semantic"):
        check_heads([spec(heads=["perceptual"])], ("semantic",))


def test_set_keys_are_checked(tmp_path):
    base = {"jsonl": str(tmp_path / "x.jsonl"), "tasks": ["retrieval"]}
    with pytest.raises(ClipkitConfigError, match="captions='medium' is not one of short, long"):
        build_eval_specs({"s": {**base, "captions": "medium"}})
    with pytest.raises(ClipkitConfigError, match="must list distinct image heads"):
        build_eval_specs({"s": {**base, "heads": ["semantic", "semantic"]}})


def hsic_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Kornblith et al.'s linear CKA through the n x n Gram matrices: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))
    with K = X X^T, L = Y Y^T and the centring matrix H."""
    n = len(x)
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l_ = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    return float((k * l_).sum() / ((k * k).sum() * (l_ * l_).sum()).sqrt())


def test_linear_cka_is_the_gram_matrix_definition():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=g, dtype=torch.float64)
    y = x @ torch.randn(8, 5, generator=g, dtype=torch.float64) + 0.5 * torch.randn(50, 5, generator=g, dtype=torch.float64)
    assert linear_cka(x, y) == pytest.approx(hsic_cka(x, y), rel=1e-12)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    assert linear_cka(x, 3.0 * x @ q + 1.0) == pytest.approx(1.0, rel=1e-12)   # rotation, scale, shift
    assert linear_cka(x.float(), torch.randn(50, 8, generator=g)) < 0.4


def test_one_pass_over_a_set_scores_each_head_as_it_alone_would(tmp_path):
    """The suite embeds a set once for all heads (packed side by side, split after): each head's
    metrics equal a run that scores the set with that head alone, and the CKA is that of the heads'
    own image embeddings."""
    import json

    import numpy as np
    from PIL import Image
    from test_model_heads import two_head_bundle

    from clipkit.eval.suite import EvalSuite
    from clipkit.objective import ContrastiveObjective

    rng = np.random.default_rng(0)
    rows = []
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "captions": [f"a picture number {i}", f"item {i % 3} drawn large"]})
    (tmp_path / "set.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    bundle = two_head_bundle()
    objective = ContrastiveObjective(bundle.model, None).eval()

    def run(heads):
        specs = build_eval_specs({"s": {"jsonl": str(tmp_path / "set.jsonl"), "tasks": ["retrieval"],
                                        "heads": heads}})
        suite = EvalSuite(specs, preprocess=bundle.preprocess_val, tokenizer=bundle.tokenizer, batch_size=4,
                          out_dir=None, model_name="x")
        return suite.run(objective, device="cpu")

    both, semantic, perceptual = run(["semantic", "perceptual"]), run(["semantic"]), run(["perceptual"])
    assert {k: v for k, v in both.items() if k.startswith("s/") and "cka" not in k} == semantic
    assert {k.replace("s@perceptual/", "s/"): v for k, v in both.items() if k.startswith("s@")} == perceptual
    specs = build_eval_specs({"s": {"jsonl": str(tmp_path / "set.jsonl"), "tasks": ["retrieval"]}})
    suite = EvalSuite(specs, preprocess=bundle.preprocess_val, tokenizer=bundle.tokenizer, batch_size=4,
                      out_dir=None, model_name="x")
    alone = {head: suite._heads_embedded(specs[0], objective, torch.device("cpu"), None, [head])[head].image_emb
             for head in ("semantic", "perceptual")}
    assert both["s/linear_cka_semantic_perceptual"] == pytest.approx(
        linear_cka(alone["semantic"], alone["perceptual"]), abs=1e-6)
    assert 0.0 < both["s/linear_cka_semantic_perceptual"] < 0.99
