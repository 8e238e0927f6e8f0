"""The config schema: every key of the composed config, with its type and its default, declared once.

Two checks use it, so a misspelt or mistyped key fails in one line before any run directory or
worker exists (`clipkit.config.preflight`, and again at the entry point):

- Hydra merges the root schema (`TrainConfig` under conf/train.yaml, `EvalEntryConfig` under
  conf/eval.yaml; `register()` puts them in Hydra's ConfigStore) below every option, so each
  declared key is in the composed config with its default, is set on the command line without
  `+`, and OmegaConf converts and type-checks every value merged into it.
- `validate(cfg)` checks what a merge cannot: keys added with `+`/`++` or in a user's own YAML,
  and the sub-dicts Hydra keeps untyped (`Any`, so `model.lock_image={unlocked_groups: 1}`
  replaces a null): `model.lock_image`, `model.lock_text`, `model.teacher`, `model.pos_stretch` and each
  `eval.sets.<name>` against their dataclasses below; the loss against its `_target_` class's
  constructor (the class signature is the loss's schema); `logger.wandb` against `WandbLogger`'s
  keyword arguments. `model.config` (an open_clip model config) stays free.

A value a group option leaves out takes the default here; the shipped reference options
(trainer/default, data/webdataset, optim/adamw, ...) spell every key out with the same values
(tests/configs/test_config_schema.py checks they agree).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ConfigTypeError, OmegaConfBaseException, ValidationError

from clipkit.errors import ClipkitConfigError

# OmegaConf 2.3 reads the annotations below at runtime; it knows typing.Optional/List/Dict, not `X | None`.
# ruff: noqa: UP006, UP007, UP035, UP045


@dataclass
class LockImageConfig:
    """`model.lock_image` (LiT): open_clip's `lock_image_tower`."""

    unlocked_groups: int = 0          # the last N layer groups stay trainable; 0 locks the whole tower
    freeze_bn_stats: bool = False     # BatchNorm statistics frozen too (ResNet towers)


@dataclass
class LockTextConfig:
    """`model.lock_text`: open_clip's `lock_text_tower`."""

    unlocked_layers: int = 0
    freeze_layer_norm: bool = True


@dataclass
class PosStretchConfig:
    """`model.pos_stretch`: how pretrained text positions reach a longer `model.context_length`
    (docs/texts.md, "Long text context"). null takes these defaults: Long-CLIP's 77 -> 248."""

    mode: str = "longclip"            # longclip (Long-CLIP's knowledge-preserving stretch) | uniform (open_clip's)
    keep: int = 20                    # longclip: the first `keep` positions are copied as they are
    ratio: Optional[float] = 4.0      # longclip: context = keep + ratio * (L - keep); null: derived from it
    freeze_kept: Optional[bool] = None   # the kept positions never train; null: true for longclip, false for uniform


@dataclass
class TeacherConfig:
    """`model.teacher` (loss=distill): a frozen open_clip model from local weights."""

    name: str = MISSING               # an open_clip architecture, or the name `config` is registered under
    pretrained: str = MISSING         # a local weights file
    config: Optional[Dict[str, Any]] = None   # an inline open_clip model config; None: the built-in `name`


@dataclass
class ModelConfig:
    name: str = MISSING               # an open_clip architecture (ViT-B-32, RN50, ...) or the name for `config`
    pretrained: Optional[str] = None  # an open_clip pretrained tag or a local checkpoint; None: random init
    grad_checkpointing: bool = False  # recompute each transformer block in backward
    config: Any = None                # an inline open_clip model config (open_clip's JSON schema), free-form
    patch_dropout: float = 0.0        # FLIP: share of patch tokens dropped in training, in [0, 1)
    unmasked_tuning_steps: int = 0    # FLIP: the last N steps train without patch dropout
    tail_drop_max: int = 0            # TailDrop: drop the last k ~ U{0..N} visual tokens per step
    lock_image: Any = None            # LockImageConfig or None (LiT)
    lock_text: Any = None             # LockTextConfig or None
    teacher: Any = None               # TeacherConfig or None (loss=distill)
    context_length: Optional[int] = None   # text positions; null: the architecture's (Long-CLIP: 248)
    pos_stretch: Any = None           # PosStretchConfig or None (its defaults): pretrained positions -> context_length
    heads: Any = None                 # extra image heads {name: {pool, attn_heads, text_projection}}; null: one head


@dataclass
class TextRoleConfig:
    """One `data.texts.<role>`: where a role's texts come from and how many a step takes. `validate`
    checks each role of the untyped `data.texts` against it, then by `clipkit.data.texts`'s rules
    (docs/texts.md)."""

    sources: List[str] = MISSING      # tar member extensions (txt, long.txt) or json:<field> (dotted path)
    k: int = 1                        # texts per image per step; missing ones are padded and masked
    select: str = "as_is"             # as_is | sample | subcaptions
    probs: Optional[List[float]] = None   # select=sample: one weight per source
    merge: List[int] = field(default_factory=lambda: [1, 3])   # subcaptions: sentences per sub-caption [lo, hi]
    context_length: Optional[int] = None  # tokens for this role; None: the model's context length
    required: bool = True             # a sample without a usable text of this role is skipped (counted)
    negative: bool = False            # hard negatives, never positives


@dataclass
class DataConfig:
    """`data:`; each key is documented in conf/data/webdataset.yaml."""

    mode: str = "epoch"               # epoch | resampled
    train_urls: Any = MISSING         # brace patterns, paths, pipe: commands, sources joined with '::' (or a list)
    weights: Optional[List[float]] = None
    source_names: Optional[List[str]] = None
    epoch_samples: Optional[int] = None
    train_num_samples: Optional[int] = None
    global_batch_size: int = 4096
    workers: int = 8
    streams_per_rank: Optional[int] = None
    shuffle_buffer: int = 5000
    open_retries: int = 3
    retry_delay_s: float = 2.0
    read_timeout_s: float = 60.0      # a shard read that stalls this long counts as failed
    jpeg_draft: bool = True
    record_keys: bool = False
    texts: Any = None                 # {role: TextRoleConfig} or None (one caption per sample from txt)


@dataclass
class OptimConfig:
    """`optim:` AdamW."""

    lr: float = 5.0e-4
    weight_decay: float = 0.2
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1.0e-6


@dataclass
class SchedConfig:
    name: str = "cosine"              # cosine | constant
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0         # cosine: the lr it decays to, as a share of optim.lr


@dataclass
class TrainerConfig:
    """`trainer:`; each key is documented in conf/trainer/default.yaml."""

    max_steps: int = 1000
    epochs: Optional[float] = None
    zero_stage: int = 0
    precision: str = "fp32"
    grad_clip: Optional[float] = 1.0
    compile: bool = False
    accum_steps: int = 1
    nonfinite: str = "stop"
    max_consecutive_skips: int = 10
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 500
    keep_last_checkpoints: int = 2
    resume: Optional[str] = None
    export_open_clip: bool = True
    progress_bar: bool = True
    data_wait_warn_frac: float = 0.2


@dataclass
class EvalSetConfig:
    """One `eval.sets.<name>`: exactly one source (urls, clip_benchmark, csv, jsonl, folder), then
    what runs on it. Read by `clipkit.eval.suite.build_eval_specs`."""

    urls: Any = None                  # webdataset shards: a brace pattern, '::'-joined sources, or a list
    clip_benchmark: Optional[str] = None   # a CLIP_benchmark webdataset root (<root>/<split>/nshards.txt, ...)
    csv: Optional[str] = None         # image path and caption columns
    jsonl: Optional[str] = None
    folder: Optional[str] = None      # <folder>/<class>/<image>
    split: str = "test"               # clip_benchmark: the split folder
    tasks: Optional[List[str]] = None      # None: the source's own (classification, retrieval or both)
    classnames: Optional[List[str]] = None  # None: classnames.txt beside the shards or the folder
    templates: Optional[List[str]] = None   # None: zeroshot_classification_templates.txt
    image_key: str = "image"          # csv/jsonl: the image column
    caption_key: str = "caption"      # csv/jsonl: the caption column
    image_root: Optional[str] = None  # csv/jsonl: relative image paths start here (default: the file's folder)
    caption_beams: int = 1            # captioning task: 1 greedy, > 1 beam search of that width
    # Shards: where the captions are. A member (txt, long.txt: one caption per line) or json:<field>
    # (a string is one caption, a list one per item); see clipkit.data.eval_reader.
    caption_source: str = "txt"
    # selection task: the hard negatives. json:<field> (a list or a string), a member, or `rest`
    # (the caption source's texts after the first, CLIP_benchmark's [true, negative, ...] order).
    negatives_source: str = "json:negatives"
    context_length: Optional[int] = None   # tokens per caption of this set; None: the model's
    # The caption level of the set: short (alt-text, class prompts) or long (dense captions). With
    # extra image heads (model.heads) a long set is scored first by the `perceptual` head.
    captions: str = "short"
    # Image heads that score the set (model.heads; semantic is the tower's own); null: every head
    # of the model, the level's head first. Each head after the first reports as <set>@<head>.
    heads: Optional[List[str]] = None


@dataclass
class EvalSearchConfig:
    """`eval.search`: how retrieval finds neighbours (`clipkit.eval.runner.SearchConfig`)."""

    index: str = "flat"
    nprobe: int = 16
    ef_search: int = 64
    sample_for_recall: int = 1000
    seed: int = 0
    ranks: str = "auto"               # auto | certified | float32: how exact ranks are counted


@dataclass
class EvalConfig:
    every_n_steps: int = 0            # 0: only at the end of training
    batch_size: int = 256
    sets: Dict[str, Any] = field(default_factory=dict)   # {name: EvalSetConfig}
    search: EvalSearchConfig = field(default_factory=EvalSearchConfig)
    tie_tolerance: float = 1.0e-6
    scoring: str = "auto"             # auto | pooled | late_interaction
    cache_dir: Optional[str] = None   # clipkit-eval only
    budget_share: float = 0.25        # training evals: warn once when they take more than this share of the run


@dataclass
class LoggerConfig:
    wandb: Any = None                 # None, or WandbLogger's keyword arguments (project, entity, mode, tags)


@dataclass
class LauncherConfig:
    backend: str = "auto"             # auto | nccl | gloo
    timeout_minutes: float = 30.0      # collectives' timeout; fractions work (0.5: 30 s)
    preempt_signals: List[str] = field(default_factory=lambda: ["SIGUSR1", "SIGTERM"])
    requeue: bool = False
    # The job `clipkit-launch slurm` submits (conf/launcher/slurm.yaml; its flags take precedence).
    nodes: int = 1
    gpus_per_node: int = 8
    tasks_per_node: Optional[int] = None    # None: one per GPU (1 without GPUs)
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None               # per node, sbatch's --mem (480G; 0: all of it)
    time: str = "72:00:00"                  # sbatch's --time
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    sbatch_extra: List[str] = field(default_factory=list)   # more #SBATCH options, e.g. [--exclusive]
    signal_lead_s: int = 120                # --signal=USR1@<lead>: the warning before the time limit
    cluster: Optional[str] = None           # launch/slurm/clusters/<name>.env, sourced by the job


@dataclass
class TrainPaths:
    root: str = MISSING
    data_dir: str = MISSING
    output_dir: str = MISSING
    run_dir: str = MISSING


@dataclass
class TrainConfig:
    """conf/train.yaml: the root of a training run's config."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: Dict[str, Any] = field(default_factory=dict)   # `_target_`, `name` and its class's constructor parameters
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    run_name: str = MISSING
    seed: int = 0
    paths: TrainPaths = field(default_factory=TrainPaths)


@dataclass
class EvalPaths:
    root: str = MISSING
    data_dir: str = MISSING
    output_dir: str = MISSING


@dataclass
class EvalEntryConfig:
    """conf/eval.yaml: the root of a `clipkit-eval` config."""

    run_dir: Optional[str] = None
    model_name: Optional[str] = None
    pretrained: Optional[str] = None
    device: str = "auto"
    paths: EvalPaths = field(default_factory=EvalPaths)
    out_dir: str = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)


# The ConfigStore names conf/train.yaml and conf/eval.yaml list first in their defaults.
ROOTS = {"train": ("clipkit_train_schema", TrainConfig), "eval": ("clipkit_eval_schema", EvalEntryConfig)}
# Untyped (`Any`) sub-dicts with a declared shape.
SUB_SCHEMAS = {"model.lock_image": LockImageConfig, "model.lock_text": LockTextConfig, "model.teacher": TeacherConfig,
               "model.pos_stretch": PosStretchConfig}
HYDRA_KEYS = {"_target_", "_args_", "_partial_", "_recursive_", "_convert_"}
# Keyword arguments of WandbLogger that the recipe supplies, not `logger.wandb`.
WANDB_SET_BY_CLIPKIT = {"run_name", "run_dir", "config"}


def register() -> None:
    """Stores the root schemas in Hydra's ConfigStore (idempotent); clipkit.config calls it on import."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, node in ROOTS.values():
        store.store(name=name, node=node)


def unknown_key(path: str, candidates: typing.Iterable[str]) -> ClipkitConfigError:
    """`model.tail_drop_maxx is not a key of model; did you mean model.tail_drop_max?`"""
    parent, _, key = path.rpartition(".")
    candidates = sorted(c for c in candidates if not c.startswith("_"))
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    where = parent or "the config"
    prefix = f"{parent}." if parent else ""
    hint = f"did you mean {prefix}{close[0]}?" if close else f"its keys are {', '.join(candidates)}"
    return ClipkitConfigError(f"{path} is not a key of {where}; {hint}")


def _type_phrase(tp: Any) -> str | None:
    """int -> 'an integer', Optional[List[float]] -> 'a list of numbers or null'; None for Any."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        phrase = _type_phrase(inner[0]) if len(inner) == 1 else None
        return f"{phrase} or null" if phrase else None
    if origin in (list, List):
        item = _type_phrase(args[0]) if args else None
        plural = {"an integer": "integers", "a number": "numbers", "a string": "strings", "true or false": "booleans"}
        return f"a list of {plural.get(item, 'values')}"
    if origin in (dict, Dict) or tp is dict:
        return "a dict"
    if dataclasses.is_dataclass(tp):
        return "a dict"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp)


def declared_type(schema: type, keys: list[str]) -> Any:
    """The annotation of `keys` (a path inside `schema`), or None where the path leaves the schema."""
    tp: Any = schema
    for key in keys:
        if typing.get_origin(tp) is typing.Union:   # Optional[X] -> X
            inner = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = inner[0] if len(inner) == 1 else Any
        if key.isdigit() and typing.get_origin(tp) in (list, List):
            tp = typing.get_args(tp)[0]
            continue
        if not dataclasses.is_dataclass(tp):
            return None
        hints = typing.get_type_hints(tp)
        if key not in hints:
            return None
        tp = hints[key]
    return tp


def bad_type(path: str, tp: Any, value: Any) -> ClipkitConfigError | None:
    """`trainer.max_steps must be an integer, got 'abc'`; None when `tp` names no type."""
    phrase = _type_phrase(tp)
    if phrase is None:
        return None
    return ClipkitConfigError(f"{path} must be {phrase}, got {value!r}")


def _schema_at(schema: type, keys: list[str]) -> type | None:
    """The dataclass that declares the keys at `keys` inside `schema` (an untyped sub-dict's too)."""
    path = ".".join(keys)
    if path in SUB_SCHEMAS:
        return SUB_SCHEMAS[path]
    if len(keys) == 3 and keys[:2] == ["eval", "sets"]:
        return EvalSetConfig
    tp = declared_type(schema, keys)
    return tp if dataclasses.is_dataclass(tp) else None


def explain(err: BaseException, config_name: str) -> ClipkitConfigError | None:
    """An OmegaConf error from composing (an unknown key in a YAML, a value of the wrong type)
    in clipkit's words, from the declared schema; None if it is neither."""
    schema = ROOTS[config_name][1]
    cause: BaseException | None = err
    while cause is not None and not (isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None)):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return None
    keys = [k for k in re.split(r"[.\[\]]", str(cause.full_key)) if k]
    message = None
    if isinstance(cause, ValidationError):
        message = bad_type(cause.full_key, declared_type(schema, keys), getattr(cause, "value", None))
    elif isinstance(cause, ConfigTypeError) and "deletion" in str(cause):
        message = ClipkitConfigError(f"{cause.full_key} is declared in clipkit/schema.py and cannot be deleted "
                                     f"(~{cause.full_key}); set its value instead")
    elif isinstance(cause, (ConfigKeyError, AttributeError)):
        parent = _schema_at(schema, keys[:-1])
        if parent is not None:
            message = unknown_key(cause.full_key, [f.name for f in dataclasses.fields(parent)])
    where = re.match(r"In '([^']+)':", str(err))   # a key in a YAML file, not on the command line
    if message is not None and where:
        message = ClipkitConfigError(f"{message} (in {where[1]})")
    return message


def load_section(schema: type, node: Any, path: str) -> Any:
    """A sub-dict (`model.lock_image`, `eval.sets.<name>`, ...) as an instance of its dataclass,
    declared defaults filled in; an unknown key or a wrong type is a one-line ClipkitConfigError.
    Resolves interpolations, so call it on a node still in its config."""
    if OmegaConf.is_config(node):
        node = OmegaConf.to_container(node, resolve=True)
    merged = _merged(schema, node, path)
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ClipkitConfigError(f"{path}.{missing[0]} is not set")
    return OmegaConf.to_object(merged)


def _merged(schema: type, raw: Any, path: str) -> DictConfig:
    if not isinstance(raw, dict):
        raise ClipkitConfigError(f"{path} must be a dict (or null), got {raw!r}")
    names = [f.name for f in dataclasses.fields(schema)]
    for key in raw:
        if key not in names:
            raise unknown_key(f"{path}.{key}", names)
    # An interpolation is typed once it is resolved (at the entry point); here only its key counts.
    typed = {k: v for k, v in raw.items() if not (isinstance(v, str) and "${" in v)}
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), typed)
    except ValidationError as err:
        key = str(err.full_key).split(".")[0] if err.full_key else ""
        message = bad_type(f"{path}.{key}", declared_type(schema, [key]), raw.get(key))
        raise (message or ClipkitConfigError(f"{path}: {err.msg}")) from None


def _raw(node: DictConfig, key: str) -> Any:
    """`node[key]` as plain Python, inner interpolations left unresolved."""
    value = node[key]
    return OmegaConf.to_container(value, resolve=False) if OmegaConf.is_config(value) else value


def _check_node(node: DictConfig, schema: type, path: str) -> None:
    """Keys of a dataclass-typed node against its fields, recursively, and the untyped sub-dicts."""
    hints = typing.get_type_hints(schema)
    for key in node.keys():
        sub_path = f"{path}.{key}" if path else str(key)
        if sub_path == "hydra":   # Hydra's own node, in a config composed with return_hydra_config
            continue
        if key not in hints:
            raise unknown_key(sub_path, hints)
        if sub_path in SUB_SCHEMAS:
            raw = _raw(node, key)
            if raw is not None:
                _merged(SUB_SCHEMAS[sub_path], raw, sub_path)
        elif dataclasses.is_dataclass(hints[key]):
            _check_node(node[key], hints[key], sub_path)


def _keyword_parameters(cls: type) -> tuple[set[str], set[str]] | None:
    """(every keyword parameter of `cls`'s constructor, those without a default); None when it
    takes **kwargs, so any key goes."""
    params = [p for p in inspect.signature(cls).parameters.values() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}, {p.name for p in params if p.default is inspect.Parameter.empty}


def loss_parameters(target: str) -> set[str] | None:
    """The keys a loss config may hold: `name`, Hydra's `_target_` and the constructor's parameters
    of the class `target` names; None when the constructor takes **kwargs (anything goes)."""
    signature = _loss_signature(target)
    return None if signature is None else signature[0]


def _loss_signature(target: str) -> tuple[set[str], set[str]] | None:
    from hydra.utils import get_class

    try:
        cls = get_class(target)
    except Exception as err:  # an ImportError, or Hydra's wrapper of it
        raise ClipkitConfigError(f"loss._target_={target!r} cannot be imported: {err}".splitlines()[0]) from None
    params = _keyword_parameters(cls)
    return None if params is None else (params[0] | {"name"} | HYDRA_KEYS, params[1])


def _check_keys(given: typing.Iterable[str], signature: tuple[set[str], set[str]] | None, path: str,
                hint: str) -> None:
    """Keys of a sub-dict whose schema is a constructor's signature: none unknown, none required missing."""
    if signature is None:
        return
    allowed, required = signature
    unknown, missing = sorted(set(given) - allowed), sorted(required - set(given))
    if unknown:
        raise unknown_key(f"{path}.{unknown[0]}", allowed)
    if missing:
        raise ClipkitConfigError(f"{path}.{missing[0]} is not set; {hint}")


def _check_loss(loss: DictConfig) -> None:
    if "_target_" not in loss:
        raise ClipkitConfigError("loss._target_ is not set: choose a loss with loss=<name> (see conf/loss/)")
    _check_keys(loss.keys(), _loss_signature(str(loss._target_)), "loss", f"{loss._target_} needs it")


def _check_texts(data: DictConfig) -> None:
    """`data.texts`: each role against `TextRoleConfig`, then the rules of `clipkit.data.texts`
    (only the keys and types while an interpolation in it cannot be resolved yet)."""
    from clipkit.data.texts import roles_from_config

    raw = _raw(data, "texts")
    if raw is None:
        return
    try:
        resolved = OmegaConf.to_container(data.texts, resolve=True) if OmegaConf.is_config(data.texts) else raw
    except OmegaConfBaseException:
        for name, role in (raw.items() if isinstance(raw, dict) else ()):
            _merged(TextRoleConfig, role if role is not None else {}, f"data.texts.{name}")
        return
    roles_from_config(resolved)


def _check_wandb(wandb: Any) -> None:
    if wandb is None:
        return
    if not isinstance(wandb, dict):
        raise ClipkitConfigError(f"logger.wandb must be a dict (or null), got {wandb!r}")
    from clipkit.loggers import WandbLogger

    allowed, required = _keyword_parameters(WandbLogger)
    _check_keys(wandb, (allowed - WANDB_SET_BY_CLIPKIT, required - WANDB_SET_BY_CLIPKIT), "logger.wandb",
                "choose logger=wandb, which sets every key")


def validate(cfg: DictConfig, config_name: str = "train") -> None:
    """Checks a composed config against the schema of `config_name` (train | eval): every key
    declared, every declared sub-dict's keys and types. Raises a one-line ClipkitConfigError."""
    schema = ROOTS[config_name][1]
    _check_node(cfg, schema, "")
    for name in cfg.eval.sets.keys():
        _merged(EvalSetConfig, _raw(cfg.eval.sets, name), f"eval.sets.{name}")
    if config_name == "train":
        _check_texts(cfg.data)
        _check_loss(cfg.loss)
        _check_wandb(_raw(cfg.logger, "wandb"))
