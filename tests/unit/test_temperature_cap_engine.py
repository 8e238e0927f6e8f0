"""The temperature cap holds where DeepSpeed's optimizer keeps an fp32 master copy (bf16, ZeRO 1-3):
`cap_logit_scales` clamps the master after each step, through the real engine (gloo, world 1)."""

import math

import pytest
import torch
from torch import nn

from clipkit.engine import build_optimizer, cap_logit_scales, fp32_master, initialize_engine, render_deepspeed_config
from clipkit.losses.logit_scale import LogitScale

CASES = [(0, "fp32"), (0, "bf16"), (1, "fp32"), (2, "bf16"), (3, "bf16")]
HEAD_CASES = [(0, "bf16"), (3, "bf16")]
# Steps the loss pushes s up, then down. Adam's momentum turns after about 4 down steps (lr 0.05), so a
# capped t then falls about 4 x 0.05; a master that drifted UP x 0.05 above the cap gets back only to it.
UP, DOWN = 3, 8


class PushScale(nn.Module):
    """loss = direction * s + a small term that gives the linear layer a gradient too."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.temperature = LogitScale(init_scale=100.0, max_scale=100.0)
        self.direction = -1.0   # -1: the loss wants a larger s (as a confident CLIP batch does)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, _ = self.temperature()
        return self.direction * s.sum() + 1e-3 * self.linear(x.to(self.linear.weight.dtype)).float().pow(2).mean()


class PushTwoHeads(nn.Module):
    """Two image heads' temperatures as MultiTextLoss holds them (`temperature`, `head_temperatures.<head>`),
    each with its own cap, both pushed up."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.temperature = LogitScale(init_scale=100.0, max_scale=100.0)
        self.head_temperatures = nn.ModuleDict({"perceptual": LogitScale(init_scale=50.0, max_scale=50.0)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.temperature()[0] + self.head_temperatures["perceptual"]()[0]
        return -s.sum() + 1e-3 * self.linear(x.to(self.linear.weight.dtype)).float().pow(2).mean()


def _engine(model: nn.Module, stage: int, precision: str):
    """The real DeepSpeed engine around `model`: AdamW at lr 0.05, no decay, no clipping."""
    optimizer = build_optimizer(model, lr=0.05, weight_decay=0.0, betas=(0.9, 0.98), eps=1e-6)
    ds = render_deepspeed_config(global_batch_size=2, world_size=1, zero_stage=stage, precision=precision,
                                 grad_clip=None)
    return initialize_engine(model, optimizer, None, ds)


def _worker(rank, port, out_path):
    import os

    import deepspeed

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend="gloo")
    results = {}
    for stage, precision in CASES:
        for capped in (False, True):
            torch.manual_seed(0)
            engine = _engine(PushScale(), stage, precision)
            masters, scales = [], []
            for step in range(UP + DOWN):
                engine.module.direction = -1.0 if step < UP else 1.0
                loss = engine(torch.randn(2, 4))
                engine.backward(loss)
                engine.step()
                if capped:
                    cap_logit_scales(engine)
                masters.append(float(fp32_master(engine, engine.module.temperature.logit_scale).max()))
                with torch.no_grad(), deepspeed.zero.GatheredParameters([engine.module.temperature.logit_scale]):
                    scales.append(float(engine.module.temperature.scale()))
            results[(stage, precision, capped)] = (masters, scales)
            engine.destroy()
    for stage, precision in HEAD_CASES:
        torch.manual_seed(0)
        engine = _engine(PushTwoHeads(), stage, precision)
        masters = []
        for _ in range(UP):
            engine.backward(engine(torch.randn(2, 4)))
            engine.step()
            cap_logit_scales(engine)
            masters.append((float(fp32_master(engine, engine.module.temperature.logit_scale).max()),
                            float(fp32_master(engine, engine.module.head_temperatures["perceptual"].logit_scale).max())))
        results[("heads", stage, precision)] = masters
        engine.destroy()
    torch.save(results, out_path)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import torch.multiprocessing as mp
    from conftest import free_port

    out = tmp_path_factory.mktemp("cap") / "results.pt"
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=1, join=True)
    return torch.load(out)


@pytest.mark.parametrize(("stage", "precision"), CASES)
def test_the_optimizer_s_copy_of_the_temperature_never_passes_the_cap(results, stage, precision):
    masters, scales = results[(stage, precision, True)]
    # While the loss pushes up, the fp32 master (rounded up to float32) stays at the cap.
    assert max(masters) <= float(torch.tensor(math.log(100.0), dtype=torch.float32)) + 1e-7, masters
    assert scales[:UP] == pytest.approx([100.0] * UP, rel=1e-6)
    # Once Adam's momentum turns, s leaves the cap: nothing above it has to be unwound first.
    assert scales[-1] < 95.0, scales


def test_without_the_after_step_cap_an_fp32_master_drifts_above_it(results):
    """Why the trainer calls `cap_logit_scales`: where DeepSpeed steps a master copy, the loss's
    own in-place clamp only reaches the module's copy, and the drift holds s up after the turn."""
    for stage, precision in CASES:
        masters, scales = results[(stage, precision, False)]
        _, capped_scales = results[(stage, precision, True)]
        master_is_separate = stage > 0 or precision == "bf16"
        # One step (lr 0.05) above the cap is the plain parameter between its step and the next forward's clamp.
        assert (max(masters) > math.log(100.0) + 0.075) == master_is_separate, (stage, precision, masters)
        if master_is_separate:
            assert scales[-1] > 1.04 * capped_scales[-1], (stage, precision, scales, capped_scales)
        else:
            assert scales == capped_scales


@pytest.mark.parametrize(("stage", "precision"), HEAD_CASES)
def test_each_image_head_s_temperature_is_capped_at_its_own_cap(results, stage, precision):
    """model.heads: every LogitScale is capped after the step, the perceptual head's at its own 50."""
    caps = [float(torch.tensor(math.log(c), dtype=torch.float32)) + 1e-7 for c in (100.0, 50.0)]
    for semantic, perceptual in results[("heads", stage, precision)]:
        assert semantic <= caps[0] and perceptual <= caps[1]
        assert perceptual == pytest.approx(math.log(50.0), abs=1e-6)
