"""Chunked block primitives and the fused CLIP/SigLIP losses against the plain math: values and every gradient."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss as OpenClipLoss
from open_clip.loss import SigLipLoss as OpenSigLipLoss

from clipkit import kernels
from clipkit.losses import ClipLoss, SigLipLoss
from clipkit.losses.functional import clip_loss, siglip_loss
from clipkit.losses.fused import fused_clip_loss, fused_siglip_loss

F64 = torch.float64
CHUNKS = [1, 3, 7, "B", "B+5"]


def features(b: int, d: int, seed: int = 0, dtype=F64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, d, generator=g, dtype=F64), dim=-1)
    txt = F.normalize(img + 0.7 * torch.randn(b, d, generator=g, dtype=F64), dim=-1)
    return img.to(dtype), txt.to(dtype)


def chunk_of(spec, b: int) -> int:
    return {"B": b, "B+5": b + 5}.get(spec, spec)


def value_and_grads(fn, tensors):
    """fn(*leaves) and d fn / d leaf for each leaf (fresh leaves so gradients stay separate)."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    value = fn(*leaves)
    return value.detach(), torch.autograd.grad(value, leaves)


def assert_same(got, want, rtol=1e-10, atol=1e-12):
    (v_got, g_got), (v_want, g_want) = got, want
    torch.testing.assert_close(v_got, v_want, rtol=rtol, atol=atol)
    for a, b in zip(g_got, g_want):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def reference_block(q, k, s, offset, bias=None):
    """Materialized float64 statistics and gradients of one block, straight from the definitions."""
    logits = s * q @ k.T + (0.0 if bias is None else bias)
    rows = torch.arange(q.shape[0])
    onehot = torch.zeros_like(logits)
    onehot[rows, rows + offset] = 1.0
    return logits, onehot


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("big_b,offset,rows,d", [(13, 0, 13, 33), (11, 3, 5, 19), (11, 6, 5, 7), (1, 0, 1, 3)])
def test_infonce_primitives_match_definitions(big_b, offset, rows, d, chunk):
    img, txt = features(big_b, d, seed=1)
    q, s = img[offset:offset + rows], torch.tensor([100.0], dtype=F64)
    c = chunk_of(chunk, rows)
    logits, onehot = reference_block(q, txt, s, offset)
    row_lse, col_ref, col_sum, positives = kernels.infonce_block_stats(q, txt, s, offset, c)
    torch.testing.assert_close(row_lse, logits.logsumexp(1), rtol=1e-12, atol=1e-12)
    assert (col_ref >= logits.amax(0) - 1e-12).all() and (col_sum >= math.exp(-50)).all()
    torch.testing.assert_close(col_ref + col_sum.log(), logits.logsumexp(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(positives, (logits * onehot).sum(), rtol=1e-12, atol=1e-12)
    # Any column normalizer works for the contract; use one that is not the block's own.
    col_lse = logits.logsumexp(0) + 0.25
    g = (logits - row_lse[:, None]).exp() + (logits - col_lse[None, :]).exp() - 2 * onehot
    dq, dk = kernels.infonce_block_grads(q, txt, s, offset, row_lse, col_lse, c)
    torch.testing.assert_close(dq, g @ txt, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dk, g.T @ q, rtol=1e-10, atol=1e-12)
    assert kernels.infonce_block_grads(q, txt, s, offset, row_lse, col_lse, c, need_q=False, need_k=False) == (None, None)


@pytest.mark.parametrize("chunk", [2, 8])
def test_infonce_stats_columns_far_below_the_chunk_max_stay_exact_in_float32(chunk):
    """The stats pass sums columns against the chunk's largest logit; a column ~200 below it
    (s = 100, opposite features) would underflow there and must be recomputed exactly."""
    d = 6
    basis = torch.eye(d, dtype=F64)
    # Row 0 meets column 0 at +100; every row meets column 1 at -100 or near it; the rest mixed.
    q = F.normalize(torch.stack([basis[0], basis[0] + 0.1 * basis[2], basis[0] - 0.1 * basis[3],
                                 basis[0] + 0.3 * basis[4], basis[0] + 0.05 * basis[5],
                                 basis[2] + basis[0] * 2]), dim=-1)
    k = F.normalize(torch.stack([basis[0], -basis[0], basis[2], basis[3] + basis[4], basis[5], -basis[0] + basis[1]]),
                    dim=-1)
    s = torch.tensor([100.0], dtype=F64)
    logits = s * q @ k.T
    assert (logits.amax() - logits[:, 1].amax()) > 150  # the case this test is for
    row_lse, col_ref, col_sum, positives = kernels.infonce_block_stats(q.float(), k.float(), s.float(), 0, chunk)
    torch.testing.assert_close(row_lse.double(), logits.logsumexp(1), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close((col_ref + col_sum.log()).double(), logits.logsumexp(0), rtol=1e-6, atol=1e-5)
    assert (col_sum >= math.exp(-50)).all()
    # And the loss and gradients through the fused path, float32 against float64.
    want = value_and_grads(lambda i, t: clip_loss(i, t, s), (q, k))
    got = value_and_grads(lambda i, t: fused_clip_loss(i, t, s.float(), chunk=chunk), (q.float(), k.float()))
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("big_b,offset,rows", [(13, 0, 13), (11, 4, 5), (1, 0, 1)])
@pytest.mark.parametrize("scale,bias", [(10.0, -10.0), (100.0, -10.0), (1.0, 2.0)])
def test_sigmoid_primitive_matches_definition(big_b, offset, rows, scale, bias, chunk):
    img, txt = features(big_b, 21, seed=2)
    q, s, bb = img[offset:offset + rows], torch.tensor([scale], dtype=F64), torch.tensor(bias, dtype=F64)
    logits, onehot = reference_block(q, txt, s, offset, bb)
    y = 2 * onehot - 1
    total, dq, dk, grad_sum = kernels.sigmoid_block(q, txt, s, bb, offset, chunk_of(chunk, rows))
    g = logits.sigmoid() - onehot
    # 1e-10: softplus returns x itself past 20, off by log1p(e^-x) < 2e-9 per pair.
    torch.testing.assert_close(total, -F.logsigmoid(y * logits).sum(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dq, g @ txt, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dk, g.T @ q, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_sum, g.sum(), rtol=1e-10, atol=1e-12)
    assert kernels.sigmoid_block(q, txt, s, bb, offset, 3, need_grads=False)[1:] == (None, None, None)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_sigmoid_primitive_without_positives(chunk):
    """row_offset=None (another rank's texts in SigLIP's ring): every pair is a negative."""
    img, txt = features(11, 21, seed=5)
    q, s, bb = img[:7], torch.tensor([10.0], dtype=F64), torch.tensor(-10.0, dtype=F64)
    logits = s * q @ txt.T + bb
    total, dq, dk, grad_sum = kernels.sigmoid_block(q, txt, s, bb, None, chunk_of(chunk, 7))
    g = logits.sigmoid()
    torch.testing.assert_close(total, F.softplus(logits).sum(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dq, g @ txt, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dk, g.T @ q, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_sum, g.sum(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("b,d,scale", [(13, 33, 14.3), (5, 7, 100.0), (1, 3, 1.0)])
def test_fused_clip_one_process_matches_reference(b, d, scale, chunk):
    img, txt = features(b, d)
    s = torch.tensor([scale], dtype=F64)
    c = chunk_of(chunk, b)
    got = value_and_grads(lambda i, t, s: fused_clip_loss(i, t, s, chunk=c), (img, txt, s))
    want = value_and_grads(clip_loss, (img, txt, s))
    assert_same(got, want)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("b,scale,bias", [(13, 10.0, -10.0), (6, 100.0, -10.0), (1, 1.0, 2.0)])
def test_fused_siglip_one_process_matches_reference(b, scale, bias, chunk):
    img, txt = features(b, 21, seed=2)
    s, bb = torch.tensor([scale], dtype=F64), torch.tensor(bias, dtype=F64)
    got = value_and_grads(lambda *x: fused_siglip_loss(*x, chunk=chunk_of(chunk, b)), (img, txt, s, bb))
    want = value_and_grads(siglip_loss, (img, txt, s, bb))
    assert_same(got, want)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("b,d,scale", [(13, 33, 14.3), (5, 7, 100.0)])
def test_fused_clip_triton_matches_reference_in_float64(b, d, scale, chunk, monkeypatch):
    """The shipped `impl="triton"` path (kernels under TRITON_INTERPRET=1), every gradient."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    img, txt = features(b, d, seed=5)
    s = torch.tensor([scale], dtype=F64)
    got = value_and_grads(lambda i, t, s: fused_clip_loss(i, t, s, impl="triton", chunk=chunk_of(chunk, b)),
                          (img, txt, s))
    assert_same(got, value_and_grads(clip_loss, (img, txt, s)))


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("b,scale,bias", [(13, 10.0, -10.0), (6, 100.0, -10.0)])
def test_fused_siglip_triton_matches_reference_in_float64(b, scale, bias, chunk, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    img, txt = features(b, 21, seed=6)
    s, bb = torch.tensor([scale], dtype=F64), torch.tensor(bias, dtype=F64)
    got = value_and_grads(lambda *x: fused_siglip_loss(*x, impl="triton", chunk=chunk_of(chunk, b)),
                          (img, txt, s, bb))
    assert_same(got, value_and_grads(siglip_loss, (img, txt, s, bb)))


def far_logits(case: str) -> tuple[torch.Tensor, ...]:
    """(image [B, D], text [B, D], s [1], β) in float64 with every logit l beyond ±50.

    b1: B = 1, l = 71.7 (loss softplus(−71.7) = 6.9e-32). tiny: positives at +100, negatives
    at −100 or −300, so every term is below 1e-43 (a sum over all pairs that then swaps the
    positives' terms returns 0). large: positives at −100, negatives at +100 (loss 100 a pair).
    """
    eye = torch.eye(4, dtype=F64)
    image, text, scale, bias = {
        "b1": (eye[:1], eye[:1], 100.0, -28.3),
        "tiny": (torch.stack([eye[0], eye[1], eye[2], -eye[0]]), torch.stack([eye[0], eye[1], eye[2], -eye[0]]),
                 200.0, -100.0),
        "large": (eye[:3], -eye[:3], 200.0, 100.0),
    }[case]
    return image, text, torch.tensor([scale], dtype=F64), torch.tensor(bias, dtype=F64)


@pytest.mark.parametrize("impl", ["chunked", "triton"])
@pytest.mark.parametrize("chunk", [1, "B"])
@pytest.mark.parametrize("case", ["b1", "tiny", "large"])
def test_fused_siglip_logits_beyond_50_match_reference_in_float64(case, chunk, impl, monkeypatch):
    """Far-out logits: each pair's term and gradient computed directly, none lost to a cancellation."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    tensors = far_logits(case)
    logits = tensors[2] * tensors[0] @ tensors[1].T + tensors[3]
    assert logits.abs().min() > 50
    c = chunk_of(chunk, tensors[0].shape[0])
    got = value_and_grads(lambda *x: fused_siglip_loss(*x, impl=impl, chunk=c), tensors)
    want = value_and_grads(siglip_loss, tensors)
    assert float(want[0]) > 0 and all((g != 0).any() for g in want[1])  # the case is not vacuous
    assert_same(got, want, rtol=1e-12, atol=0)


def test_rank_blocks_merge_to_the_global_loss_and_grads():
    """The merge `clipkit.losses.fused` does across ranks, done by hand over 3 blocks:
    max-then-rescaled-sum column statistics, per-block grads, dk summed over blocks."""
    img, txt = features(12, 10, seed=4)
    s = torch.tensor([30.0], dtype=F64)
    blocks = [(o, img[o:o + 4]) for o in (0, 4, 8)]
    stats = [kernels.infonce_block_stats(q, txt, s, o, 3) for o, q in blocks]
    col_max = torch.stack([st[1] for st in stats]).amax(0)
    col_lse = col_max + sum(st[2] * (st[1] - col_max).exp() for st in stats).log()
    value = (sum(st[0].sum() - 2 * st[3] for st in stats) + col_lse.sum()) / 24
    grads = [kernels.infonce_block_grads(q, txt, s, o, st[0], col_lse, 3) for (o, q), st in zip(blocks, stats)]
    d_img = torch.cat([dq for dq, _ in grads]) * s / 24
    d_txt = sum(dk for _, dk in grads) * s / 24
    want_value, (want_img, want_txt, _) = value_and_grads(clip_loss, (img, txt, s))
    torch.testing.assert_close(value, want_value, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d_img, want_img, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(d_txt, want_txt, rtol=1e-10, atol=1e-12)


def test_identical_features_give_ln_b():
    b = 13
    img = F.normalize(torch.ones(b, 4, dtype=F64), dim=-1)
    loss = fused_clip_loss(img, img.clone(), torch.tensor(100.0, dtype=F64), chunk=4)
    assert math.isclose(float(loss), math.log(b), rel_tol=1e-12)


@pytest.mark.parametrize("b,d,scale", [(7, 33, 20.0), (64, 64, 100.0)])
def test_fused_matches_open_clip(b, d, scale):
    """Values and every gradient (features, scale, bias) against open_clip's own losses, float64."""
    img, txt = features(b, d, seed=5)
    s, bb = torch.tensor(scale, dtype=F64), torch.tensor(-10.0, dtype=F64)
    got = value_and_grads(lambda i, t, s: fused_clip_loss(i, t, s, chunk=5), (img, txt, s))
    want = value_and_grads(lambda i, t, s: OpenClipLoss()(i, t, s), (img, txt, s))
    assert_same(got, want, rtol=1e-6, atol=1e-12)
    got = value_and_grads(lambda *x: fused_siglip_loss(*x, chunk=5), (img, txt, s, bb))
    want = value_and_grads(lambda *x: OpenSigLipLoss()(*x), (img, txt, s, bb))
    assert_same(got, want, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_fp32(dtype):
    """bf16/fp16 features: the loss is the fp64 loss of the rounded features to fp32 accuracy."""
    img, txt = features(37, 48, seed=6, dtype=dtype)
    s, bb = torch.tensor([50.0]), torch.tensor([-10.0])
    ref_clip = clip_loss(img.double(), txt.double(), s.double())
    ref_sig = siglip_loss(img.double(), txt.double(), s.double(), bb.double())
    for fn, ref in ((lambda i, t: fused_clip_loss(i, t, s, chunk=8), ref_clip),
                    (lambda i, t: fused_siglip_loss(i, t, s, bb, chunk=8), ref_sig)):
        i, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
        loss = fn(i, t)
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)
        loss.backward()
        assert i.grad.dtype == dtype and t.grad.dtype == dtype


def test_without_grad_and_frozen_scale():
    img, txt = features(9, 5)
    s = torch.tensor([20.0], dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(fused_clip_loss(img, txt, s, chunk=2), clip_loss(img, txt, s))
    i = img.clone().requires_grad_()  # neither the scale nor the text needs a gradient
    fused_clip_loss(i, txt, s, chunk=4).backward()
    i_ref = img.clone().requires_grad_()
    clip_loss(i_ref, txt, s).backward()
    torch.testing.assert_close(i.grad, i_ref.grad)
    bb = torch.tensor(-3.0, dtype=F64, requires_grad=True)  # only the bias learns
    fused_siglip_loss(img, txt, s, bb, chunk=4).backward()
    bb_ref = bb.detach().clone().requires_grad_()
    siglip_loss(img, txt, s, bb_ref).backward()
    torch.testing.assert_close(bb.grad, bb_ref.grad)


@pytest.mark.parametrize("loss_cls", [ClipLoss, SigLipLoss])
def test_module_impls_agree(loss_cls):
    img, txt = features(10, 12)
    results = []
    for impl in ("naive", "chunked", "auto"):
        module = loss_cls(impl=impl, chunk_size=3)
        i, t = img.float().requires_grad_(), txt.float().requires_grad_()
        value, _ = module(i, t)
        value.backward()
        results.append((value.detach(), i.grad, t.grad, [p.grad for p in module.parameters()]))
    for other in results[1:]:
        torch.testing.assert_close(other[:3], results[0][:3])
        torch.testing.assert_close(other[3], results[0][3])


@pytest.mark.parametrize("loss_cls", [ClipLoss, SigLipLoss])
def test_triton_impl_through_the_loss_module_matches_naive(loss_cls, monkeypatch):
    """`loss.impl=triton` runs the Triton kernels (here under TRITON_INTERPRET=1 on CPU)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    img, txt = features(19, 24, seed=11)
    results = []
    for impl in ("naive", "triton"):
        module = loss_cls(impl=impl)
        i, t = img.float().requires_grad_(), txt.float().requires_grad_()
        value, _ = module(i, t)
        value.backward()
        results.append((value.detach(), i.grad, t.grad, [p.grad for p in module.parameters()]))
    torch.testing.assert_close(results[1][:3], results[0][:3], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[1][3], results[0][3], rtol=1e-5, atol=1e-6)


def test_triton_impl_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    img, txt = features(4, 8)
    with pytest.raises(RuntimeError, match="loss.impl=triton needs a CUDA device"):
        ClipLoss(impl="triton")(img.float(), txt.float())
    value, _ = ClipLoss(impl="auto")(img.float(), txt.float())  # auto falls back to chunked on CPU
    assert torch.isfinite(value)


def test_module_rejects_unknown_impl():
    with pytest.raises(ValueError, match="loss.impl='cuda'"):
        ClipLoss(impl="cuda")
    with pytest.raises(ValueError, match="chunk_size"):
        SigLipLoss(chunk_size=0)


def test_auto_chunk_holds_a_fixed_logit_budget():
    """`chunk=None` (loss.chunk_size=auto): rows × B stays at CHUNK_ELEMS as B grows, down to
    MIN_CHUNK_ROWS rows; an explicit chunk is taken as it is."""
    from clipkit.kernels.chunked_contrastive import CHUNK_ELEMS, MIN_CHUNK_ROWS, chunk_rows

    assert chunk_rows(None, 16384) == 512 and CHUNK_ELEMS == 512 * 16384
    for big_b in (4096, 8192, 32768, 65536):
        assert chunk_rows(None, big_b) * big_b == CHUNK_ELEMS
    assert chunk_rows(None, 1 << 20) == MIN_CHUNK_ROWS
    assert chunk_rows(3, 1 << 20) == 3
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        chunk_rows(0, 10)


@pytest.mark.parametrize("loss_cls", [ClipLoss, SigLipLoss])
def test_default_chunk_splits_rows_by_the_budget_and_matches_naive(loss_cls, monkeypatch):
    """The shipped default (chunk_size auto) with a budget shrunk to 3 rows × B: several chunks,
    the same values and gradients as the materialized reference."""
    from clipkit.kernels import chunked_contrastive

    img, txt = features(11, 12, seed=9)
    monkeypatch.setattr(chunked_contrastive, "CHUNK_ELEMS", 3 * 11)
    monkeypatch.setattr(chunked_contrastive, "MIN_CHUNK_ROWS", 1)
    seen = []
    real_chunks = chunked_contrastive._chunks
    monkeypatch.setattr(chunked_contrastive, "_chunks", lambda *a: seen.append(list(real_chunks(*a))) or seen[-1])
    results = []
    for impl in ("naive", "chunked"):
        module = loss_cls(impl=impl).double()
        assert module.chunk is None
        i, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
        value, _ = module(i, t)
        value.backward()
        results.append((value.detach(), i.grad, t.grad, [p.grad for p in module.parameters()]))
    assert seen and all(ranges[0] == (0, 3) and len(ranges) == 4 for ranges in seen)
    torch.testing.assert_close(results[1], results[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("value", [0, -4, "abc", "512", 1.5, True, None])
def test_bad_chunk_size_is_a_one_line_config_error(value):
    from clipkit.errors import ClipkitConfigError

    for loss_cls in (ClipLoss, SigLipLoss):
        with pytest.raises(ClipkitConfigError, match=r"^loss.chunk_size must be auto or an integer >= 1, got "):
            loss_cls(chunk_size=value)


@pytest.mark.parametrize("override", ["loss.chunk_size=0", "loss.chunk_size=abc"])
@pytest.mark.parametrize("loss_name", ["clip", "siglip", "coca", "distill"])
def test_bad_chunk_size_override_fails_at_build(loss_name, override):
    """Through Hydra and `recipe.build_loss`: the constructor's error, not Hydra's wrapper."""
    from types import SimpleNamespace

    from hydra import compose, initialize_config_dir

    from clipkit.config import CONF_DIR
    from clipkit.errors import ClipkitConfigError
    from clipkit.recipe import build_loss

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        shipped = compose("train", overrides=[f"loss={loss_name}"]).loss.chunk_size
        cfg = compose("train", overrides=[f"loss={loss_name}", override])
    assert shipped == "auto"
    bundle = SimpleNamespace(pretrained_logit_scale=None, pretrained_logit_bias=None)
    with pytest.raises(ClipkitConfigError, match="loss.chunk_size must be auto or an integer >= 1") as err:
        build_loss(cfg.loss, bundle)
    assert "\n" not in str(err.value)



MEMORY_CHILD = textwrap.dedent("""
    import json, resource, sys
    import torch
    import torch.nn.functional as F
    from clipkit.losses.fused import fused_clip_loss
    from clipkit.losses.functional import clip_loss_block

    impl, big_b, dim, chunk = sys.argv[1], *map(int, sys.argv[2:])
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(big_b, dim, generator=g), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(big_b, dim, generator=g), dim=-1).requires_grad_()
    scale = torch.tensor([14.3], requires_grad=True)
    def status_kib(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    # Reset the kernel's peak-RSS mark so the imports' transient peak cannot hide the loss's.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base_kib, peak_field = status_kib("VmRSS"), "VmHWM"
    except OSError:
        base_kib, peak_field = max(status_kib("VmRSS"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss), None
    if impl == "chunked":
        loss = fused_clip_loss(img, txt, scale, chunk=chunk)
    else:
        loss = clip_loss_block(img, txt, img, txt, scale, 0)
    loss.backward()
    peak_kib = status_kib(peak_field) if peak_field else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"delta_mb": (peak_kib - base_kib) / 1024, "loss": float(loss)}))
""")


# A fixed mmap threshold stops glibc from raising it to 32 MB after the first large free and
# then keeping freed (chunk × B) blocks in a fragmented heap: RSS then tracks live tensors.
MALLOC_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def test_chunked_memory_is_linear_in_batch_at_8192():
    """B=8192, D=512, fp32, fwd+bwd, each path in a fresh process (peak RSS growth).

    One 8192² fp32 matrix is 268 MB and the naive path holds several (logits both ways,
    their softmax and gradients). The chunked path holds a few (chunk × B) blocks
    (512 × 8192 × 4 B = 16.8 MB each) plus [B, D] gradients (16.8 MB each).
    """
    big_b, dim, chunk = 8192, 512, 512
    deltas = {}
    for impl in ("chunked", "naive"):
        out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, impl, str(big_b), str(dim), str(chunk)],
                             check=True, capture_output=True, text=True, timeout=300, env=MALLOC_ENV)
        deltas[impl] = json.loads(out.stdout.strip().splitlines()[-1])
    chunked, naive = deltas["chunked"]["delta_mb"], deltas["naive"]["delta_mb"]
    assert math.isclose(deltas["chunked"]["loss"], deltas["naive"]["loss"], rel_tol=1e-5)
    block_mb, rows_mb = chunk * big_b * 4 / 2**20, big_b * dim * 4 / 2**20
    # O(B·chunk + B·D): at most 8 blocks and 6 [B, D] tensors of headroom.
    assert chunked < 8 * block_mb + 6 * rows_mb, deltas
    # The naive path must hold at least two full B×B fp32 matrices at once.
    assert naive > 2 * big_b * big_b * 4 / 2**20, deltas
    assert chunked < naive / 8, deltas  # measured here: about 97 MB against 1,070 MB


def test_outer_autocast_keeps_fp32_logits():
    """Under a bf16 autocast the kernels still form fp32 logits (values match fp32 math)."""
    img, txt = features(24, 16, seed=8, dtype=torch.float32)
    s, bb = torch.tensor([100.0]), torch.tensor([-10.0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_clip = fused_clip_loss(img, txt, s, chunk=5)
        got_sig = fused_siglip_loss(img, txt, s, bb, chunk=5)
    torch.testing.assert_close(got_clip, clip_loss(img, txt, s))
    torch.testing.assert_close(got_sig, siglip_loss(img, txt, s, bb))
