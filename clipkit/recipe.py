"""A training run in named phases, each given only what it needs:

    check_inputs(cfg) -> Inputs     user mistakes (paths, eval sets, signals, resume target), before
                                    any process group, model or data worker exists
    build_run(cfg, inputs, dist)    towers, loss, objective, engine, eval suite, loggers -> Run
    resume(run, tag)                engine state and the data position -> the loader
    fit(run)                        the step loop (preemption: checkpoint, requeue, stop)
    finish(run)                     final eval, export, curves, results table

Each `build_*` takes only its own config section (`cfg.model`, `cfg.loss`, ...); `run_training`
and `build_run` are the only places that see the whole config.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from clipkit import distributed
from clipkit.checkpoint import Checkpointer, export_open_clip
from clipkit.data import Source, TrainLoader, build_sources, build_train_loader, roles_from_config
from clipkit.engine import build_optimizer, build_schedule, check_schedule, initialize_engine, render_deepspeed_config
from clipkit.errors import ClipkitConfigError
from clipkit.eval.budget import EvalBudget
from clipkit.eval.runner import SearchConfig
from clipkit.eval.scoring import build_scorer
from clipkit.eval.suite import (
    EvalSetSpec,
    EvalSuite,
    build_eval_specs,
    build_search_config,
    check_captioning,
    check_heads,
)
from clipkit.eval.text_context import check_text_context
from clipkit.loggers import MetricLoggers, build_loggers
from clipkit.models import ModelBundle, build_model, build_teacher_model, compile_towers, lock_towers, open_clip_config
from clipkit.models.factory import meta_model
from clipkit.models.heads import SEMANTIC, add_image_heads, head_names, parse_heads
from clipkit.models.positions import check_text_length
from clipkit.objective import ContrastiveObjective, Teacher, check_scored_heads
from clipkit.plots import plot_training_curves
from clipkit.preemption import Preempted, PreemptionWatch, ignore_preemption_signals, parse_signals, requeue_slurm_job
from clipkit.run_dir import RunDir, atomic_write_text
from clipkit.schema import LockImageConfig, LockTextConfig, PosStretchConfig, TeacherConfig, load_section
from clipkit.trainer import NONFINITE_POLICIES, Trainer, TrainerSettings

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


def _quiet_deepspeed_startup() -> None:
    """DeepSpeed's start-up news is no news to a clipkit user: which accelerator it fell back to
    (clipkit says it once, in `announce`), torch's "No CUDA runtime is found" from the C++
    extension loader, and the CPU comm op's "built successfully"."""
    gpu_like = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    if not gpu_like:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def init_distributed(launcher_cfg: DictConfig) -> distributed.DistInfo:
    """Joins (or, for one process, creates) the process group DeepSpeed will use."""
    _quiet_deepspeed_startup()
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
    with contextlib.redirect_stdout(io.StringIO()):  # the comm op's "built successfully"
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(minutes=launcher_cfg.timeout_minutes))
    return info


def announce(cfg: DictConfig, dist: distributed.DistInfo, bundle: ModelBundle, run_dir: RunDir) -> None:
    """One start-up line in clipkit's words (rank 0): what runs where, and what is random."""
    if not dist.is_main:
        return
    device = f"{dist.world_size} x {torch.cuda.get_device_name()}" if torch.cuda.is_available() \
        else f"{dist.world_size} CPU process{'es' if dist.world_size > 1 else ''}"
    weights = f"from {cfg.model.pretrained}" if cfg.model.pretrained else "randomly initialized (model.pretrained unset)"
    log.info("run %s in %s: model %s %s, loss=%s; %d steps of %d samples on %s (DeepSpeed ZeRO-%d, %s)",
             cfg.run_name, run_dir.root, bundle.name, weights, cfg.loss.name, cfg.trainer.max_steps,
             cfg.data.global_batch_size, device, cfg.trainer.zero_stage, cfg.trainer.precision)


def _plain(node) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _section(schema: type, node: Any, path: str) -> Any:
    """An optional sub-dict of `model:` as its schema dataclass (defaults filled), or None."""
    return None if node is None else load_section(schema, node, path)


def build_towers(model_cfg: DictConfig) -> ModelBundle:
    """`model:` section -> open_clip towers (extra image heads, LiT locks, FLIP patch dropout and
    activation checkpointing applied), transforms and tokenizer."""
    bundle = build_model(model_cfg.name, pretrained=model_cfg.pretrained, config=_plain(model_cfg.config),
                         patch_dropout=model_cfg.patch_dropout, context_length=model_cfg.get("context_length"),
                         pos_stretch=_section(PosStretchConfig, model_cfg.get("pos_stretch"), "model.pos_stretch"))
    add_image_heads(bundle.model, parse_heads(_plain(model_cfg.get("heads"))), bundle.name)
    lock_towers(bundle.model, image=_section(LockImageConfig, model_cfg.lock_image, "model.lock_image"),
                text=_section(LockTextConfig, model_cfg.lock_text, "model.lock_text"))
    if model_cfg.grad_checkpointing:
        bundle.model.set_grad_checkpointing(True)
    return bundle


def build_objective(model_cfg: DictConfig, bundle: ModelBundle, loss: torch.nn.Module, *,
                    max_steps: int, seed: int, loss_name: str | None = None,
                    text_roles: tuple[str, ...] = ()) -> ContrastiveObjective:
    """Towers + loss (+ the frozen `model.teacher`, TailDrop, FLIP's unmasked tuning phase).

    `text_roles`: the roles of `data.texts` (empty: one caption per sample). Fails with a
    one-line config error when the loss (`loss=<loss_name>`) needs an output this model or
    these roles lack.
    """
    loss_name = loss_name or type(loss).__name__
    teacher_cfg = _section(TeacherConfig, model_cfg.teacher, "model.teacher")
    teacher = None
    if teacher_cfg is not None:
        teacher_model = build_teacher_model(teacher_cfg.name, teacher_cfg.pretrained, teacher_cfg.config)
        teacher_vocab = open_clip_config(teacher_cfg.name)["text_cfg"].get("vocab_size", 49408)
        student_vocab = bundle.model_cfg["text_cfg"].get("vocab_size", 49408)
        if teacher_vocab != student_vocab:
            raise ClipkitConfigError(f"model.teacher={teacher_cfg.name} has a different tokenizer vocabulary "
                                     f"({teacher_vocab} vs {student_vocab}); the teacher reads the student's "
                                     f"token ids")
        teacher = Teacher(teacher_model)
    unmasked = model_cfg.unmasked_tuning_steps
    objective = ContrastiveObjective(
        bundle.model, loss, teacher=teacher, tail_drop_max=model_cfg.tail_drop_max,
        unmasked_tuning_from_step=max_steps - unmasked + 1 if unmasked else None, seed=seed,
        text_roles=text_roles)
    objective.check_outputs(loss_name, bundle.name, tuple(loss.needs))
    return objective


def build_loss(loss_cfg: DictConfig, bundle: ModelBundle, *, positive_roles: tuple[str, ...] = ()) -> torch.nn.Module:
    """Instantiates `loss._target_`; a pretrained checkpoint's temperature/bias take over the inits.

    `positive_roles`: the `data.texts` roles that are not hard negatives. A role loss whose
    `loss.terms` is null (`loss=multi_text` as shipped) gets one term per such role, weight 1.
    """
    kwargs = {k: v for k, v in OmegaConf.to_container(loss_cfg, resolve=True).items() if k != "name"}
    if "terms" in kwargs and kwargs["terms"] is None and positive_roles:
        kwargs["terms"] = {role: {"texts": role, "weight": 1.0} for role in positive_roles}
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
                 trainer_cfg: DictConfig, global_batch_size: int, world_size: int, load_universal: bool = False):
    """The DeepSpeed engine; `load_universal`: it will resume a ZeRO 1-3 checkpoint of another world size."""
    ds_config = render_deepspeed_config(
        global_batch_size=global_batch_size, world_size=world_size, zero_stage=trainer_cfg.zero_stage,
        precision=trainer_cfg.precision, grad_clip=trainer_cfg.grad_clip, accum_steps=trainer_cfg.accum_steps,
        load_universal=load_universal)
    optimizer = build_optimizer(objective, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay,
                                betas=tuple(optim_cfg.betas), eps=optim_cfg.eps)
    scheduler = build_schedule(optimizer, sched_cfg, total_steps=trainer_cfg.max_steps)
    return initialize_engine(objective, optimizer, scheduler, ds_config)


@dataclass(frozen=True)
class Inputs:
    """What `check_inputs` found valid: the pieces later phases use as they are."""

    sources: list[Source]
    eval_specs: list[EvalSetSpec]
    eval_search: SearchConfig
    preempt_signals: list
    resume_tag: str | None
    resume_universal: bool = False   # the tag was written by another number of ranks at ZeRO 1-3


def model_text_context(model_cfg: DictConfig) -> int:
    """The text positions `model:` will have: `model.context_length`, else the (inline or
    registered) architecture's `text_cfg.context_length` (open_clip's default 77)."""
    if model_cfg.get("context_length"):
        return int(model_cfg.context_length)
    arch = _plain(model_cfg.config) if model_cfg.get("config") is not None else open_clip_config(model_cfg.name)
    return int(arch.get("text_cfg", {}).get("context_length", 77))


def check_text_roles(data_texts: Any, loss_cfg: DictConfig, model_context: int) -> None:
    """The text roles (`data.texts`) against the model and the loss, before any process starts:
    each role's `context_length` fits the model's positions, and a loss term's positives are not
    a `negative: true` role nor its negatives a positive one. Raises ClipkitConfigError."""
    roles = {role.name: role for role in roles_from_config(data_texts) or ()}
    for role in roles.values():
        if role.context_length is not None:
            check_text_length(role.context_length, model_context, f"data.texts.{role.name}.context_length")
    for term, spec in (_plain(loss_cfg.get("terms")) or {}).items():
        if not isinstance(spec, dict):
            continue   # the loss's own constructor names what is wrong with the term
        positive, negative = roles.get(spec.get("texts")), roles.get(spec.get("negatives"))
        if positive is not None and positive.negative:
            raise ClipkitConfigError(f"loss.terms.{term}.texts={positive.name} is a role of hard negatives "
                                     f"(data.texts.{positive.name}.negative=true); name a positive role")
        if negative is not None and not negative.negative:
            raise ClipkitConfigError(f"loss.terms.{term}.negatives={negative.name} is a positive role; set "
                                     f"data.texts.{negative.name}.negative=true or name a role of hard negatives")


def check_model_heads(model_cfg: DictConfig, loss_cfg: DictConfig) -> None:
    """`model.heads` against the architecture (on the meta device: no weights) and the loss's terms,
    before any process starts: the same one-line errors the build would give, without a run directory."""
    specs = parse_heads(_plain(model_cfg.get("heads")))
    terms = _plain(loss_cfg.get("terms")) or {}
    named = {spec.get("image", SEMANTIC) for spec in terms.values() if isinstance(spec, dict)} or {SEMANTIC}
    if not specs and named == {SEMANTIC}:
        return
    arch = _plain(model_cfg.config) if model_cfg.get("config") is not None else open_clip_config(model_cfg.name)
    model = meta_model(arch)
    add_image_heads(model, specs, model_cfg.name)
    check_scored_heads(head_names(model), named, loss_cfg.name, model_cfg.name)


def check_inputs(cfg: DictConfig) -> Inputs:
    """Every user input that can be checked without a process group: shard paths, eval sets,
    search and scoring keys, preemption signals, the resume target. Cheap; raises ClipkitConfigError."""
    sources = build_sources(cfg.data)
    eval_specs = build_eval_specs(cfg.eval.sets)
    eval_search = build_search_config(cfg.eval)
    build_scorer(cfg.eval.scoring)
    check_schedule(cfg.sched)
    check_text_roles(cfg.data.get("texts"), cfg.loss, model_text_context(cfg.model))
    check_model_heads(cfg.model, cfg.loss)
    if cfg.trainer.nonfinite not in NONFINITE_POLICIES:
        raise ClipkitConfigError(f"trainer.nonfinite={cfg.trainer.nonfinite!r} is not one of "
                                 f"{', '.join(NONFINITE_POLICIES)}")
    # Batch split, precision, ZeRO stage and accumulation, for the world size the launcher set.
    world_size = distributed.env_dist_info().world_size
    render_deepspeed_config(
        global_batch_size=cfg.data.global_batch_size, world_size=world_size,
        zero_stage=cfg.trainer.zero_stage, precision=cfg.trainer.precision, grad_clip=cfg.trainer.grad_clip,
        accum_steps=cfg.trainer.accum_steps)
    if cfg.eval.cache_dir:
        # The cache is keyed by (model, set, step): two runs of one architecture would share
        # entries, and a run never re-embeds the same weights, so there is nothing to reuse.
        raise ClipkitConfigError("eval.cache_dir is for clipkit-eval; training evals embed new weights "
                                 "at every step, so unset it for clipkit-train")
    try:
        preempt_signals = parse_signals(cfg.launcher.preempt_signals or [])
    except ValueError as err:
        raise ClipkitConfigError(str(err)) from None
    checkpointer = Checkpointer(RunDir(cfg.paths.run_dir).checkpoints)
    tag = checkpointer.resolve_resume(cfg.trainer.resume)
    # A requeued job may get another number of nodes: refused here, before any engine, where it cannot follow.
    universal = tag is not None and checkpointer.check_resume(tag, world_size=world_size,
                                                              zero_stage=cfg.trainer.zero_stage)
    return Inputs(sources, eval_specs, eval_search, preempt_signals, tag, universal)


@dataclass
class Run:
    """Everything one training run holds; built by `build_run`, the loader added by `resume`."""

    cfg: DictConfig
    inputs: Inputs
    dist: distributed.DistInfo
    run_dir: RunDir
    bundle: ModelBundle
    objective: ContrastiveObjective
    engine: Any
    checkpointer: Checkpointer
    suite: EvalSuite
    loggers: MetricLoggers
    loader: TrainLoader | None = None
    start_step: int = 0
    budget: EvalBudget = field(default_factory=lambda: EvalBudget(0.25))

    def evaluate(self, step: int, *, in_training: bool = True) -> dict[str, float]:
        """Collective: every eval set on the current weights, in eval mode; the metrics carry the
        eval's time split per set (`clipkit.eval.budget`)."""
        start = time.perf_counter()
        self.engine.eval()
        metrics = self.suite.run(self.engine.module, device=self.engine.device, step=step)
        self.engine.train()
        timing = self.budget.record(step, self.suite.last_timings, time.perf_counter() - start,
                                    in_training=in_training)
        return {**metrics, **timing}


def _write_run_files(run_dir: RunDir, cfg: DictConfig, bundle: ModelBundle) -> None:
    run_dir.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir.config, OmegaConf.to_yaml(cfg, resolve=True))
    preprocess_cfg = dict(getattr(bundle.model.visual, "preprocess_cfg", {}))
    atomic_write_text(run_dir.open_clip_config, json.dumps(
        {"model_cfg": bundle.model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2))


def build_run(cfg: DictConfig, inputs: Inputs, dist: distributed.DistInfo) -> Run:
    """Towers, loss and objective, the DeepSpeed engine, the eval suite and the loggers."""
    seed_everything(cfg.seed)
    run_dir = RunDir(cfg.paths.run_dir)
    bundle = build_towers(cfg.model)
    check_captioning(inputs.eval_specs, bundle.model, zero_stage=cfg.trainer.zero_stage, world_size=dist.world_size)
    check_text_context(inputs.eval_specs, bundle.model)   # before any step: a too-long set fails now, not at eval
    check_heads(inputs.eval_specs, head_names(bundle.model))
    roles = roles_from_config(cfg.data.get("texts")) or ()
    loss = build_loss(cfg.loss, bundle, positive_roles=tuple(role.name for role in roles if not role.negative))
    objective = build_objective(cfg.model, bundle, loss, max_steps=cfg.trainer.max_steps, seed=cfg.seed,
                                loss_name=cfg.loss.name, text_roles=tuple(cfg.data.get("texts") or ()))
    if cfg.trainer.compile:
        log.info("torch.compile: %s (compiled on the first step)", ", ".join(compile_towers(bundle.model)))
    engine = build_engine(objective, optim_cfg=cfg.optim, sched_cfg=cfg.sched, trainer_cfg=cfg.trainer,
                          global_batch_size=cfg.data.global_batch_size, world_size=dist.world_size,
                          load_universal=inputs.resume_universal)
    distributed.apply_timeout(timedelta(minutes=cfg.launcher.timeout_minutes))   # DeepSpeed's groups too
    if dist.is_main:
        _write_run_files(run_dir, cfg, bundle)
    announce(cfg, dist, bundle, run_dir)
    suite = EvalSuite(inputs.eval_specs, preprocess=bundle.preprocess_val, tokenizer=bundle.tokenizer,
                      batch_size=cfg.eval.batch_size, out_dir=run_dir.eval, model_name=bundle.name,
                      search=inputs.eval_search, scorer=build_scorer(cfg.eval.scoring, loss.needs))
    loggers = build_loggers(OmegaConf.to_container(cfg.logger.wandb, resolve=True) if cfg.logger.wandb else None,
                            run_dir=run_dir, run_name=cfg.run_name,
                            config=OmegaConf.to_container(cfg, resolve=True), is_main=dist.is_main)
    checkpointer = Checkpointer(run_dir.checkpoints, keep_last=cfg.trainer.keep_last_checkpoints)
    return Run(cfg, inputs, dist, run_dir, bundle, objective, engine, checkpointer, suite, loggers,
               budget=EvalBudget(cfg.eval.budget_share))


def resume(run: Run, tag: str | None) -> None:
    """Loads checkpoint `tag` (None: a fresh start) into the engine and opens the training data
    at the saved position: `run.start_step` and `run.loader` are set."""
    cfg = run.cfg
    data_seed, data_state = cfg.seed, None
    if tag is not None:
        client_state = run.checkpointer.load(run.engine, tag, universal=run.inputs.resume_universal)
        run.start_step, data_state = int(client_state["step"]), client_state.get("data")
        if data_state is None:
            # Checkpoints from before exact resume: reshuffle rather than replay step 0's data.
            log.warning("checkpoint %s has no data position; the data stream restarts from a new seed", tag)
            data_seed = cfg.seed + 7919 * run.start_step
    run.loader = build_train_loader(
        cfg.data, run.inputs.sources, preprocess=run.bundle.preprocess_train, tokenize=run.bundle.tokenizer,
        rank=run.dist.rank, world_size=run.dist.world_size, seed=data_seed, resume=data_state,
        keys_dir=run.run_dir.data_keys if cfg.data.record_keys else None,
        worker_init_fn=ignore_preemption_signals)
    if data_state is not None and run.loader.batches != run.start_step:
        # One batch per step per rank: anything else means the checkpoint is inconsistent.
        raise ClipkitConfigError(f"checkpoint {tag}: data position {run.loader.batches} batches, step {run.start_step}")


def fit(run: Run) -> None:
    """Trains from `run.start_step` to `trainer.max_steps`; on a preemption signal, checkpoints,
    requeues the SLURM job when `launcher.requeue`, and raises `Preempted` on every rank."""
    cfg, loader = run.cfg, run.loader
    settings = TrainerSettings(
        max_steps=cfg.trainer.max_steps, global_batch_size=cfg.data.global_batch_size,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        checkpoint_every_n_steps=cfg.trainer.checkpoint_every_n_steps,
        eval_every_n_steps=cfg.eval.every_n_steps, progress_bar=cfg.trainer.progress_bar,
        data_wait_warn_frac=cfg.trainer.data_wait_warn_frac, accum_steps=cfg.trainer.accum_steps,
        nonfinite=cfg.trainer.nonfinite, max_consecutive_skips=cfg.trainer.max_consecutive_skips)
    signals = run.inputs.preempt_signals
    watch = PreemptionWatch(signals) if signals else None
    trainer = Trainer(run.engine, loader, settings, checkpointer=run.checkpointer, loggers=run.loggers,
                      evaluate=run.evaluate if run.inputs.eval_specs else None,
                      client_state=lambda step: {"step": step, "data": loader.gather_state()},
                      data_stats=loader.stats, preemption=watch, batch_keys=lambda: loader.last_batch_keys)
    run.budget.start_training()
    try:
        trainer.fit(run.start_step)
    finally:
        if watch is not None:
            watch.close()
    if trainer.preempted_at is not None:
        # Logged first: a requeue makes SLURM end the job's processes at once.
        run.loggers.log({"step": trainer.preempted_at, "preempted": 1.0})
        run.loggers.close()
        # The checkpoint is complete on every rank (its `latest` marker flipped), so the job can go.
        requeued = bool(run.dist.is_main and cfg.launcher.requeue and requeue_slurm_job())
        distributed.barrier()  # no rank exits (srun --kill-on-bad-exit would end the step) before the requeue
        raise Preempted(trainer.preempted_at, requeued)


def finish(run: Run) -> dict[str, float]:
    """The final eval (also for an already-finished run), export, curves and the results table."""
    max_steps = run.cfg.trainer.max_steps
    final = run.evaluate(max_steps, in_training=False) if run.inputs.eval_specs else {}
    if final:
        run.loggers.log({"step": max_steps, **final})
    distributed.barrier()
    if run.dist.is_main:
        if run.cfg.trainer.export_open_clip:
            export_open_clip(run.run_dir.root)
        if run.run_dir.metrics.exists():
            plot_training_curves(run.run_dir.metrics, run.run_dir.curves)
        if final:
            print(run.suite.results_table(), flush=True)
    run.loggers.close()
    distributed.barrier()
    return {k: v for k, v in final.items() if not k.startswith("eval_time/")}   # the time split is logged only


def run_training(cfg: DictConfig) -> dict[str, Any]:
    """The whole job: returns the final eval metrics (`{set/metric: value}`)."""
    inputs = check_inputs(cfg)
    run = build_run(cfg, inputs, init_distributed(cfg.launcher))
    resume(run, inputs.resume_tag)
    fit(run)
    return finish(run)
