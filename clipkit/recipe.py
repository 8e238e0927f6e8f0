"""Builds every component of a training run from its own config section and runs it.

Each `build_*` takes only its section (`cfg.model`, `cfg.loss`, ...); `run_training`
is the one place that sees the whole config. User mistakes are checked before the
process group, the model or any dataloader worker is created.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from clipkit import distributed
from clipkit.checkpoint import OPEN_CLIP_CONFIG, Checkpointer, atomic_write_text, export_open_clip
from clipkit.data import build_sources, build_train_loader
from clipkit.engine import build_optimizer, cosine_with_warmup, initialize_engine, render_deepspeed_config
from clipkit.errors import ClipkitConfigError
from clipkit.eval.suite import EvalSuite, build_eval_specs
from clipkit.loggers import build_loggers
from clipkit.models import ModelBundle, build_model
from clipkit.objective import ContrastiveObjective
from clipkit.plots import plot_training_curves
from clipkit.trainer import Trainer, TrainerSettings

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    # AdamW's second moments on rarely-hit embedding rows decay into denormals, which
    # made CPU steps 10x slower for hundreds of steps; flushing them costs nothing.
    torch.set_flush_denormal(True)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(launcher_cfg: DictConfig) -> distributed.DistInfo:
    """Joins (or, for one process, creates) the process group DeepSpeed will use."""
    import deepspeed

    info = distributed.env_dist_info()
    if info.world_size == 1 and "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    distributed.export_torch_env(info)
    backend = launcher_cfg.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(minutes=launcher_cfg.timeout_minutes))
    return info


def build_towers(model_cfg: DictConfig) -> ModelBundle:
    """`model:` section -> open_clip towers, transforms and tokenizer."""
    inline = OmegaConf.to_container(model_cfg.config, resolve=True) if model_cfg.config else None
    return build_model(model_cfg.name, pretrained=model_cfg.pretrained, config=inline)


def build_loss(loss_cfg: DictConfig, bundle: ModelBundle) -> torch.nn.Module:
    """Instantiates `loss._target_`; a pretrained checkpoint's temperature/bias take over the inits."""
    kwargs = {k: v for k, v in OmegaConf.to_container(loss_cfg, resolve=True).items() if k != "name"}
    if bundle.pretrained_logit_scale is not None and "init_logit_scale" in kwargs:
        kwargs["init_logit_scale"] = float(np.exp(bundle.pretrained_logit_scale))
    if bundle.pretrained_logit_bias is not None and "init_logit_bias" in kwargs:
        kwargs["init_logit_bias"] = bundle.pretrained_logit_bias
    try:
        loss = instantiate(kwargs)
    except InstantiationException as err:
        # Hydra wraps constructor errors; a bad `loss.*` value should stay a one-line config error.
        if isinstance(err.__cause__, ClipkitConfigError):
            raise err.__cause__ from None
        raise
    if getattr(loss, "needs", "pooled") != "pooled":
        raise ClipkitConfigError(f"loss={loss_cfg.name} needs {loss.needs} features; model={bundle.name} "
                                 f"gives pooled features only")
    return loss


def build_engine(objective: torch.nn.Module, *, optim_cfg: DictConfig, sched_cfg: DictConfig,
                 trainer_cfg: DictConfig, global_batch_size: int, world_size: int):
    ds_config = render_deepspeed_config(
        global_batch_size=global_batch_size, world_size=world_size, zero_stage=trainer_cfg.zero_stage,
        precision=trainer_cfg.precision, grad_clip=trainer_cfg.grad_clip)
    optimizer = build_optimizer(objective, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay,
                                betas=tuple(optim_cfg.betas), eps=optim_cfg.eps)
    scheduler = cosine_with_warmup(optimizer, warmup_steps=sched_cfg.warmup_steps,
                                   total_steps=trainer_cfg.max_steps, min_lr_ratio=sched_cfg.min_lr_ratio)
    return initialize_engine(objective, optimizer, scheduler, ds_config)


def _write_run_files(run_dir: Path, cfg: DictConfig, bundle: ModelBundle) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    preprocess_cfg = dict(getattr(bundle.model.visual, "preprocess_cfg", {}))
    atomic_write_text(run_dir / OPEN_CLIP_CONFIG, json.dumps(
        {"model_cfg": bundle.model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2))


def run_training(cfg: DictConfig) -> dict[str, Any]:
    """The whole job: returns the final eval metrics (`{set/metric: value}`)."""
    # User input first: paths, batch split, resume target.
    sources = build_sources(cfg.data)
    eval_specs = build_eval_specs(cfg.eval.sets)
    run_dir = Path(cfg.paths.run_dir)
    checkpointer = Checkpointer(run_dir / "checkpoints", keep_last=cfg.trainer.keep_last_checkpoints)
    resume_tag = checkpointer.resolve_resume(cfg.trainer.resume)

    info = init_distributed(cfg.launcher)
    world = info.world_size
    seed_everything(cfg.seed)
    bundle = build_towers(cfg.model)
    objective = ContrastiveObjective(bundle.model, build_loss(cfg.loss, bundle))
    engine = build_engine(objective, optim_cfg=cfg.optim, sched_cfg=cfg.sched, trainer_cfg=cfg.trainer,
                          global_batch_size=cfg.data.global_batch_size, world_size=world)
    if info.is_main:
        _write_run_files(run_dir, cfg, bundle)

    start_step, data_seed, data_state = 0, cfg.seed, None
    if resume_tag is not None:
        client_state = checkpointer.load(engine, resume_tag)
        start_step, data_state = int(client_state["step"]), client_state.get("data")
        if data_state is None:
            # Checkpoints from before exact resume: reshuffle rather than replay step 0's data.
            log.warning("checkpoint %s has no data position; the data stream restarts from a new seed", resume_tag)
            data_seed = cfg.seed + 7919 * start_step

    loader = build_train_loader(
        cfg.data, sources, preprocess=bundle.preprocess_train, tokenize=bundle.tokenizer,
        rank=info.rank, world_size=world, seed=data_seed, resume=data_state,
        keys_dir=run_dir / "data_keys" if cfg.data.get("record_keys") else None)
    if data_state is not None and loader.batches != start_step:
        # One batch per step per rank: anything else means the checkpoint is inconsistent.
        raise ClipkitConfigError(f"checkpoint {resume_tag}: data position {loader.batches} batches, step {start_step}")
    loggers = build_loggers(OmegaConf.to_container(cfg.logger.wandb, resolve=True) if cfg.logger.wandb else None,
                            run_dir=run_dir, run_name=cfg.run_name,
                            config=OmegaConf.to_container(cfg, resolve=True), is_main=info.is_main)
    suite = EvalSuite(eval_specs, preprocess=bundle.preprocess_val, tokenizer=bundle.tokenizer,
                      batch_size=cfg.eval.batch_size, out_dir=run_dir / "eval", model_name=bundle.name)

    def evaluate(step: int) -> dict[str, float]:
        engine.eval()
        metrics = suite.run(engine.module, device=engine.device, step=step)
        engine.train()
        return metrics

    settings = TrainerSettings(
        max_steps=cfg.trainer.max_steps, global_batch_size=cfg.data.global_batch_size,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        checkpoint_every_n_steps=cfg.trainer.checkpoint_every_n_steps,
        eval_every_n_steps=cfg.eval.every_n_steps, progress_bar=cfg.trainer.progress_bar)
    trainer = Trainer(engine, loader, settings, checkpointer=checkpointer, loggers=loggers,
                      evaluate=evaluate if eval_specs else None,
                      client_state=lambda step: {"step": step, "data": loader.gather_state()},
                      data_stats=loader.stats)
    trainer.fit(start_step)
    final = evaluate(settings.max_steps) if eval_specs else {}
    if final:
        loggers.log({"step": settings.max_steps, **final})

    distributed.barrier()
    if info.is_main:
        if cfg.trainer.export_open_clip:
            export_open_clip(run_dir)
        if (run_dir / "metrics.jsonl").exists():
            plot_training_curves(run_dir / "metrics.jsonl", run_dir / "training_curves.png")
        if eval_specs:
            print(suite.results_table(), flush=True)
    loggers.close()
    distributed.barrier()
    return final
