"""Loss math against open_clip's ClipLoss/SigLipLoss and the definitions, in float64."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss as OpenClipLoss
from open_clip.loss import SigLipLoss as OpenSigLipLoss

from clipkit.losses import ClipLoss, SigLipLoss
from clipkit.losses.functional import clip_loss, clip_loss_block, siglip_loss, siglip_loss_block


def features(b: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(img + 0.7 * torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
    return img, txt


@pytest.mark.parametrize("b,d,scale", [(7, 33, 14.3), (64, 64, 100.0), (1, 5, 1.0)])
def test_clip_loss_matches_open_clip(b, d, scale):
    img, txt = features(b, d)
    s = torch.tensor(scale, dtype=torch.float64)
    ours = clip_loss(img, txt, s)
    theirs = OpenClipLoss()(img, txt, s)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)


@pytest.mark.parametrize("b,d,scale,bias", [(7, 33, 10.0, -10.0), (64, 64, 100.0, -10.0), (5, 8, 1.0, 2.0)])
def test_siglip_loss_matches_open_clip(b, d, scale, bias):
    img, txt = features(b, d)
    s, bb = torch.tensor(scale, dtype=torch.float64), torch.tensor(bias, dtype=torch.float64)
    ours = siglip_loss(img, txt, s, bb)
    theirs = OpenSigLipLoss()(img, txt, s, bb)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)


def test_identical_features_give_ln_b():
    """All logits equal -> every softmax is uniform -> loss is exactly ln B."""
    b = 13
    img = F.normalize(torch.ones(b, 4, dtype=torch.float64), dim=-1)
    torch.testing.assert_close(clip_loss(img, img, torch.tensor(100.0, dtype=torch.float64)),
                               torch.tensor(math.log(b), dtype=torch.float64))


@pytest.mark.parametrize("splits", [[9], [4, 5], [3, 3, 3], [1, 2, 6]])
def test_blocks_sum_to_global_loss_and_grads(splits):
    """Row blocks (what ranks compute) add up to the global loss, values and every gradient."""
    img, txt = features(sum(splits), 17, seed=3)
    s = torch.tensor(20.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-5.0, dtype=torch.float64, requires_grad=True)

    def run(fn):
        i, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
        loss = fn(i, t)
        grads = torch.autograd.grad(loss, (i, t, s, bias), allow_unused=True)
        return loss, grads

    offsets = [sum(splits[:k]) for k in range(len(splits))]
    for full, block in [
        (lambda i, t: clip_loss(i, t, s) + 0 * bias,
         lambda i, t: sum(clip_loss_block(i[o:o + n], t[o:o + n], i, t, s, o) for o, n in zip(offsets, splits)) + 0 * bias),
        (lambda i, t: siglip_loss(i, t, s, bias),
         lambda i, t: sum(siglip_loss_block(i[o:o + n], t, s, bias, o) for o, n in zip(offsets, splits))),
    ]:
        (l_full, g_full), (l_block, g_block) = run(full), run(block)
        torch.testing.assert_close(l_block, l_full, rtol=1e-12, atol=0)
        for a, b in zip(g_block, g_full):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_published_inits_and_scalar_shapes():
    clip, sig = ClipLoss().temperature, SigLipLoss().temperature
    assert clip.logit_scale.shape == (1,) and sig.logit_scale.shape == (1,) and sig.logit_bias.shape == (1,)
    assert math.isclose(float(clip.scale()), 1 / 0.07, rel_tol=1e-6)
    assert math.isclose(float(sig.scale()), 10.0, rel_tol=1e-6) and float(sig.logit_bias) == -10.0


def test_temperature_starts_at_the_cap_when_init_is_above_it():
    loss = ClipLoss(init_logit_scale=500.0)
    assert math.isclose(float(loss.temperature.scale()), 100.0, rel_tol=1e-6)
    assert float(loss.temperature.logit_scale) == pytest.approx(math.log(100.0), rel=1e-7)


F32_LOG_100 = float(torch.tensor(math.log(100.0), dtype=torch.float32))  # 4.6051702499 > log 100


@pytest.mark.parametrize("impl", ["naive", "chunked"])
@pytest.mark.parametrize("raw_scale", [100.0, 150.0])
@pytest.mark.parametrize("loss_cls", [ClipLoss, SigLipLoss])
def test_capped_temperature_keeps_its_gradient(loss_cls, raw_scale, impl):
    """At the cap (float32 log 100 lies above log 100) and above it (a parameter stepped past the
    cap): the loss sees s = 100 and t gets ∂L/∂t of the unclamped loss at s = 100, not 0."""
    loss = loss_cls(impl=impl, init_logit_scale=100.0, chunk_size=4)
    with torch.no_grad():
        loss.temperature.logit_scale.fill_(math.log(raw_scale))
    img, txt = (x.float() for x in features(9, 8))
    value, metrics = loss(img, txt)
    value.backward()
    got = loss.temperature.logit_scale.grad
    assert float(loss.temperature.logit_scale) == F32_LOG_100  # forward clamped t itself
    assert math.isclose(float(metrics["logit_scale"]), 100.0, rel_tol=1e-6)

    t = torch.tensor([F32_LOG_100], requires_grad=True)  # no clamp anywhere
    if loss_cls is ClipLoss:
        clip_loss(img, txt, t.exp()).backward()
    else:
        siglip_loss(img, txt, t.exp(), loss.temperature.bias().detach()).backward()
    assert float(got) != 0.0
    torch.testing.assert_close(got, t.grad, rtol=1e-5, atol=0)


def test_temperature_leaves_the_cap_and_never_drifts_above_it():
    """SGD at the cap: a loss that wants a larger s cannot walk t past the cap (the next forward
    clamps it back); one that wants a smaller s takes it below 100 at once."""
    close = F.normalize(torch.ones(6, 6) + 0.25 * torch.eye(6), dim=-1)  # cos 0.99 between rows
    for img, txt, wants_larger in ((close, close, True), (close, close.roll(1, dims=0), False)):
        loss = ClipLoss(init_logit_scale=100.0, impl="chunked")
        opt = torch.optim.SGD(loss.parameters(), lr=0.1)
        loss(img, txt)[0].backward()
        opt.step()
        stepped = float(loss.temperature.logit_scale)
        assert (stepped > F32_LOG_100) == wants_larger
        _, metrics = loss(img, txt)
        assert float(loss.temperature.logit_scale) == min(stepped, F32_LOG_100)
        assert (float(metrics["logit_scale"]) < 99.0) == (not wants_larger)


def test_bf16_temperature_is_clamped_to_the_cap_rounded_up():
    """DeepSpeed's bf16 mode keeps t in bf16 (step 0.03); the in-place clamp rounds the cap up
    (4.625, not 4.59375 = log 98.9), so the value used is still exactly the cap."""
    temperature = ClipLoss(init_logit_scale=100.0).temperature.bfloat16()
    with torch.no_grad():
        temperature.logit_scale.fill_(5.0)
    scale, _ = temperature()
    assert float(temperature.logit_scale) == 4.625 and scale.dtype == torch.float32
    assert math.isclose(float(scale), 100.0, rel_tol=1e-6)


def test_module_single_process_equals_functional():
    img, txt = features(10, 12)
    clip = ClipLoss()
    value, metrics = clip(img.float(), txt.float())
    torch.testing.assert_close(value, clip_loss(img.float(), txt.float(), clip.temperature.scale()))
    assert math.isclose(float(metrics["logit_scale"]), 1 / 0.07, rel_tol=1e-6)
    sig = SigLipLoss()
    value, _ = sig(img.float(), txt.float())
    torch.testing.assert_close(value, siglip_loss(img.float(), txt.float(), *sig.temperature()))


@pytest.mark.parametrize("kwargs,message", [
    ({"exchange": "tree"}, "loss.exchange='tree' is not one of gather, ring"),
    ({"exchange": "ring", "impl": "naive"}, "loss.exchange=ring runs the fused losses"),
])
def test_siglip_exchange_is_checked_at_build(kwargs, message):
    from clipkit.errors import ClipkitConfigError

    with pytest.raises(ClipkitConfigError, match=message):
        SigLipLoss(**kwargs)
