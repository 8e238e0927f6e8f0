"""Trimmed text encoding (`encode_text_pooled`) is exact: a causal CLIP text tower run only up to
the batch's last real token gives open_clip's `encode_text` output and gradients."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir

from clipkit.config import CONF_DIR
from clipkit.losses import ClipLoss
from clipkit.models.outputs import encode_text_pooled, trimmable_text_length
from clipkit.objective import ContrastiveObjective
from clipkit.recipe import build_towers

# The tiny towers' context is 16 positions; these take 3 to 7 of them.
CAPTIONS = ["a photo of the digit 3", "7", "zero", "the number five"]


def tiny_bundle(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["model=tiny_vit", *overrides]).model
    torch.manual_seed(0)
    return build_towers(cfg)


def _values_and_grads(model, fn, tokens):
    model.zero_grad()
    out = fn(model, tokens)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out * weights).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("captions", [CAPTIONS, CAPTIONS[1:3]])
def test_trimmed_text_matches_open_clip_values_and_gradients_in_float64(captions):
    bundle = tiny_bundle()
    model = bundle.model.double()
    tokens = bundle.tokenizer(captions)
    length = trimmable_text_length(model, tokens)
    assert length == int((tokens != 0).sum(1).max()) < tokens.shape[1]   # up to the last real token
    assert trimmable_text_length(model, tokens, multiple=8) == 8
    want, want_grads = _values_and_grads(model, lambda m, t: m.encode_text(t), tokens)
    got, got_grads = _values_and_grads(model, encode_text_pooled, tokens)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-10, atol=1e-12, msg=name)


def test_the_objective_uses_it_and_fp32_agrees_with_open_clip():
    bundle = tiny_bundle()
    objective = ContrastiveObjective(bundle.model, ClipLoss())
    tokens = bundle.tokenizer(CAPTIONS)
    seen = []
    hook = bundle.model.transformer.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[1]))
    got = objective.encode_text(tokens)
    hook.remove()
    assert seen == [trimmable_text_length(bundle.model, tokens)] and seen[0] < tokens.shape[1]
    want = torch.nn.functional.normalize(bundle.model.encode_text(tokens), dim=-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_no_trim_where_it_would_not_be_exact_or_shorten_nothing():
    bundle = tiny_bundle()
    model, tokens = bundle.model, bundle.tokenizer(CAPTIONS)
    full = torch.ones_like(tokens)   # every position is a real token
    assert trimmable_text_length(model, full) is None
    model.text_pool_type = "last"   # the pooled position is the last one: every position matters
    assert trimmable_text_length(model, tokens) is None
    model.text_pool_type = "argmax"
    model.attn_mask = None          # bidirectional attention: pads feed the real tokens
    assert trimmable_text_length(model, tokens) is None
    assert torch.equal(encode_text_pooled(model, tokens), model.encode_text(tokens))
