"""2- and 4-process gloo: the rank-split losses give the 1-process global-batch loss and gradients
after the mean-reduction DeepSpeed/DDP apply."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import free_port

from clipkit.losses import ClipLoss, CocaLoss, DistillLoss, FilipLoss, SigLipLoss

GLOBAL_B, DIM = 12, 10
LOSSES = {"clip": ClipLoss, "siglip": SigLipLoss, "filip": FilipLoss, "distill": DistillLoss, "coca": CocaLoss}


def make_batch(loss_name: str) -> tuple[list[torch.Tensor], list[bool]]:
    """The global batch as the loss's forward arguments, and which of them get gradients."""
    g = torch.Generator().manual_seed(7)
    img = F.normalize(torch.randn(GLOBAL_B, DIM, generator=g), dim=-1)
    txt = F.normalize(img + torch.randn(GLOBAL_B, DIM, generator=g), dim=-1)
    if loss_name == "filip":
        img_tok = F.normalize(torch.randn(GLOBAL_B, 3, DIM, generator=g), dim=-1)
        txt_tok = F.normalize(torch.randn(GLOBAL_B, 4, DIM, generator=g), dim=-1)
        mask = torch.arange(4)[None, :] < torch.randint(1, 5, (GLOBAL_B,), generator=g)[:, None]
        return [img_tok, None, txt_tok, mask], [True, False, True, False]
    if loss_name == "distill":
        t_img = F.normalize(torch.randn(GLOBAL_B, 6, generator=g), dim=-1)
        t_txt = F.normalize(t_img + torch.randn(GLOBAL_B, 6, generator=g), dim=-1)
        return [img, txt, t_img, t_txt, torch.tensor([30.0])], [True, True, False, False, False]
    if loss_name == "coca":
        # No pad labels: every rank then holds the same number of caption tokens, so the mean of
        # the per-rank caption means (what data parallelism averages) is the global token mean.
        logits = torch.randn(GLOBAL_B, 5, 11, generator=g)
        labels = torch.randint(1, 11, (GLOBAL_B, 5), generator=g)
        return [img, txt, logits, labels], [True, True, True, False]
    return [img, txt], [True, True]


def loss_and_grads(loss_name, inputs, trainable, impl):
    """Returns the loss, the trainable inputs' grads and the grads of the loss's own parameters.
    `impl` "<impl>+ring" runs SigLIP's ring exchange."""
    torch.manual_seed(0)
    impl, _, exchange = impl.partition("+")
    options = {"block_elems": 20} if loss_name == "filip" else {"chunk_size": 2}
    module = LOSSES[loss_name](impl=impl, **options, **({"exchange": exchange} if exchange else {}))
    args = [x.clone().requires_grad_() if t else x for x, t in zip(inputs, trainable)]
    value, _ = module(*args)
    value.backward()
    return value.detach(), [a.grad for a, t in zip(args, trainable) if t], [p.grad.clone() for p in module.parameters()]


CASES = [(loss_name, impl) for loss_name in LOSSES for impl in ("naive", "chunked")] + [
    ("clip", "triton"), ("siglip", "triton"),  # Triton kernels under the interpreter
    ("siglip", "chunked+ring"), ("siglip", "triton+ring")]


def worker(rank, world, port, out_dir):
    """Runs every (loss, impl) case in one process group (one spawn per world size)."""
    import os

    os.environ["TRITON_INTERPRET"] = "1"  # this child only: lets impl=triton run on CPU
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    b = GLOBAL_B // world
    results = {}
    for loss_name, impl in CASES:
        inputs, trainable = make_batch(loss_name)
        local = [x if x is None or x.shape[0] != GLOBAL_B else x[rank * b:(rank + 1) * b] for x in inputs]
        value, input_grads, param_grads = loss_and_grads(loss_name, local, trainable, impl)
        # What DeepSpeed does with parameter gradients: mean over ranks.
        for g in param_grads:
            dist.all_reduce(g)
            g /= world
        dist.all_reduce(value)
        results[loss_name, impl] = (float(value) / world, input_grads, param_grads)
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_rank_split_matches_single_process(world, tmp_path):
    """For CLIP, SigLIP, FILIP, distillation and CoCa, `naive` and `chunked` (and `triton` for CLIP
    and SigLIP, and SigLIP's ring exchange): the reference is the 1-process naive
    (materialized) loss; `chunked` runs the fused scheme (gather without grad, all-reduced
    column stats, reduce-scattered gradients), `+ring` passes text blocks round the ranks."""
    mp.spawn(worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    b = GLOBAL_B // world
    for loss_name, impl in CASES:
        inputs, trainable = make_batch(loss_name)
        ref_value, ref_input_grads, ref_param_grads = loss_and_grads(loss_name, inputs, trainable, "naive")
        for rank in range(world):
            value, input_grads, param_grads = torch.load(tmp_path / f"rank{rank}.pt")[loss_name, impl]
            where = f"{loss_name}/{impl} rank {rank} of {world}"
            assert abs(value - float(ref_value)) < 1e-5, where
            # Each rank's feature grads carry the factor W that the parameter mean divides out.
            for got, want in zip(input_grads, ref_input_grads, strict=True):
                torch.testing.assert_close(got / world, want[rank * b:(rank + 1) * b], rtol=1e-5, atol=1e-7,
                                           msg=lambda m, where=where: f"{where}: {m}")
            for got, want in zip(param_grads, ref_param_grads, strict=True):  # temperature (and bias)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=lambda m, where=where: f"{where}: {m}")
