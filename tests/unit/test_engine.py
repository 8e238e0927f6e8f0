"""DeepSpeed config rendering, AdamW parameter groups and the lr schedule."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from clipkit.engine import build_optimizer, build_schedule, cosine_with_warmup, param_groups, render_deepspeed_config
from clipkit.errors import ClipkitConfigError
from clipkit.losses import SigLipLoss
from clipkit.objective import ContrastiveObjective


def test_rendered_config_splits_the_global_batch():
    cfg = render_deepspeed_config(global_batch_size=256, world_size=4, zero_stage=3, precision="bf16", grad_clip=1.0)
    assert cfg["train_batch_size"] == 256 and cfg["train_micro_batch_size_per_gpu"] == 64
    assert cfg["zero_optimization"] == {"stage": 3} and cfg["bf16"] == {"enabled": True}
    assert cfg["gradient_clipping"] == 1.0


@pytest.mark.parametrize("kwargs,message", [
    (dict(global_batch_size=10, world_size=4), "not divisible"),
    (dict(precision="fp16"), "trainer.precision"),
    (dict(zero_stage=4), "trainer.zero_stage"),
])
def test_rendered_config_rejects_bad_values(kwargs, message):
    args = dict(global_batch_size=8, world_size=2, zero_stage=0, precision="fp32", grad_clip=None) | kwargs
    with pytest.raises(ClipkitConfigError, match=message):
        render_deepspeed_config(**args)


def test_no_weight_decay_on_biases_norms_and_loss_scalars():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    objective = ContrastiveObjective(model, SigLipLoss())
    decay, no_decay = param_groups(objective, weight_decay=0.2)
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    exempt = {id(p) for p in no_decay["params"]}
    assert id(objective.loss.temperature.logit_scale) in exempt and id(objective.loss.temperature.logit_bias) in exempt
    assert id(model[0].bias) in exempt and id(model[1].weight) in exempt


def test_cosine_schedule_warms_up_then_decays_to_min():
    opt = build_optimizer(torch.nn.Linear(2, 2), lr=1.0, weight_decay=0.0, betas=(0.9, 0.98), eps=1e-6)
    sched = cosine_with_warmup(opt, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    lrs = []
    for _ in range(110):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] > 0.1 - 1e-9


def test_constant_schedule_warms_up_then_holds_and_names_are_checked():
    opt = build_optimizer(torch.nn.Linear(2, 2), lr=1.0, weight_decay=0.0, betas=(0.9, 0.98), eps=1e-6)
    sched = build_schedule(opt, OmegaConf.create({"name": "constant", "warmup_steps": 4}), total_steps=50)
    lrs = []
    for _ in range(50):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0]) and set(lrs[3:]) == {1.0}
    with pytest.raises(ClipkitConfigError, match="sched.name='linear' is not one of cosine, constant"):
        build_schedule(opt, OmegaConf.create({"name": "linear", "warmup_steps": 4}), total_steps=50)



def test_adamw_is_fused_where_torch_has_the_kernel_and_matches_the_default():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 3), torch.nn.LayerNorm(3))
    fused = build_optimizer(model, lr=1e-2, weight_decay=0.2, betas=(0.9, 0.98), eps=1e-6)
    assert fused.defaults["fused"]   # CPU has the kernel since torch 2.4
    copies = {id(p): p.detach().clone().requires_grad_() for p in model.parameters()}
    plain = torch.optim.AdamW([{"params": [copies[id(p)] for p in g["params"]], "weight_decay": g["weight_decay"]}
                               for g in fused.param_groups], lr=1e-2, betas=(0.9, 0.98), eps=1e-6)
    assert [g["fused"] for g in plain.param_groups] == [None, None]   # torch's default on CPU: the per-tensor loop
    assert [g["weight_decay"] for g in plain.param_groups] == [0.2, 0.0]
    for step in range(5):
        g = torch.Generator().manual_seed(step)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
            copies[id(p)].grad = p.grad.clone()
        fused.step()
        plain.step()
    for p in model.parameters():
        torch.testing.assert_close(p, copies[id(p)], rtol=1e-6, atol=1e-7)

