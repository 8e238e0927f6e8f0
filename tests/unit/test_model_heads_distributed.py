"""2 gloo processes: the two-head objective (ContrastiveObjective with a MultiTextLoss whose terms
score the semantic and the perceptual head, each head with its own temperature) on each rank's
half of a batch gives the 1-process float64 value of the whole batch, and every parameter's
gradient after DeepSpeed's mean over ranks equals the 1-process gradient: the shared trunk, both
heads' poolings and projections, both text projections, both temperatures and biases."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port
from test_model_heads import role_batch, two_head_objective

WORLD = 2
# One case (each float64 pass of the tiny towers costs seconds): the sigmoid form, so the biases
# are checked too; the forms themselves are exact at any world size (test_losses_multi_text_distributed).
CASES = [("sigmoid", "attn", "own")]


def loss_and_grads(form: str, pool: str, text_projection: str, rows: slice | None):
    """The objective's loss on `rows` of the batch (all of it for None) and every trainable
    parameter's gradient, by name; float64 throughout."""
    bundle, _, objective = two_head_objective(form, pool, text_projection)
    batch = role_batch(bundle.tokenizer)
    if rows is not None:
        batch = {name: value[rows] for name, value in batch.items()}
    value, metrics = objective(batch)
    named = [(n, p) for n, p in objective.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(value, [p for _, p in named], allow_unused=True)
    return value.detach(), {n: g for (n, _), g in zip(named, grads) if g is not None}


def worker(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    b = 8 // world
    results = {}
    for case in CASES:
        value, grads = loss_and_grads(*case, rows=slice(rank * b, (rank + 1) * b))
        for g in grads.values():   # DeepSpeed's gradient reduction: the mean over ranks
            dist.all_reduce(g)
            g /= world
        dist.all_reduce(value)
        results[case] = (float(value) / world, grads)
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_the_two_head_objective_is_exact_at_world_size_2(tmp_path):
    mp.spawn(worker, args=(WORLD, free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for case in CASES:
        ref_value, ref_grads = loss_and_grads(*case, rows=None)
        for name in ("loss.temperature.logit_scale", "loss.head_temperatures.perceptual.logit_scale",
                     "loss.head_temperatures.perceptual.logit_bias", "model.heads.perceptual.proj",
                     "model.heads.perceptual.text_projection", "model.visual.proj", "model.text_projection",
                     "model.visual.transformer.resblocks.0.attn.in_proj_weight"):
            assert name in ref_grads and bool(ref_grads[name].abs().sum() > 0), (case, name)
        for rank in range(WORLD):
            value, grads = torch.load(tmp_path / f"rank{rank}.pt")[case]
            where = f"{'/'.join(case)} rank {rank} of {WORLD}"
            assert value == pytest.approx(float(ref_value), rel=1e-12, abs=1e-12), where
            assert grads.keys() == ref_grads.keys(), where
            for name, want in ref_grads.items():
                torch.testing.assert_close(grads[name], want, rtol=1e-9, atol=1e-12,
                                           msg=lambda m, where=where, name=name: f"{where} d{name}: {m}")
