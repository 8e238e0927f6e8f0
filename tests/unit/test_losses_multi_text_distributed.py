"""1, 2 and 3 gloo processes: the multi-positive losses (softmax and sigmoid, hard negatives in both
scopes, masks with images that have no valid positive) give the 1-process float64 reference of the
whole batch, values and gradients (features, scale, bias), after DeepSpeed's mean over ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import free_port

from clipkit.losses import functional as ref
from clipkit.losses.fused import multi_positive_clip_loss, multi_positive_siglip_loss

GLOBAL_B, K, KN, DIM = 6, 3, 2, 5
F64 = torch.float64
CASES = [(form, scope, impl) for form in ("softmax", "sigmoid") for scope in (None, "all", "own")
         for impl in ("chunked", "naive")]


def make_batch():
    """image [B, D], text [B, K, D], valid [B, K], negatives [B, Kn, D], negatives_valid [B, Kn], s, β."""
    g = torch.Generator().manual_seed(11)
    image = F.normalize(torch.randn(GLOBAL_B, DIM, generator=g, dtype=F64), dim=-1)
    text = F.normalize(image[:, None] + torch.randn(GLOBAL_B, K, DIM, generator=g, dtype=F64), dim=-1)
    negatives = F.normalize(image[:, None] + torch.randn(GLOBAL_B, KN, DIM, generator=g, dtype=F64), dim=-1)
    valid = torch.rand(GLOBAL_B, K, generator=g) < 0.6
    valid[0] = True
    valid[1] = valid[5] = False  # images without a valid positive, on different ranks at W = 2, 3
    negatives_valid = torch.rand(GLOBAL_B, KN, generator=g) < 0.6
    return image, text, valid, negatives, negatives_valid, torch.tensor([12.0], dtype=F64), torch.tensor(
        [-3.0], dtype=F64)


def loss_and_grads(form, scope, impl, image, text, valid, negatives, negatives_valid, scale, bias, *, reference):
    """The loss and d/d(image, text, negatives, s, β) for fresh leaves."""
    leaves = [x.detach().clone().requires_grad_() for x in (image, text, negatives, scale, bias)]
    i, t, n, s, b = leaves
    neg = {} if scope is None else {"negatives": n, "negatives_valid": negatives_valid, "negative_scope": scope}
    if reference:
        fn = ref.multi_positive_clip_loss if form == "softmax" else ref.multi_positive_siglip_loss
        value = fn(i, t, valid, s, **({} if form == "softmax" else {"logit_bias": b}), **neg)
    elif form == "softmax":
        value = multi_positive_clip_loss(i, t, valid, s, impl=impl, chunk=2, **neg)
    else:
        value = multi_positive_siglip_loss(i, t, valid, s, b, impl=impl, chunk=2, **neg)
    grads = torch.autograd.grad(value, leaves, allow_unused=True)
    return value.detach(), [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]


def worker(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    b = GLOBAL_B // world
    image, text, valid, negatives, negatives_valid, scale, bias = make_batch()
    rows = slice(rank * b, (rank + 1) * b)
    results = {}
    for form, scope, impl in CASES:
        value, grads = loss_and_grads(form, scope, impl, image[rows], text[rows], valid[rows], negatives[rows],
                                      negatives_valid[rows], scale, bias, reference=False)
        for g in grads[3:]:  # the scale and bias are parameters: DeepSpeed averages them over ranks
            dist.all_reduce(g)
            g /= world
        dist.all_reduce(value)
        results[form, scope, impl] = (float(value) / world, grads)
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [1, 2, 3])
def test_multi_positive_losses_are_exact_at_any_world_size(world, tmp_path):
    mp.spawn(worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    b = GLOBAL_B // world
    batch = make_batch()
    for form, scope, impl in CASES:
        ref_value, ref_grads = loss_and_grads(form, scope, impl, *batch, reference=True)
        for rank in range(world):
            value, grads = torch.load(tmp_path / f"rank{rank}.pt")[form, scope, impl]
            where = f"{form}/{scope}/{impl} rank {rank} of {world}"
            assert abs(value - float(ref_value)) < 1e-12, where
            rows = slice(rank * b, (rank + 1) * b)
            # Each rank's feature grads carry the factor W that the parameter mean divides out.
            for name, got, want in zip(("image", "text", "negatives"), grads[:3], ref_grads[:3]):
                torch.testing.assert_close(got / world, want[rows], rtol=1e-10, atol=1e-12,
                                           msg=lambda m, where=where, name=name: f"{where} d{name}: {m}")
            for name, got, want in zip(("scale", "bias"), grads[3:], ref_grads[3:]):
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12,
                                           msg=lambda m, where=where, name=name: f"{where} d{name}: {m}")
