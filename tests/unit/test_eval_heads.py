"""Eval sets scored by image heads (`model.heads`): which heads score a set and in which order,
one-line refusals, and linear CKA against its definition."""

from __future__ import annotations

import pytest
import torch

from clipkit.errors import ClipkitConfigError
from clipkit.eval.suite import EvalSetSpec, build_eval_specs, check_heads, linear_cka, set_heads


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
