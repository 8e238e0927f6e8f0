"""Several texts per image: the float64 references against a loop written from the formulas, their
block shares, K = 1 against CLIP/SigLIP, the owner-indexed chunked kernels against their definitions,
the fused losses against the references (values and every gradient), and MultiTextLoss's config."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from clipkit.errors import ClipkitConfigError
from clipkit.kernels import chunked_contrastive as kernels
from clipkit.losses import MultiTextLoss
from clipkit.losses import functional as ref
from clipkit.losses.fused import fused_clip_loss, fused_siglip_loss, multi_positive_clip_loss, multi_positive_siglip_loss

F64 = torch.float64
CHUNKS = [1, 3, 7, "B", "B+5"]
SCOPES = [None, "all", "own"]
CONF_LOSS = __import__("pathlib").Path(__file__).resolve().parents[2] / "conf" / "loss"


def batch(big_b: int, k: int, kn: int, d: int, seed: int = 0, dtype=F64, empty_image: int | None = 1):
    """Features and masks with invalid slots; image `empty_image` has no valid positive."""
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(big_b, d, generator=g, dtype=F64), dim=-1)
    text = F.normalize(image[:, None, :] + 0.8 * torch.randn(big_b, k, d, generator=g, dtype=F64), dim=-1)
    negatives = F.normalize(image[:, None, :] + torch.randn(big_b, kn, d, generator=g, dtype=F64), dim=-1)
    valid = torch.rand(big_b, k, generator=g) < 0.7
    valid[0] = True
    if empty_image is not None and empty_image < big_b and big_b > 1:
        valid[empty_image] = False
    negatives_valid = torch.rand(big_b, kn, generator=g) < 0.6
    return image.to(dtype), text.to(dtype), valid, negatives.to(dtype), negatives_valid


def loop_clip(image, text, valid, s, negatives=None, negatives_valid=None, scope="all"):
    """Multi-positive InfoNCE with Python loops, term by term from the docstring's formula."""
    big_b, k, _ = text.shape
    cols = [(n, j, text[n, j]) for n in range(big_b) for j in range(k) if valid[n, j]]
    negs = [] if negatives is None else [(n, negatives[n, j]) for n in range(big_b)
                                         for j in range(negatives.shape[1]) if negatives_valid[n, j]]
    img_terms, txt_terms = [], []
    for i in range(big_b):
        pos = [s * image[i] @ t for n, _, t in cols if n == i]
        if not pos:
            continue
        row = [s * image[i] @ t for _, _, t in cols] + [s * image[i] @ t for n, t in negs if scope == "all" or n == i]
        lse = torch.logsumexp(torch.stack(row), 0)
        img_terms.append(-sum(p - lse for p in pos) / len(pos))
    for n, _, t in cols:
        column = torch.stack([s * image[m] @ t for m in range(big_b)])
        txt_terms.append(-(column[n] - torch.logsumexp(column, 0)))
    zero = image.sum() * 0
    return (sum(img_terms, zero) / max(len(img_terms), 1) + sum(txt_terms, zero) / max(len(txt_terms), 1)) / 2


def loop_siglip(image, text, valid, s, bias, negatives=None, negatives_valid=None, scope="all"):
    big_b, k, _ = text.shape
    total = image.sum() * 0
    for n in range(big_b):
        for m in range(big_b):
            for j in range(k):
                if valid[m, j]:
                    y = 1.0 if m == n else -1.0
                    total = total + -F.logsigmoid(y * (s * image[n] @ text[m, j] + bias))
            if negatives is not None and (scope == "all" or m == n):
                for j in range(negatives.shape[1]):
                    if negatives_valid[m, j]:
                        total = total + -F.logsigmoid(-(s * image[n] @ negatives[m, j] + bias))
    return total.reshape(()) / big_b


def grads_of(fn, tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    value = fn(*leaves)
    return value.detach(), torch.autograd.grad(value, leaves, allow_unused=True)


def assert_same(got, want, rtol=1e-10, atol=1e-12):
    torch.testing.assert_close(got[0].reshape(()), want[0].reshape(()), rtol=rtol, atol=atol)
    for a, b in zip(got[1], want[1], strict=True):
        if a is None or b is None:
            assert (a if b is None else b) is None or float((a if b is None else b).abs().max()) == 0
            continue
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def negative_kwargs(scope, negatives, negatives_valid):
    return {} if scope is None else {"negatives": negatives, "negatives_valid": negatives_valid,
                                     "negative_scope": scope}


def chunk_of(spec, b):
    return {"B": b, "B+5": b + 5}.get(spec, spec)


@pytest.mark.parametrize("scope", SCOPES)
def test_references_match_the_formula_written_as_loops(scope):
    image, text, valid, negatives, negatives_valid = batch(5, 3, 2, 4, seed=3)
    s, beta = torch.tensor([7.0], dtype=F64), torch.tensor([-3.0], dtype=F64)
    kw = negative_kwargs(scope, negatives, negatives_valid)
    loop_kw = {} if scope is None else {"negatives": negatives, "negatives_valid": negatives_valid, "scope": scope}
    inputs = (image, text, s, beta, negatives)
    assert_same(grads_of(lambda i, t, s_, b_, n: ref.multi_positive_clip_loss(i, t, valid, s_, **{**kw, **(
        {"negatives": n} if scope else {})}), inputs),
                grads_of(lambda i, t, s_, b_, n: loop_clip(i, t, valid, s_, **{**loop_kw, **(
                    {"negatives": n} if scope else {})}), inputs))
    assert_same(grads_of(lambda i, t, s_, b_, n: ref.multi_positive_siglip_loss(i, t, valid, s_, b_, **{**kw, **(
        {"negatives": n} if scope else {})}), inputs),
                grads_of(lambda i, t, s_, b_, n: loop_siglip(i, t, valid, s_, b_, **{**loop_kw, **(
                    {"negatives": n} if scope else {})}), inputs))


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("block", [1, 2, 3, 7])
def test_block_shares_sum_to_the_whole_batch_loss(scope, block):
    big_b = 7
    image, text, valid, negatives, negatives_valid = batch(big_b, 3, 2, 5, seed=4)
    s, beta = torch.tensor([11.0], dtype=F64), torch.tensor([-5.0], dtype=F64)

    def blocks_clip(i, t, n, s_):
        total = 0
        for lo in range(0, big_b, block):
            hi = min(lo + block, big_b)
            neg = {} if scope is None else {
                "negatives": n if scope == "all" else n[lo:hi],
                "negatives_valid": negatives_valid if scope == "all" else negatives_valid[lo:hi],
                "negative_scope": scope}
            total = total + ref.multi_positive_clip_loss_block(i[lo:hi], t[lo:hi], valid[lo:hi], i, t, valid, s_, lo,
                                                               **neg)
        return total

    def blocks_siglip(i, t, n, s_, b_):
        total = 0
        for lo in range(0, big_b, block):
            hi = min(lo + block, big_b)
            neg = {} if scope is None else {
                "negatives": n if scope == "all" else n[lo:hi],
                "negatives_valid": negatives_valid if scope == "all" else negatives_valid[lo:hi],
                "negative_scope": scope}
            total = total + ref.multi_positive_siglip_loss_block(i[lo:hi], t, valid, s_, b_, lo, **neg)
        return total

    def whole(fn):
        return lambda i, t, n, *p: fn(i, t, valid, *p, **negative_kwargs(scope, n, negatives_valid))

    assert_same(grads_of(blocks_clip, (image, text, negatives, s)),
                grads_of(whole(ref.multi_positive_clip_loss), (image, text, negatives, s)))
    assert_same(grads_of(blocks_siglip, (image, text, negatives, s, beta)),
                grads_of(whole(ref.multi_positive_siglip_loss), (image, text, negatives, s, beta)))


@pytest.mark.parametrize("big_b", [1, 6])
def test_k1_all_valid_reduces_to_clip_and_siglip(big_b):
    image, text, _, _, _ = batch(big_b, 1, 1, 8, seed=5)
    valid = torch.ones(big_b, 1, dtype=torch.bool)
    s, beta = torch.tensor([14.3], dtype=F64), torch.tensor([-10.0], dtype=F64)
    one = (image, text, s)
    assert_same(grads_of(lambda i, t, s_: ref.multi_positive_clip_loss(i, t, valid, s_), one),
                grads_of(lambda i, t, s_: ref.clip_loss(i, t[:, 0], s_), one))
    assert_same(grads_of(lambda i, t, s_: multi_positive_clip_loss(i, t, valid, s_, chunk=2), one),
                grads_of(lambda i, t, s_: fused_clip_loss(i, t[:, 0], s_, chunk=2), one))
    two = (image, text, s, beta)
    assert_same(grads_of(lambda i, t, s_, b_: ref.multi_positive_siglip_loss(i, t, valid, s_, b_), two),
                grads_of(lambda i, t, s_, b_: ref.siglip_loss(i, t[:, 0], s_, b_), two))
    assert_same(grads_of(lambda i, t, s_, b_: multi_positive_siglip_loss(i, t, valid, s_, b_, chunk=2), two),
                grads_of(lambda i, t, s_, b_: fused_siglip_loss(i, t[:, 0], s_, b_, chunk=2), two))


def columns_of(seed: int, m: int, big_b: int, d: int):
    """Random columns with random owners (some −1) and validity: the kernels assume no layout."""
    g = torch.Generator().manual_seed(seed)
    k = F.normalize(torch.randn(m, d, generator=g, dtype=F64), dim=-1)
    owner = torch.randint(-1, big_b, (m,), generator=g)
    valid = torch.rand(m, generator=g) < 0.75
    return k, owner, valid


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("big_b,offset,rows,m", [(9, 0, 9, 23), (9, 4, 5, 17), (5, 2, 1, 6)])
def test_multi_positive_kernels_match_their_definitions(big_b, offset, rows, m, chunk):
    g = torch.Generator().manual_seed(big_b + m)
    q = F.normalize(torch.randn(rows, 7, generator=g, dtype=F64), dim=-1)
    k, owner, valid = columns_of(m, m, big_b, 7)
    s, beta = torch.tensor([30.0], dtype=F64), torch.tensor([-4.0], dtype=F64)
    c = chunk_of(chunk, rows)
    logits = s * q @ k.T
    target_mask = (owner[None, :] == (offset + torch.arange(rows))[:, None]) & valid[None, :]
    target = target_mask.to(F64)
    masked = logits.masked_fill(~valid[None, :], -math.inf)
    row_lse, col_ref, col_sum, tgt = kernels.multi_positive_infonce_stats(q, k, s, owner, valid, offset, c)
    torch.testing.assert_close(row_lse, masked.logsumexp(1), rtol=1e-12, atol=1e-12)
    col_lse = col_ref + col_sum.log()
    torch.testing.assert_close(col_lse[valid], logits.logsumexp(0)[valid], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tgt, (logits * target).sum(0), rtol=1e-12, atol=1e-12)
    # Coefficients: some rows and the negatives' and invalid columns' zero.
    a = torch.linspace(0.1, 0.9, rows, dtype=F64) * (torch.arange(rows) % 3 != 1)
    cc = torch.linspace(0.2, 0.5, m, dtype=F64) * (owner >= 0) * valid
    counts = target.sum(1, keepdim=True).clamp(min=1)
    col_norm = logits.logsumexp(0) + 0.3  # any normalizer fits the contract
    grad = (a[:, None] * ((masked - row_lse[:, None]).exp() - target / counts)
            + cc[None, :] * ((logits - col_norm[None, :]).exp() - target))
    dq, dk = kernels.multi_positive_infonce_grads(q, k, s, owner, valid, offset, row_lse, col_norm, a, cc, c)
    torch.testing.assert_close(dq, grad @ k, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dk, grad.T @ q, rtol=1e-10, atol=1e-12)
    y = torch.where(target_mask, 1.0, -1.0).to(F64)
    total, dq, dk, grad_sum = kernels.multi_positive_sigmoid_block(q, k, s, beta, owner, valid, offset, c)
    sig_logits = logits + beta
    g_sig = (sig_logits.sigmoid() - target) * valid[None, :]
    torch.testing.assert_close(total, (F.softplus(-y * sig_logits) * valid[None, :]).sum(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dq, g_sig @ k, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dk, g_sig.T @ q, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_sum, g_sig.sum(), rtol=1e-10, atol=1e-12)


def test_multi_positive_kernels_with_no_valid_column_give_zero_not_nan():
    q = F.normalize(torch.randn(4, 3, dtype=F64), dim=-1)
    k, owner, _ = columns_of(1, 6, 4, 3)
    valid = torch.zeros(6, dtype=torch.bool)
    s = torch.tensor([10.0], dtype=F64)
    row_lse, col_ref, col_sum, _ = kernels.multi_positive_infonce_stats(q, k, s, owner, valid, 0, 2)
    assert torch.isneginf(row_lse).all()
    dq, dk = kernels.multi_positive_infonce_grads(q, k, s, owner, valid, 0, row_lse, col_ref + col_sum.log(),
                                                  torch.zeros(4, dtype=F64), torch.zeros(6, dtype=F64), 2)
    assert dq.abs().max() == 0 and dk.abs().max() == 0


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("big_b,k,kn,d,scale", [(7, 3, 2, 9, 14.3), (5, 1, 3, 4, 100.0), (1, 2, 1, 3, 1.0)])
def test_fused_matches_reference_values_and_every_gradient(big_b, k, kn, d, scale, scope, chunk):
    image, text, valid, negatives, negatives_valid = batch(big_b, k, kn, d, seed=big_b * 10 + k)
    s, beta = torch.tensor([scale], dtype=F64), torch.tensor([-6.0], dtype=F64)
    c = chunk_of(chunk, big_b)

    def call(fn, **extra):
        return lambda i, t, n, *p: fn(i, t, valid, *p, **negative_kwargs(scope, n, negatives_valid), **extra)

    inputs = (image, text, negatives, s)
    want = grads_of(call(ref.multi_positive_clip_loss), inputs)
    assert_same(grads_of(call(multi_positive_clip_loss, chunk=c), inputs), want)
    assert_same(grads_of(call(multi_positive_clip_loss, impl="naive"), inputs), want)
    inputs = (image, text, negatives, s, beta)
    want = grads_of(call(ref.multi_positive_siglip_loss), inputs)
    assert_same(grads_of(call(multi_positive_siglip_loss, chunk=c), inputs), want)
    assert_same(grads_of(call(multi_positive_siglip_loss, impl="naive"), inputs), want)


def test_a_role_with_no_valid_text_gives_zero_loss_and_finite_gradients():
    image, text, _, negatives, negatives_valid = batch(4, 2, 2, 5)
    valid = torch.zeros(4, 2, dtype=torch.bool)
    s = torch.tensor([20.0], dtype=F64)
    for scope in SCOPES:
        kw = negative_kwargs(scope, negatives, negatives_valid)
        value, grads = grads_of(lambda i, t, s_, kw=kw: multi_positive_clip_loss(i, t, valid, s_, chunk=3, **kw),
                                (image, text, s))
        assert float(value) == 0 and all(float(g.abs().max()) == 0 for g in grads), scope
        want = grads_of(lambda i, t, s_, kw=kw: ref.multi_positive_clip_loss(i, t, valid, s_, **kw), (image, text, s))
        assert float(want[0]) == 0


def test_float32_fused_stays_close_to_the_float64_reference_at_scale_100():
    image, text, valid, negatives, negatives_valid = batch(9, 4, 2, 16, seed=8)
    s, beta = torch.tensor([100.0], dtype=F64), torch.tensor([-10.0], dtype=F64)
    for scope in SCOPES:
        def clip(i, t, n, s_, fn, scope=scope, **kw):
            return fn(i, t, valid, s_, **negative_kwargs(scope, n, negatives_valid), **kw)
        want = grads_of(lambda *x: clip(*x, fn=ref.multi_positive_clip_loss), (image, text, negatives, s))
        got = grads_of(lambda *x: clip(*x, fn=multi_positive_clip_loss, chunk=4),
                       tuple(x.float() for x in (image, text, negatives, s)))
        # float32 logits at s = 100 carry ~1e-5 absolute error; gradients here are O(1).
        assert_same((got[0].double(), [None if g is None else g.double() for g in got[1]]), want, rtol=1e-4, atol=1e-4)

        def sig(i, t, n, s_, b_, fn, scope=scope, **kw):
            return fn(i, t, valid, s_, b_, **negative_kwargs(scope, n, negatives_valid), **kw)
        want = grads_of(lambda *x: sig(*x, fn=ref.multi_positive_siglip_loss), (image, text, negatives, s, beta))
        got = grads_of(lambda *x: sig(*x, fn=multi_positive_siglip_loss, chunk=4),
                       tuple(x.float() for x in (image, text, negatives, s, beta)))
        assert_same((got[0].double(), [None if g is None else g.double() for g in got[1]]), want, rtol=1e-4, atol=1e-4)


def outputs_of(seed=0, dtype=torch.float32):
    image, long, long_valid, neg, neg_valid = batch(6, 3, 2, 8, seed=seed, dtype=dtype)
    alt = F.normalize(image[:, None, :] + torch.randn(6, 1, 8, dtype=dtype), dim=-1)
    return {"image": image, "text_long": long, "text_long_valid": long_valid, "text_alt": alt,
            "text_alt_valid": torch.ones(6, 1, dtype=torch.bool), "text_neg": neg, "text_neg_valid": neg_valid}


@pytest.mark.parametrize("form", ["softmax", "sigmoid"])
def test_multi_text_loss_is_the_weighted_sum_of_its_terms(form):
    terms = {"alt": {"texts": "alt"}, "long": {"texts": "long", "weight": 0.5, "negatives": "neg",
                                               "negative_scope": "own"}}
    loss = MultiTextLoss(terms, form=form, init_logit_scale=10.0, chunk_size=2)
    assert loss.needs == ("image", "text_alt", "text_alt_valid", "text_long", "text_long_valid", "text_neg",
                          "text_neg_valid")
    out = outputs_of()
    value, metrics = loss(**out)
    s = torch.tensor([10.0])
    if form == "softmax":
        alt = ref.multi_positive_clip_loss(out["image"], out["text_alt"], out["text_alt_valid"], s)
        long = ref.multi_positive_clip_loss(out["image"], out["text_long"], out["text_long_valid"], s,
                                            out["text_neg"], out["text_neg_valid"], "own")
        assert set(metrics) == {"logit_scale", "loss_alt", "loss_long"}
    else:
        beta = torch.tensor([-10.0])
        alt = ref.multi_positive_siglip_loss(out["image"], out["text_alt"], out["text_alt_valid"], s, beta)
        long = ref.multi_positive_siglip_loss(out["image"], out["text_long"], out["text_long_valid"], s, beta,
                                              out["text_neg"], out["text_neg_valid"], "own")
        assert set(metrics) == {"logit_scale", "logit_bias", "loss_alt", "loss_long"}
    torch.testing.assert_close(metrics["loss_alt"], alt, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["loss_long"], long, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(value, alt + 0.5 * long, rtol=1e-5, atol=1e-6)
    value.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in loss.parameters())


@pytest.mark.parametrize("terms,options,message", [
    ({"long": {"texts": "long", "wieght": 1.0}}, {}, "loss.terms.long.wieght is not a term key"),
    ({"long": {"weight": 1.0}}, {}, "loss.terms.long.texts is not set"),
    ({"long": {"texts": "long", "weight": "heavy"}}, {}, "loss.terms.long.weight must be a number"),
    ({"long": {"texts": "long", "weight": True}}, {}, "loss.terms.long.weight must be a number"),
    ({"long": {"texts": "long", "negatives": "neg", "negative_scope": "some"}}, {}, "must be all or own"),
    ({"a": {"texts": "long"}, "b": {"texts": "alt", "negatives": "long"}}, {}, "is also a term's texts"),
    ({"long": {"texts": "tokens"}}, {}, "must name a data.texts role"),
    ({}, {}, "loss.terms must map"),
    ({"long": {"texts": "long"}}, {"impl": "triton"}, "no Triton kernels"),
    ({"long": {"texts": "long"}}, {"form": "cosine"}, "loss.form='cosine'"),
    ({"long": {"texts": "long"}}, {"init_logit_bias": -10.0}, "init_logit_bias is for form=sigmoid"),
])
def test_bad_terms_fail_at_construction_with_one_line(terms, options, message):
    with pytest.raises(ClipkitConfigError, match=message) as err:
        MultiTextLoss(terms, **options)
    assert "\n" not in str(err.value)


def test_fused_refuses_triton_and_bad_shapes():
    out = outputs_of(dtype=F64)
    s = torch.tensor([10.0], dtype=F64)
    with pytest.raises(ClipkitConfigError, match="no Triton kernels"):
        multi_positive_clip_loss(out["image"], out["text_long"], out["text_long_valid"], s, impl="triton")
    with pytest.raises(ValueError, match=r"text \[b, K, D\]"):
        multi_positive_clip_loss(out["image"], out["text_long"][:, 0], out["text_long_valid"], s)


@pytest.mark.parametrize("name", ["multi_text", "multi_text_sigmoid"])
def test_loss_yaml_instantiates_with_an_overridden_term(name):
    cfg = OmegaConf.load(CONF_LOSS / f"{name}.yaml")
    cfg.terms = OmegaConf.create({"alt": {"texts": "alt", "weight": 2}})
    loss = instantiate({k: v for k, v in cfg.items() if k != "name"})
    assert loss.needs == ("image", "text_alt", "text_alt_valid")
    assert loss.terms["alt"]["weight"] == 2.0
    value, metrics = loss(**outputs_of())
    assert torch.isfinite(value) and "loss_alt" in metrics
