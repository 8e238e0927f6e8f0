"""Activation checkpointing (`model.grad_checkpointing`) gives the eager gradients; compiled towers
(`trainer.compile`) give the eager losses and keep plain parameter names."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir

from clipkit.config import CONF_DIR
from clipkit.models import compile_towers
from clipkit.recipe import build_loss, build_objective, build_towers


def objective_for(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    torch.manual_seed(0)
    bundle = build_towers(cfg.model)
    return build_objective(cfg.model, bundle, build_loss(cfg.loss, bundle), max_steps=100, seed=0)


def batch(n: int = 8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(1, 49407, (n, 16), generator=g)


@pytest.mark.parametrize("overrides", [["loss=clip"], ["model=tiny_filip", "loss=filip"], ["model=tiny_coca", "loss=coca"]])
def test_checkpointed_towers_give_the_eager_gradients(overrides):
    grads = []
    for flag in ("false", "true"):
        objective = objective_for(*overrides, f"model.grad_checkpointing={flag}").train()
        checkpointed = [m.grad_checkpointing for m in objective.modules() if hasattr(m, "grad_checkpointing")]
        assert checkpointed and all(c == (flag == "true") for c in checkpointed)
        images, tokens = batch()
        loss, _ = objective({"image": images, "text": tokens})
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None})
    eager, checkpointed = grads
    assert eager.keys() == checkpointed.keys() and any(n.startswith("loss.") for n in eager)
    for name, grad in eager.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-6, atol=1e-6, msg=name)


def test_compiled_towers_follow_eager_training_and_keep_their_names():
    losses, names = {}, {}
    for compiled in (False, True):
        objective = objective_for("loss=clip").train()
        if compiled:
            assert compile_towers(objective.model) == ["visual.transformer", "transformer"]
        names[compiled] = list(objective.state_dict())
        optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-3)
        losses[compiled] = []
        for step in range(3):
            images, tokens = batch()
            loss, _ = objective({"image": images + step, "text": tokens})
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[compiled].append(float(loss.detach()))
    assert names[True] == names[False] and not any("_orig_mod" in n for n in names[True])
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
