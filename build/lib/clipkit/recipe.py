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
from clipkit.eval.suite import EvalSuite, build_eval_specs, build_search_config, check_captioning
from clipkit.loggers import build_loggers
from clipkit.models import ModelBundle, build_model, build_teacher_model, lock_towers, open_clip_config
from clipkit.objective import OUTPUTS, ContrastiveObjective, Teacher
from clipkit.plots import plot_training_curves
from clipkit.preemption import Preempted, PreemptionWatch, parse_signals, requeue_slurm_job
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


def _plain(node) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def build_towers(model_cfg: DictConfig) -> ModelBundle:
    """`model:` section -> open_clip towers (LiT locks and FLIP patch dropout applied),
    transforms and tokenizer."""
    bundle = build_model(model_cfg.name, pretrained=model_cfg.pretrained, config=_plain(model_cfg.config),
                         patch_dropout=float(model_cfg.get("patch_dropout", 0.0)))
    lock_towers(bundle.model, image=_plain(model_cfg.get("lock_image")), text=_plain(model_cfg.get("lock_text")))
    return bundle


def build_objective(model_cfg: DictConfig, bundle: ModelBundle, loss: torch.nn.Module, *,
                    max_steps: int, seed: int) -> ContrastiveObjective:
    """Towers + loss (+ the frozen `model.teacher`, TailDrop, FLIP's unmasked tuning phase).

    Fails with a one-line config error when the loss needs an output this model lacks.
    """
    teacher_cfg = model_cfg.get("teacher")
    teacher = None
    if teacher_cfg:
        teacher_model = build_teacher_model(teacher_cfg.name, teacher_cfg.pretrained, _plain(teacher_cfg.get("config")))
        teacher_vocab = open_clip_config(teacher_cfg.name)["text_cfg"].get("vocab_size", 49408)
        student_vocab = bundle.model_cfg["text_cfg"].get("vocab_size", 49408)
        if teacher_vocab != student_vocab:
            raise ClipkitConfigError(f"model.teacher={teacher_cfg.name} has a different tokenizer vocabulary "
                                     f"({teacher_vocab} vs {student_vocab}); the teacher reads the student's "
                                     f"token ids")
        teacher = Teacher(teacher_model)
    unmasked = int(model_cfg.get("unmasked_tuning_steps", 0))
    objective = ContrastiveObjective(
        bundle.model, loss, teacher=teacher, tail_drop_max=int(model_cfg.get("tail_drop_max", 0)),
        unmasked_tuning_from_step=max_steps - unmasked + 1 if unmasked else None, seed=seed)
    missing = objective.missing_outputs(tuple(loss.needs))
    if missing:
        hints = {"caption_logits": "a CoCa model (model=tiny_coca)",
                 "image_tokens": "a ViT CLIP without an attentional pooler (model=tiny_vit)",
                 "teacher_image": "model.teacher (model=tiny_distill)"}
        wanted = sorted({h for name, h in hints.items() if name in missing} or {", ".join(missing)})
        raise ClipkitConfigError(f"loss={type(loss).__name__} needs {', '.join(OUTPUTS[m].split(' [')[0] for m in missing)}"
                                 f" that model={bundle.name} cannot give; use {' or '.join(wanted)}")
    return objective


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
    eval_search = build_search_config(cfg.eval)
    if cfg.eval.get("cache_dir"):
        # The cache is keyed by (model, set, step): two runs of one architecture would share
        # entries, and a run never re-embeds the same weights, so there is nothing to reuse.
        raise ClipkitConfigError("eval.cache_dir is for clipkit-eval; training evals embed new weights "
                                 "at every step, so unset it for clipkit-train")
    try:
        preempt_signals = parse_signals(cfg.launcher.get("preempt_signals") or [])
    except ValueError as err:
        raise ClipkitConfigError(str(err)) from None
    run_dir = Path(cfg.paths.run_dir)
    checkpointer = Checkpointer(run_dir / "checkpoints", keep_last=cfg.trainer.keep_last_checkpoints)
    resume_tag = checkpointer.resolve_resume(cfg.trainer.resume)

    info = init_distributed(cfg.launcher)
    world = info.world_size
    seed_everything(cfg.seed)
    bundle = build_towers(cfg.model)
    check_captioning(eval_specs, bundle.model, zero_stage=cfg.trainer.zero_stage, world_size=world)
    objective = build_objective(cfg.model, bundle, build_loss(cfg.loss, bundle),
                                max_steps=cfg.trainer.max_steps, seed=cfg.seed)
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
                      batch_size=cfg.eval.batch_size, out_dir=run_dir / "eval", model_name=bundle.name,
                      search=eval_search)

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
    watch = PreemptionWatch(preempt_signals) if preempt_signals else None
    trainer = Trainer(engine, loader, settings, checkpointer=checkpointer, loggers=loggers,
                      evaluate=evaluate if eval_specs else None,
                      client_state=lambda step: {"step": step, "data": loader.gather_state()},
                      data_stats=loader.stats, preemption=watch)
    try:
        trainer.fit(start_step)
    finally:
        if watch is not None:
            watch.close()
    if trainer.preempted_at is not None:
        # The checkpoint is complete on every rank (its `latest` marker flipped), so the job can go.
        requeued = bool(info.is_main and cfg.launcher.get("requeue") and requeue_slurm_job())
        distributed.barrier()  # no rank exits (srun --kill-on-bad-exit would end the step) before the requeue
        loggers.log({"step": trainer.preempted_at, "preempted": 1.0})
        loggers.close()
        raise Preempted(trainer.preempted_at, requeued)
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
