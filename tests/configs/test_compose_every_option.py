"""Every option of every config group composes, and the component it configures builds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from clipkit.config import CONF_DIR
from clipkit.data import build_sources, roles_from_config
from clipkit.engine import build_optimizer, build_schedule, render_deepspeed_config
from clipkit.eval.suite import build_eval_specs, build_search_config
from clipkit.loggers import build_loggers
from clipkit.recipe import build_loss, build_objective, build_towers
from clipkit.run_dir import RunDir

GROUPS = ["model", "loss", "data", "optim", "sched", "trainer", "eval", "logger", "launcher", "experiment", "debug"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))]


def test_every_group_has_options():
    assert {g for g, _ in OPTIONS} == set(GROUPS)


def composed(digits_root: Path, *overrides: str, config_name: str = "train"):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name, overrides=[f"paths.root={digits_root}", *overrides])


# Losses that need more than pooled features, and a model that gives it.
MODEL_FOR_LOSS = {"coca": "tiny_coca", "distill": "tiny_distill"}
# Losses over text roles, and data that has the roles their default terms name.
DATA_FOR_LOSS = {"multi_text": "digits_captions", "multi_text_sigmoid": "digits_captions"}


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_builds(group, option, digits_root, demo_export, tmp_path):
    extra = ["data.train_urls='${paths.data_dir}/digits/train/{00000..00007}.tar'"] if option == "webdataset" else []
    if group == "loss" and option in MODEL_FOR_LOSS:
        extra.append(f"model={MODEL_FOR_LOSS[option]}")
    if group == "loss" and option in DATA_FOR_LOSS:
        extra.append(f"data={DATA_FOR_LOSS[option]}")
    cfg = composed(digits_root, f"{group}={option}", *extra)
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # no ??? or broken ${...} left
    if group in ("model", "loss", "experiment"):
        bundle = build_towers(cfg.model)
        roles = roles_from_config(cfg.data.texts) or ()
        loss = build_loss(cfg.loss, bundle, positive_roles=tuple(r.name for r in roles if not r.negative))
        assert bundle.tokenizer(["a photo"]).shape[0] == 1
        assert any(p.shape == (1,) for p in loss.parameters())
        objective = build_objective(cfg.model, bundle, loss, max_steps=cfg.trainer.max_steps, seed=cfg.seed,
                                    text_roles=tuple(cfg.data.texts or ()))
        assert not objective.missing_outputs(tuple(loss.needs))
    if group in ("optim", "sched", "trainer", "debug", "experiment"):
        ds = render_deepspeed_config(global_batch_size=cfg.data.global_batch_size, world_size=1,
                                     zero_stage=cfg.trainer.zero_stage, precision=cfg.trainer.precision,
                                     grad_clip=cfg.trainer.grad_clip)
        assert ds["zero_optimization"]["stage"] == cfg.trainer.zero_stage
        opt = build_optimizer(torch.nn.Linear(3, 3), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                              betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
        build_schedule(opt, cfg.sched, total_steps=cfg.trainer.max_steps)
    if group in ("data", "experiment", "debug"):
        sources = build_sources(cfg.data)
        assert sources and all(source.urls for source in sources)
    if group in ("eval", "experiment"):
        build_eval_specs(cfg.eval.sets)
        assert build_search_config(cfg.eval).index == "flat"  # exact unless asked otherwise
    if group == "logger":
        wandb_cfg = OmegaConf.to_container(cfg.logger.wandb, resolve=True) if cfg.logger.wandb else None
        loggers = build_loggers(wandb_cfg, run_dir=RunDir(tmp_path), run_name=f"compose-{option}", config={}, is_main=True)
        loggers.log({"step": 1, "train/loss": 1.0})
        loggers.close()
        assert (tmp_path / "metrics.jsonl").read_text().strip()
    if group == "launcher":
        assert cfg.launcher.backend in ("auto", "gloo", "nccl") and cfg.launcher.timeout_minutes > 0


def test_eval_entry_config_composes(digits_root):
    cfg = composed(digits_root, "run_dir=somewhere", config_name="eval")
    assert build_eval_specs(cfg.eval.sets)[0].classnames[0] == "zero"
