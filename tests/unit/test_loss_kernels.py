"""Chunked CLIP/SigLIP autograd Functions against the plain block math: values and every gradient."""

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

from clipkit.kernels import chunked_clip_loss, chunked_siglip_loss
from clipkit.losses import ClipLoss, SigLipLoss
from clipkit.losses.functional import clip_loss_block, siglip_loss_block

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


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("b,d,scale", [(13, 33, 14.3), (5, 7, 100.0), (1, 3, 1.0)])
def test_clip_one_process_matches_block_math(b, d, scale, chunk):
    """Rows are the whole batch (the same tensors): the fused two-pass path."""
    img, txt = features(b, d)
    s = torch.tensor([scale], dtype=F64)
    c = chunk_of(chunk, b)
    got = value_and_grads(lambda i, t, s: chunked_clip_loss(i, t, i, t, s, 0, c), (img, txt, s))
    want = value_and_grads(lambda i, t, s: clip_loss_block(i, t, i, t, s, 0), (img, txt, s))
    assert_same(got, want)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("offset,rows", [(0, 4), (3, 5), (6, 5), (0, 11)])
def test_clip_block_matches_block_math(offset, rows, chunk):
    """One rank's rows against the gathered batch: separate gradients for rows and gathered tensors."""
    big_b, d = 11, 19
    img, txt = features(big_b, d, seed=1)
    s = torch.tensor(100.0, dtype=F64)
    c = chunk_of(chunk, rows)
    inputs = (img[offset:offset + rows], txt[offset:offset + rows], img, txt, s)
    got = value_and_grads(lambda *x: chunked_clip_loss(*x, offset, c), inputs)
    want = value_and_grads(lambda *x: clip_loss_block(*x, offset), inputs)
    assert_same(got, want)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("big_b,offset,rows", [(13, 0, 13), (11, 4, 5), (1, 0, 1)])
@pytest.mark.parametrize("scale,bias", [(10.0, -10.0), (100.0, -10.0), (1.0, 2.0)])
def test_siglip_matches_block_math(big_b, offset, rows, scale, bias, chunk):
    img, txt = features(big_b, 21, seed=2)
    s, bb = torch.tensor([scale], dtype=F64), torch.tensor(bias, dtype=F64)
    c = chunk_of(chunk, rows)
    inputs = (img[offset:offset + rows], txt, s, bb)
    got = value_and_grads(lambda *x: chunked_siglip_loss(*x, offset, c), inputs)
    want = value_and_grads(lambda *x: siglip_loss_block(*x, offset), inputs)
    assert_same(got, want)


def test_blocks_sum_to_one_process_loss_and_grads():
    """What ranks compute (block path) adds up to the fused single-process path."""
    img, txt = features(12, 10, seed=4)
    s = torch.tensor([30.0], dtype=F64)

    def blocks(i, t, s):
        return sum(chunked_clip_loss(i[o:o + 4], t[o:o + 4], i, t, s, o, 3) for o in (0, 4, 8))

    assert_same(value_and_grads(blocks, (img, txt, s)),
                value_and_grads(lambda i, t, s: chunked_clip_loss(i, t, i, t, s, 0, 5), (img, txt, s)))


@pytest.mark.parametrize("fused", [True, False])
def test_identical_features_give_ln_b(fused):
    b = 13
    img = F.normalize(torch.ones(b, 4, dtype=F64), dim=-1)
    other = img if fused else img.clone()
    loss = chunked_clip_loss(img, img, other, other, torch.tensor(100.0, dtype=F64), 0, 4)
    assert math.isclose(float(loss), math.log(b), rel_tol=1e-12)


@pytest.mark.parametrize("b,d", [(7, 33), (64, 64)])
def test_chunked_matches_open_clip(b, d):
    img, txt = features(b, d, seed=5)
    s, bb = torch.tensor(20.0, dtype=F64), torch.tensor(-10.0, dtype=F64)
    torch.testing.assert_close(chunked_clip_loss(img, txt, img, txt, s, 0, 5), OpenClipLoss()(img, txt, s),
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(chunked_siglip_loss(img, txt, s, bb, 0, 5), OpenSigLipLoss()(img, txt, s, bb),
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_fp32(dtype):
    """bf16/fp16 features: the loss is the fp64 loss of the rounded features to fp32 accuracy."""
    img, txt = features(37, 48, seed=6, dtype=dtype)
    s, bb = torch.tensor([50.0]), torch.tensor([-10.0])
    ref_clip = clip_loss_block(img.double(), txt.double(), img.double(), txt.double(), s.double(), 0)
    ref_sig = siglip_loss_block(img.double(), txt.double(), s.double(), bb.double(), 0)
    for fused in (True, False):
        i, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
        ia, ta = (i, t) if fused else (i.clone(), t.clone())
        loss = chunked_clip_loss(i, t, ia, ta, s, 0, 8)
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss.double(), ref_clip, rtol=1e-5, atol=0)
        loss.backward()
        assert i.grad.dtype == dtype and t.grad.dtype == dtype
    i = img.clone().requires_grad_()
    loss = chunked_siglip_loss(i, txt, s, bb, 0, 8)
    torch.testing.assert_close(loss.double(), ref_sig, rtol=1e-5, atol=0)
    loss.backward()
    assert i.grad.dtype == dtype


def test_without_grad_and_frozen_scale():
    img, txt = features(9, 5)
    s = torch.tensor([20.0], dtype=F64)
    want = clip_loss_block(img, txt, img, txt, s, 0)
    with torch.no_grad():
        torch.testing.assert_close(chunked_clip_loss(img, txt, img, txt, s, 0, 2), want)
        torch.testing.assert_close(chunked_clip_loss(img[2:5], txt[2:5], img, txt, s, 2, 2),
                                   clip_loss_block(img[2:5], txt[2:5], img, txt, s, 2))
    i = img.clone().requires_grad_()  # scale and the gathered tensors need no gradient
    chunked_clip_loss(i, txt, img, txt, s, 0, 4).backward()
    i_ref = img.clone().requires_grad_()
    clip_loss_block(i_ref, txt, img, txt, s, 0).backward()
    torch.testing.assert_close(i.grad, i_ref.grad)


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


def test_module_rejects_unknown_impl():
    with pytest.raises(ValueError, match="loss.impl='triton'"):
        ClipLoss(impl="triton")
    with pytest.raises(ValueError, match="chunk_size"):
        SigLipLoss(chunk_size=0)


MEMORY_CHILD = textwrap.dedent("""
    import json, resource, sys
    import torch
    import torch.nn.functional as F
    from clipkit.kernels import chunked_clip_loss
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
        loss = chunked_clip_loss(img, txt, img, txt, scale, 0, chunk)
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
        got_clip = chunked_clip_loss(img, txt, img, txt, s, 0, 5)
        got_block = chunked_clip_loss(img[:8], txt[:8], img, txt, s, 0, 5)
        got_sig = chunked_siglip_loss(img, txt, s, bb, 0, 5)
    torch.testing.assert_close(got_clip, clip_loss_block(img, txt, img, txt, s, 0))
    torch.testing.assert_close(got_block, clip_loss_block(img[:8], txt[:8], img, txt, s, 0))
    torch.testing.assert_close(got_sig, siglip_loss_block(img, txt, s, bb, 0))
