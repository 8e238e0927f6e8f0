"""FILIP, CoCa and distillation losses against their definitions, in float64: values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipkit.kernels import filip_similarity as tiled_similarity
from clipkit.losses import CocaLoss, DistillLoss, FilipLoss
from clipkit.losses.functional import caption_loss, clip_loss, distill_kl_block, filip_similarity
from clipkit.losses.fused import fused_distill_kl

F64 = torch.float64


def tokens(n: int, length: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, length, d, generator=g, dtype=F64), dim=-1)


def text_mask(n: int, length: int, seed: int) -> torch.Tensor:
    """Each caption has 1..length real tokens, then padding."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (n,), generator=g)
    return torch.arange(length)[None, :] < lengths[:, None]


def grads(fn, leaves):
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    value = fn(*leaves)
    return value.detach(), torch.autograd.grad(value, leaves)


@pytest.mark.parametrize("block_elems", [1, 7, 100, 1 << 20])
@pytest.mark.parametrize("masked", [False, True])
def test_tiled_filip_similarity_matches_materialized(block_elems, masked):
    a, b = tokens(5, 4, 9, 0), tokens(7, 6, 9, 1)
    a_mask = text_mask(5, 4, 2) if masked else None
    b_mask = text_mask(7, 6, 3) if masked else None
    weight = torch.randn(5, 7, dtype=F64, generator=torch.Generator().manual_seed(4))

    def run(sim):
        return lambda x, y: (sim(x, y) * weight).sum()  # a non-uniform upstream gradient

    got = grads(run(lambda x, y: tiled_similarity(x, a_mask, y, b_mask, block_elems)), (a, b))
    want = grads(run(lambda x, y: filip_similarity(x, a_mask, y, b_mask)), (a, b))
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    for g_got, g_want in zip(got[1], want[1]):
        torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_filip_ignores_padded_tokens(impl):
    """Changing the features at padded positions changes neither the loss nor real tokens' grads,
    and padded positions get zero gradient."""
    img, txt = tokens(6, 5, 8, 0), tokens(6, 7, 8, 1)
    mask = text_mask(6, 7, 2)
    loss = FilipLoss(impl=impl, block_elems=50).double()
    noisy = torch.where(mask[:, :, None], txt, tokens(6, 7, 8, 9) * 3.0)
    (v1, (gi1, gt1)), (v2, (gi2, gt2)) = (
        grads(lambda i, t: loss(i, None, t, mask)[0], (img, t)) for t in (txt, noisy))
    torch.testing.assert_close(v1, v2, rtol=1e-13, atol=0)
    torch.testing.assert_close(gi1, gi2, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gt1[mask], gt2[mask], rtol=1e-12, atol=1e-14)
    assert float(gt1[~mask].abs().max()) == 0.0


@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_filip_ignores_padded_image_tokens_too(impl):
    """Both sides padded (e.g. TailDrop or variable-resolution patches): changed values at masked
    image and text positions change nothing, and masked positions get zero gradient."""
    img, txt = tokens(6, 5, 8, 0), tokens(6, 7, 8, 1)
    img_mask, txt_mask = text_mask(6, 5, 3), text_mask(6, 7, 2)
    loss = FilipLoss(impl=impl, block_elems=50).double()
    noisy_img = torch.where(img_mask[:, :, None], img, tokens(6, 5, 8, 8) * 3.0)
    noisy_txt = torch.where(txt_mask[:, :, None], txt, tokens(6, 7, 8, 9) * 3.0)
    (v1, (gi1, gt1)), (v2, (gi2, gt2)) = (
        grads(lambda i, t: loss(i, img_mask, t, txt_mask)[0], pair) for pair in ((img, txt), (noisy_img, noisy_txt)))
    torch.testing.assert_close(v1, v2, rtol=1e-13, atol=0)
    torch.testing.assert_close(gi1[img_mask], gi2[img_mask], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gt1[txt_mask], gt2[txt_mask], rtol=1e-12, atol=1e-14)
    assert float(gi1[~img_mask].abs().max()) == 0.0 and float(gt1[~txt_mask].abs().max()) == 0.0
    unmasked = grads(lambda i, t: loss(i, None, t, txt_mask)[0], (img, txt))[0]
    assert abs(float(unmasked - v1)) > 1e-6  # the image mask does take part


@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_filip_with_one_token_per_side_is_clip(impl):
    img, txt = tokens(9, 1, 16, 0), tokens(9, 1, 16, 1)
    loss = FilipLoss(impl=impl).double()
    got = grads(lambda i, t: loss(i, None, t, torch.ones(9, 1, dtype=torch.bool))[0], (img, txt))
    want = grads(lambda i, t: clip_loss(i[:, 0], t[:, 0], loss.temperature.scale()), (img, txt))
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=0)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_filip_directions_are_different_matrices():
    img, txt = tokens(4, 3, 8, 0), tokens(4, 5, 8, 1)
    i2t, t2i = filip_similarity(img, None, txt, None), filip_similarity(txt, None, img, None)
    assert not torch.allclose(i2t, t2i.T)


def test_filip_impls_agree_on_loss_and_temperature_grad():
    img, txt, mask = tokens(8, 4, 6, 0), tokens(8, 5, 6, 1), text_mask(8, 5, 2)
    results = []
    for impl in ("naive", "chunked"):
        loss = FilipLoss(impl=impl, block_elems=30).double()
        value, _ = loss(img, None, txt, mask)
        value.backward()
        results.append((value.detach(), loss.temperature.logit_scale.grad.clone()))
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=0)


def test_coca_loss_is_weighted_sum_with_pad_ignored():
    g = torch.Generator().manual_seed(0)
    img, txt = F.normalize(torch.randn(4, 8, generator=g), dim=-1), F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    logits = torch.randn(4, 6, 11, generator=g)
    labels = torch.randint(1, 11, (4, 6), generator=g)
    labels[:, 4:] = 0  # padding
    loss = CocaLoss(pad_id=0)
    value, metrics = loss(img, txt, logits, labels)
    real = labels != 0
    by_hand = -(logits.log_softmax(-1).gather(2, labels[..., None])[..., 0][real]).mean()
    torch.testing.assert_close(metrics["caption_loss"], by_hand)
    torch.testing.assert_close(value, clip_loss(img, txt, loss.temperature.scale()) + 2.0 * by_hand)
    # Padded positions' logits get no gradient.
    logits.requires_grad_()
    caption_loss(logits, labels, 0).backward()
    assert float(logits.grad[:, 4:].abs().max()) == 0.0


def distill_inputs(b=7, d=10, d_teacher=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    def unit(n, dim):
        return F.normalize(torch.randn(n, dim, generator=g, dtype=F64), dim=-1)
    return unit(b, d), unit(b, d), unit(b, d_teacher), unit(b, d_teacher)


@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
def test_fused_distill_kl_matches_materialized(chunk):
    img, txt, t_img, t_txt = distill_inputs()
    s, s_t = torch.tensor([20.0], dtype=F64), torch.tensor([50.0], dtype=F64)

    def naive(i, t, s):
        return (distill_kl_block(i, t, s, t_img, t_txt, s_t) + distill_kl_block(t, i, s, t_txt, t_img, s_t)) / 14

    got = grads(lambda i, t, s: fused_distill_kl(i, t, s, t_img, t_txt, s_t, chunk=chunk), (img, txt, s))
    want = grads(naive, (img, txt, s))
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-14)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_student_equal_to_teacher_has_zero_distill_term_and_gradient(impl):
    img, txt, _, _ = distill_inputs()
    loss = DistillLoss(impl=impl, init_logit_scale=30.0).double()
    i, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
    kl = loss.kl(i, t, img, txt, loss.temperature.scale().detach())
    gi, gt, gs = torch.autograd.grad(kl, (i, t, loss.temperature.logit_scale))
    assert abs(float(kl.detach())) < 1e-14
    for g in (gi, gt, gs):
        assert float(g.abs().max()) < 1e-13


def test_distill_loss_impls_agree():
    img, txt, t_img, t_txt = distill_inputs(seed=3)
    out = []
    for impl in ("naive", "chunked"):
        loss = DistillLoss(impl=impl, chunk_size=2, distill_weight=0.5).double()
        value, metrics = loss(img, txt, t_img, t_txt, torch.tensor([40.0], dtype=F64))
        value.backward()
        out.append((value.detach(), metrics["distill_kl"], loss.temperature.logit_scale.grad.clone()))
    torch.testing.assert_close(out[0], out[1], rtol=1e-10, atol=1e-14)
    assert float(out[0][1]) > 0


def test_token_reduction_keeps_the_most_similar_real_tokens():
    from clipkit.losses.filip import keep_top_tokens

    txt = tokens(2, 5, 4, 0)
    mask = torch.tensor([[True, True, True, False, False], [True, True, True, True, True]])
    img = txt[:, [1, 3]].clone()  # each image token equals a text token
    img[0, 1] = txt[0, 2]  # sample 0's image copies its real tokens 1 and 2
    kept, kept_mask = keep_top_tokens(txt, mask, img, None, 0.4)  # ceil(0.4 * 5) = 2 per caption
    assert kept.shape == (2, 2, 4) and kept_mask.all()
    torch.testing.assert_close(kept[0], txt[0, [1, 2]])  # exact matches (similarity 1) win, in order
    torch.testing.assert_close(kept[1], txt[1, [1, 3]])
    loss = FilipLoss(token_keep_ratio=0.4).double()
    value, _ = loss(img, None, txt, mask)
    assert torch.isfinite(value)
