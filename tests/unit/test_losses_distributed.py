"""2- and 4-process gloo: the rank-split losses give the 1-process global-batch loss and gradients
after the mean-reduction DeepSpeed/DDP apply."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from clipkit.losses import ClipLoss, SigLipLoss
from conftest import free_port

GLOBAL_B, DIM = 12, 10

def make_batch():
    g = torch.Generator().manual_seed(7)
    img = F.normalize(torch.randn(GLOBAL_B, DIM, generator=g), dim=-1)
    txt = F.normalize(img + torch.randn(GLOBAL_B, DIM, generator=g), dim=-1)
    return img, txt

def loss_and_grads(loss_cls, img, txt, impl="naive"):
    """Returns the loss, input grads and the grads of the loss's own parameters."""
    torch.manual_seed(0)
    module = loss_cls(impl=impl, chunk_size=2)
    img, txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    value, _ = module(img, txt)
    value.backward()
    return value.detach(), img.grad, txt.grad, [p.grad.clone() for p in module.parameters()]

def worker(rank, world, port, loss_name, impl, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    img, txt = make_batch()
    b = GLOBAL_B // world
    rows = slice(rank * b, (rank + 1) * b)
    value, gi, gt, gp = loss_and_grads({"clip": ClipLoss, "siglip": SigLipLoss}[loss_name], img[rows], txt[rows], impl)
    # What DeepSpeed does with parameter gradients: mean over ranks.
    for g in gp:
        dist.all_reduce(g)
        g /= world
    dist.all_reduce(value)
    torch.save((rank, float(value) / world, gi, gt, gp), f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()

@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_rank_split_matches_single_process(world, loss_name, impl, tmp_path):
    """The reference is the 1-process naive (materialized) loss; `chunked` runs the fused
    scheme (gather without grad, all-reduced column stats, reduce-scattered gradients)."""
    img, txt = make_batch()
    ref_value, ref_gi, ref_gt, ref_gp = loss_and_grads({"clip": ClipLoss, "siglip": SigLipLoss}[loss_name], img, txt)
    mp.spawn(worker, args=(world, free_port(), loss_name, impl, str(tmp_path)), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    b = GLOBAL_B // world
    for rank, value, gi, gt, gp in results:
        assert abs(value - float(ref_value)) < 1e-5
        # Each rank's feature grads carry the factor W that the parameter mean divides out.
        torch.testing.assert_close(gi / world, ref_gi[rank * b:(rank + 1) * b], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(gt / world, ref_gt[rank * b:(rank + 1) * b], rtol=1e-5, atol=1e-7)
        for a, r in zip(gp, ref_gp):  # temperature (and bias) after the mean over ranks
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-7)

