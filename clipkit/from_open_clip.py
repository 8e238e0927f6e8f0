"""`clipkit-train --from-open-clip-args "<open_clip_train flags>"`: the same run as clipkit overrides.

    clipkit-train --from-open-clip-args "--train-data '/data/cc12m/{0000..2175}.tar' --train-num-samples 10968539 \\
        --batch-size 320 --epochs 32 --model RN50" --world-size 4

`translate` parses the flags exactly as `python -m open_clip_train.main` does (its parser,
open_clip_train/params.py, is mirrored in `OPEN_CLIP_FLAGS`; the tests compare the two)
and returns Hydra overrides for conf/train.yaml, the flags it could not carry over with a
reason each, and notes on what changed meaning on the way. A flag left out still means
open_clip_train's default (RN50, 32 epochs, warmup 10000, no clipping, amp), so the values
that decide the training math are always written out; bookkeeping flags (names, workers,
log cadence) only when given. docs/from-open-clip.md has the table.

Keys the translator maps to only once clipkit has them are listed in `AVAILABLE`: flip an entry
when its key composes (tests/unit/test_from_open_clip.py checks each against conf/).

No torch or open_clip import: this runs before anything heavy.
"""

from __future__ import annotations

import argparse
import math
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from clipkit.config import CONF_DIR

# clipkit keys for open_clip_train features -> whether they compose in this tree (flip when they land).
AVAILABLE: dict[str, bool] = {
    "trainer.accum_steps": True,         # --accum-freq: exact gradient accumulation
    "model.grad_checkpointing": True,    # --grad-checkpointing
}
# --epochs is translated to trainer.max_steps even though clipkit has trainer.epochs: open_clip_train's
# epoch rounds its step count up to a multiple of --workers, which trainer.epochs does not.


class Flag(NamedTuple):
    """One open_clip_train option: argparse type (bool = store_true), default, nargs, choices."""

    type: type
    default: Any = None
    nargs: str | None = None
    choices: tuple[str, ...] | None = None


_PRECISIONS = ("amp", "amp_bf16", "amp_bfloat16", "bf16", "fp16", "pure_bf16", "pure_fp16", "fp32")

# open_clip_train 3.x `parse_args`, in its order. The lr/beta/eps defaults of None are
# filled from the model name afterwards (`open_clip_defaults`).
OPEN_CLIP_FLAGS: dict[str, Flag] = {
    "--train-data": Flag(str),
    "--train-data-upsampling-factors": Flag(str),
    "--val-data": Flag(str),
    "--train-num-samples": Flag(int),
    "--val-num-samples": Flag(int),
    "--dataset-type": Flag(str, "auto", choices=("webdataset", "csv", "synthetic", "auto")),
    "--dataset-resampled": Flag(bool, False),
    "--csv-separator": Flag(str, "\t"),
    "--csv-img-key": Flag(str, "filepath"),
    "--csv-caption-key": Flag(str, "title"),
    "--imagenet-val": Flag(str),
    "--imagenet-v2": Flag(str),
    "--cache-dir": Flag(str),
    "--logs": Flag(str, "./logs/"),
    "--log-local": Flag(bool, False),
    "--name": Flag(str),
    "--workers": Flag(int, 4),
    "--batch-size": Flag(int, 64),
    "--epochs": Flag(int, 32),
    "--epochs-cooldown": Flag(int),
    "--lr": Flag(float),
    "--beta1": Flag(float),
    "--beta2": Flag(float),
    "--eps": Flag(float),
    "--wd": Flag(float, 0.2),
    "--momentum": Flag(float),
    "--warmup": Flag(int, 10000),
    "--opt": Flag(str, "adamw"),
    "--use-bn-sync": Flag(bool, False),
    "--skip-scheduler": Flag(bool, False),
    "--lr-scheduler": Flag(str, "cosine"),
    "--lr-cooldown-end": Flag(float, 0.0),
    "--lr-cooldown-power": Flag(float, 1.0),
    "--save-frequency": Flag(int, 1),
    "--save-most-recent": Flag(bool, False),
    "--zeroshot-frequency": Flag(int, 2),
    "--val-frequency": Flag(int, 1),
    "--resume": Flag(str),
    "--precision": Flag(str, "amp", choices=_PRECISIONS),
    "--model": Flag(str, "RN50"),
    "--pretrained": Flag(str, ""),
    "--pretrained-image": Flag(bool, False),
    "--lock-image": Flag(bool, False),
    "--lock-image-unlocked-groups": Flag(int, 0),
    "--lock-image-freeze-bn-stats": Flag(bool, False),
    "--image-mean": Flag(float, nargs="+"),
    "--image-std": Flag(float, nargs="+"),
    "--image-interpolation": Flag(str, choices=("bicubic", "bilinear", "random")),
    "--image-resize-mode": Flag(str, choices=("shortest", "longest", "squash")),
    "--aug-cfg": Flag(str, {}, nargs="*"),
    "--grad-checkpointing": Flag(bool, False),
    "--local-loss": Flag(bool, False),
    "--gather-with-grad": Flag(bool, False),
    "--force-context-length": Flag(int),
    "--force-image-size": Flag(int, nargs="+"),
    "--force-quick-gelu": Flag(bool, False),
    "--force-patch-dropout": Flag(float),
    "--force-custom-text": Flag(bool, False),
    "--torchscript": Flag(bool, False),
    "--torchcompile": Flag(bool, False),
    "--trace": Flag(bool, False),
    "--accum-freq": Flag(int, 1),
    "--device": Flag(str, "cuda"),
    "--dist-url": Flag(str),
    "--dist-backend": Flag(str),
    "--report-to": Flag(str, ""),
    "--wandb-notes": Flag(str, ""),
    "--wandb-project-name": Flag(str, "open-clip"),
    "--debug": Flag(bool, False),
    "--copy-codebase": Flag(bool, False),
    "--horovod": Flag(bool, False),
    "--ddp-static-graph": Flag(bool, False),
    "--no-set-device-rank": Flag(bool, False),
    "--seed": Flag(int, 0),
    "--grad-clip-norm": Flag(float),
    "--lock-text": Flag(bool, False),
    "--lock-text-unlocked-layers": Flag(int, 0),
    "--lock-text-freeze-layer-norm": Flag(bool, False),
    "--log-every-n-steps": Flag(int, 100),
    "--coca-caption-loss-weight": Flag(float, 2.0),
    "--coca-contrastive-loss-weight": Flag(float, 1.0),
    "--remote-sync": Flag(str),
    "--remote-sync-frequency": Flag(int, 300),
    "--remote-sync-protocol": Flag(str, "s3", choices=("s3", "fsspec")),
    "--delete-previous-checkpoint": Flag(bool, False),
    "--distill-model": Flag(str),
    "--distill-pretrained": Flag(str),
    "--use-bnb-linear": Flag(str),
    "--siglip": Flag(bool, False),
    "--loss-dist-impl": Flag(str),
}

_NO_TRANSFORM_KEY = "clipkit uses open_clip's own train/val transforms for the model; there is no key to change them"
_NO_ARCH_KEY = "no override key; give an inline open_clip model config (model.config) with the change instead"
_COOLDOWN = "no const-cooldown schedule in clipkit (sched=cosine|constant)"
_NO_REMOTE_SYNC = "clipkit does not sync runs to remote storage"
_DISTILL = ("not translated: clipkit's counterpart is loss=distill with model.teacher={name,pretrained,config}, "
            "but its weighting has not been checked against open_clip_train's DistillClipLoss")

# Given flags with no clipkit counterpart: flag -> reason.
NO_EQUIVALENT: dict[str, str] = {
    "--csv-separator": "clipkit trains from webdataset shards only (`clipkit-shards csv` converts a CSV)",
    "--csv-img-key": "clipkit trains from webdataset shards only (`clipkit-shards csv` converts a CSV)",
    "--csv-caption-key": "clipkit trains from webdataset shards only (`clipkit-shards csv` converts a CSV)",
    "--imagenet-v2": ("no ImageNetV2 reader: its class folders are named 0..999, which eval.sets.<name>.folder "
                      "would sort as strings"),
    "--cache-dir": "no key; open_clip downloads pretrained weights to its default cache",
    "--log-local": "clipkit writes its logs from rank 0 only",
    "--momentum": "used by timm optimizers only; clipkit's optimizer is AdamW",
    "--use-bn-sync": "clipkit does not convert BatchNorm to SyncBatchNorm",
    "--pretrained-image": "no timm ImageNet initialization of the image tower",
    "--image-mean": _NO_TRANSFORM_KEY,
    "--image-std": _NO_TRANSFORM_KEY,
    "--image-interpolation": _NO_TRANSFORM_KEY,
    "--image-resize-mode": _NO_TRANSFORM_KEY,
    "--aug-cfg": _NO_TRANSFORM_KEY,
    "--force-context-length": _NO_ARCH_KEY,
    "--force-image-size": _NO_ARCH_KEY,
    "--force-quick-gelu": _NO_ARCH_KEY,
    "--force-custom-text": _NO_ARCH_KEY,
    "--torchscript": "clipkit does not script models",
    "--trace": "clipkit does not trace models",
    "--torchcompile": "clipkit has no torch.compile switch",
    "--horovod": "clipkit runs on torch.distributed (torchrun or SLURM), not Horovod",
    "--no-set-device-rank": "clipkit always selects cuda:<LOCAL_RANK>; give each rank all its node's GPUs",
    "--debug": "no switch; Hydra's hydra.verbose=clipkit logs clipkit at DEBUG",
    "--copy-codebase": "clipkit does not copy the code; the run dir keeps config.yaml and .hydra/",
    "--remote-sync": _NO_REMOTE_SYNC,
    "--remote-sync-frequency": _NO_REMOTE_SYNC,
    "--remote-sync-protocol": _NO_REMOTE_SYNC,
    "--wandb-notes": "no key for wandb notes",
    "--use-bnb-linear": "clipkit has no bitsandbytes layers",
    "--distill-model": _DISTILL,
    "--distill-pretrained": _DISTILL,
    "--epochs-cooldown": _COOLDOWN,
    "--lr-cooldown-end": _COOLDOWN,
    "--lr-cooldown-power": _COOLDOWN,
}

# Given flags whose effect clipkit has without any override: flag -> note.
NOTHING_TO_SET: dict[str, str] = {
    "--local-loss": ("nothing to set: clipkit always computes the exact global-batch loss and its full gradient, "
                     "with fused kernels whose memory is linear in the batch"),
    "--gather-with-grad": "nothing to set: clipkit's cross-rank losses always give the full gradient",
    "--ddp-static-graph": "nothing to set: there is no DDP; DeepSpeed owns the gradient all-reduce",
    "--dist-url": "nothing to set: ranks rendezvous through torchrun's or SLURM's environment",
    "--save-most-recent": "nothing to set: clipkit's `latest` marker always names the newest checkpoint",
    "--loss-dist-impl": ("nothing to set: clipkit's fused losses do their own exchange (loss.exchange=gather|ring "
                         "for siglip), with the same loss either way"),
    "--val-num-samples": "nothing to set: clipkit's eval reads every sample of the set",
}


class OpenClipArgsError(ValueError):
    """The flags would make open_clip_train itself exit with a usage error."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print usage and exit
        raise OpenClipArgsError(message)


def _parser() -> argparse.ArgumentParser:
    """open_clip_train's parser with every default suppressed, so the namespace holds only given flags."""
    parser = _Parser(prog="open_clip_train.main", add_help=False)
    for flag, spec in OPEN_CLIP_FLAGS.items():
        if spec.type is bool:
            parser.add_argument(flag, action="store_true", default=argparse.SUPPRESS)
        else:
            parser.add_argument(flag, type=spec.type, nargs=spec.nargs, choices=spec.choices,
                                default=argparse.SUPPRESS)
    return parser


def _dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


def open_clip_defaults(model: str) -> dict[str, float]:
    """open_clip_train's `get_default_params`: Adam betas/eps by whether the name contains "vit"."""
    if "vit" in model.lower():
        return {"lr": 5.0e-4, "beta1": 0.9, "beta2": 0.98, "eps": 1.0e-6}
    return {"lr": 5.0e-4, "beta1": 0.9, "beta2": 0.999, "eps": 1.0e-8}


def parse_open_clip_args(argv: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """-> (every open_clip_train arg with its effective value, the given ones, leftover tokens).

    Keys are argparse dests (`train_data`). Both `--flag value` and `--flag=value` work, and
    unambiguous prefixes (`--train-num 10`) as in argparse; a bad value raises OpenClipArgsError.
    """
    namespace, extra = _parser().parse_known_args(list(argv))
    given = vars(namespace)
    args = {_dest(flag): spec.default for flag, spec in OPEN_CLIP_FLAGS.items()}
    args.update(given)
    if "timm" not in args["opt"]:
        for name, value in open_clip_defaults(args["model"]).items():
            if args[name] is None:
                args[name] = value
    return args, given, extra


@dataclass
class Translation:
    """clipkit-train overrides for one open_clip_train command line.

    overrides: Hydra overrides, in order (each one argv element: shell-quote it to print).
    unmapped: (flag, reason) for what has no clipkit counterpart here.
    notes: what carried over with a change of meaning, or needs nothing set.
    """

    overrides: list[str] = field(default_factory=list)
    unmapped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    world_size: int = 1


_BARE = re.compile(r"[A-Za-z_/][A-Za-z0-9_./-]*")
_NOT_STRINGS = {"true", "false", "null", "nan", "inf"}


def hydra_value(value: Any) -> str:
    """A Python value as Hydra override grammar; strings are quoted unless plainly a word or path.

    Inside quotes, Hydra reads `\\'` as a quote, a backslash as itself unless it precedes a
    quote or the closing one, and `${` as an interpolation (escaped as `\\${`).
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if _BARE.fullmatch(text) and text.lower() not in _NOT_STRINGS:
        return text
    text = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, text)
    return "'" + text.replace("'", "\\'").replace("${", "\\${") + "'"


def shell_word(word: str) -> str:
    """`word` for a POSIX shell: bare if safe, double quotes when that is enough, else shlex.quote."""
    if shlex.quote(word) == word:
        return word
    if not set(word) & set('"$`\\!'):
        return f'"{word}"'
    return shlex.quote(word)


def _model_option(name: str) -> str | None:
    """The conf/model option that is exactly open_clip's built-in `name`, if there is one."""
    path = CONF_DIR / "model" / f"{name}.yaml"
    if not path.is_file():
        return None
    lines = {line.strip() for line in path.read_text(encoding="utf-8").splitlines()}
    return name if f"name: {name}" in lines and "config: null" in lines else None


def _model(a: dict[str, Any], given: dict[str, Any], t: Translation, available: Mapping[str, bool]) -> None:
    name = a["model"]
    if ":" in name:
        t.unmapped.append(("--model", f"{name}: clipkit builds registered open_clip architectures only "
                                      f"(open_clip.list_models()), not hf-hub:/local-dir: models"))
    elif _model_option(name):
        t.overrides.append(f"model={name}")
    else:
        t.overrides += [f"model.name={hydra_value(name)}", "model.config=null"]
    if a["pretrained"]:
        t.overrides.append(f"model.pretrained={hydra_value(a['pretrained'])}")
    if a["lock_image"]:
        t.overrides.append("model.lock_image=" + hydra_value({
            "unlocked_groups": a["lock_image_unlocked_groups"], "freeze_bn_stats": a["lock_image_freeze_bn_stats"]}))
    else:
        for flag in ("--lock-image-unlocked-groups", "--lock-image-freeze-bn-stats"):
            if _dest(flag) in given:
                t.notes.append(f"{flag}: no effect without --lock-image, as in open_clip_train")
    if a["lock_text"]:
        # clipkit's lock_text defaults freeze_layer_norm to true; open_clip_train's flag defaults to false.
        t.overrides.append("model.lock_text=" + hydra_value({
            "unlocked_layers": a["lock_text_unlocked_layers"], "freeze_layer_norm": a["lock_text_freeze_layer_norm"]}))
    else:
        for flag in ("--lock-text-unlocked-layers", "--lock-text-freeze-layer-norm"):
            if _dest(flag) in given:
                t.notes.append(f"{flag}: no effect without --lock-text, as in open_clip_train")
    if a["force_patch_dropout"] is not None:
        t.overrides.append(f"model.patch_dropout={hydra_value(a['force_patch_dropout'])}")
    if a["grad_checkpointing"]:
        if available["model.grad_checkpointing"]:
            t.overrides.append("model.grad_checkpointing=true")
        else:
            t.unmapped.append(("--grad-checkpointing", "no equivalent yet (model.grad_checkpointing is not in "
                                                       "this clipkit): same results, more activation memory"))


def _loss(a: dict[str, Any], given: dict[str, Any], t: Translation) -> None:
    # open_clip_train's create_loss: distill, then "coca" in the model name, then --siglip.
    if a["distill_model"]:
        return  # NO_EQUIVALENT reports it
    if "coca" in a["model"].lower():
        t.overrides += ["loss=coca", f"loss.caption_loss_weight={hydra_value(a['coca_caption_loss_weight'])}",
                        f"loss.clip_loss_weight={hydra_value(a['coca_contrastive_loss_weight'])}"]
        if a["siglip"]:
            t.notes.append("--siglip: ignored for a CoCa model, as in open_clip_train (loss=coca)")
        return
    for flag in ("--coca-caption-loss-weight", "--coca-contrastive-loss-weight"):
        if _dest(flag) in given:
            t.notes.append(f"{flag}: no effect without a CoCa model, as in open_clip_train")
    if a["siglip"]:
        t.overrides.append("loss=siglip")


def _dataset_type(a: dict[str, Any], urls: str) -> str:
    """open_clip_train's `--dataset-type auto`: by the file extension."""
    if a["dataset_type"] != "auto":
        return a["dataset_type"]
    ext = urls.split(".")[-1]
    return "csv" if ext in ("csv", "tsv") else "webdataset" if ext == "tar" else "unknown"


def _shard_count(source: str) -> int:
    from braceexpand import braceexpand  # webdataset's dependency; pure Python

    return sum(1 for _ in braceexpand(source))


def _source_weights(urls: str, factors: str | None) -> list[float] | None:
    """clipkit's per-source weights for open_clip_train's resampling, which draws a *shard*
    with probability ∝ its source's factor (1 without factors): a source weighs factor × shards."""
    sources = urls.split("::")
    if len(sources) < 2:
        return None
    scale = [float(f) for f in factors.split("::")] if factors else [1.0] * len(sources)
    return [f * _shard_count(s) for f, s in zip(scale, sources)]


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int, workers: int, accum_freq: int) -> int:
    """Optimizer steps in one open_clip_train webdataset epoch (get_wds_dataset, then // accum_freq):
    ceil(N / (b·W)) batches, rounded up to a multiple of the dataloader workers."""
    batches = math.ceil(num_samples / (batch_size * world_size))
    workers = max(1, workers)
    return math.ceil(batches / workers) * workers // accum_freq


def _data(a: dict[str, Any], given: dict[str, Any], t: Translation) -> int | None:
    """Data overrides; returns optimizer steps per open_clip_train epoch, None when unknown."""
    urls, n, accum = a["train_data"], a["train_num_samples"], a["accum_freq"]
    if not urls:
        t.unmapped.append(("--train-data", "not given: clipkit-train needs training shards (for evaluation alone: "
                                           "clipkit-eval model_name=... pretrained=...)"))
        return None
    kind = _dataset_type(a, urls)
    if kind != "webdataset":
        why = {"csv": "clipkit trains from webdataset shards only; `clipkit-shards csv` converts a CSV",
               "synthetic": "clipkit has no synthetic dataset",
               "unknown": "open_clip_train infers the type from a .tar/.csv extension and would stop; "
                          "pass --dataset-type webdataset"}[kind]
        flag = "--dataset-type" if "dataset_type" in given else "--train-data"
        t.unmapped.append((flag, f"{kind} dataset type: {why}"))
        return None
    t.overrides += ["data=webdataset", f"data.train_urls={hydra_value(urls)}"]
    factors = a["train_data_upsampling_factors"]
    if a["dataset_resampled"]:
        t.overrides.append("data.mode=resampled")
        if n:
            t.overrides.append(f"data.epoch_samples={n}")
        if factors and len(factors.split("::")) != len(urls.split("::")):
            t.unmapped.append(("--train-data-upsampling-factors",
                               f"{len(factors.split('::'))} factors for {len(urls.split('::'))} sources"))
        else:
            weights = _source_weights(urls, factors)
            if weights:
                t.overrides.append(f"data.weights={hydra_value(weights)}")
                t.notes.append("data.weights: open_clip_train resamples shards (each ∝ its source's factor), "
                               "clipkit resamples sources, so each source weighs factor × its shard count")
    elif factors:
        t.unmapped.append(("--train-data-upsampling-factors", "open_clip_train accepts it only with "
                                                              "--dataset-resampled"))
    t.overrides.append(f"data.global_batch_size={a['batch_size'] * t.world_size * accum}")
    t.notes.append(f"data.global_batch_size = --batch-size {a['batch_size']} per GPU × world size {t.world_size}"
                   + (f" × --accum-freq {accum}" if accum > 1 else ""))
    if "workers" in given:
        t.overrides.append(f"data.workers={a['workers']}")
    if not n:
        t.unmapped.append(("--train-num-samples", "not given: open_clip_train reads it from sizes.json beside "
                                                  "the shards; without it trainer.max_steps, the checkpoint and eval "
                                                  "cadences (and data.epoch_samples when resampled) cannot be derived"))
        return None
    return steps_per_epoch(n, a["batch_size"], t.world_size, a["workers"], accum)


def _optim(a: dict[str, Any], given: dict[str, Any], t: Translation) -> None:
    if a["opt"] != "adamw":
        t.unmapped.append(("--opt", f"{a['opt']}: clipkit's optimizer is AdamW"))
        return
    t.overrides += [f"optim.lr={hydra_value(a['lr'])}", f"optim.weight_decay={hydra_value(a['wd'])}",
                    f"optim.betas={hydra_value([a['beta1'], a['beta2']])}", f"optim.eps={hydra_value(a['eps'])}"]
    if not {"beta1", "beta2", "eps"} <= set(given):
        vit = "vit" in a["model"].lower()
        t.notes.append(f"optim.betas/eps: open_clip_train's defaults for a model name {'with' if vit else 'without'} "
                       f"\"vit\" ({'0.9, 0.98, 1e-6' if vit else '0.9, 0.999, 1e-8'}), where not given")


def _sched(a: dict[str, Any], t: Translation) -> None:
    if a["skip_scheduler"]:
        t.overrides += ["sched=constant", "sched.warmup_steps=0"]
        return
    if a["lr_scheduler"] == "const":
        t.overrides.append("sched=constant")
    elif a["lr_scheduler"] != "cosine":
        t.unmapped.append(("--lr-scheduler", f"{a['lr_scheduler']}: clipkit has sched=cosine|constant"))
    t.overrides.append(f"sched.warmup_steps={a['warmup']}")


def _precision(a: dict[str, Any], t: Translation) -> None:
    p = a["precision"]
    if p in ("fp16", "pure_fp16"):
        t.unmapped.append(("--precision", f"{p}: clipkit has no fp16 (trainer.precision=fp32|bf16)"))
        return
    t.overrides.append(f"trainer.precision={'fp32' if p == 'fp32' else 'bf16'}")
    if p == "amp":
        t.notes.append("--precision amp (fp16 autocast + loss scaling) -> trainer.precision=bf16, the nearest clipkit "
                       "has: bf16 weights and activations, fp32 master weights and loss math, no loss scaling")
    elif p != "fp32":
        t.notes.append(f"--precision {p} -> trainer.precision=bf16: DeepSpeed bf16 (bf16 weights and activations, "
                       f"fp32 master weights and loss math), not autocast")


def _trainer(a: dict[str, Any], given: dict[str, Any], t: Translation, spe: int | None,
             available: Mapping[str, bool]) -> None:
    epochs, accum = a["epochs"], a["accum_freq"]
    if spe is not None:
        t.overrides.append(f"trainer.max_steps={spe * epochs}")
        t.notes.append(f"trainer.max_steps = --epochs {epochs} × {spe} steps per open_clip_train epoch "
                       f"(ceil(ceil(N / (b·W)) / workers) × workers{' // accum' if accum > 1 else ''} "
                       f"with N={a['train_num_samples']}, b={a['batch_size']}, W={t.world_size}, "
                       f"workers={max(1, a['workers'])})")
    _precision(a, t)
    clip = a["grad_clip_norm"]
    t.overrides.append(f"trainer.grad_clip={hydra_value(clip)}")
    if accum > 1:
        if available["trainer.accum_steps"]:
            t.overrides.append(f"trainer.accum_steps={accum}")
        else:
            t.unmapped.append(("--accum-freq", f"no equivalent yet (trainer.accum_steps is not in this clipkit): "
                                               f"data.global_batch_size already holds all {accum} micro-batches, "
                                               f"which gives open_clip_train's loss, but each step runs them as one "
                                               f"batch (more activation memory)"))
    resume = a["resume"]
    if resume == "latest":
        t.overrides.append("trainer.resume=auto")
        t.notes.append("--resume latest -> trainer.resume=auto: continue from the newest checkpoint, or start "
                       "fresh when there is none")
    elif resume:
        t.unmapped.append(("--resume", f"{resume}: clipkit resumes its own DeepSpeed checkpoints only "
                                       f"(trainer.resume=latest|auto|<tag>); model.pretrained=<file> loads "
                                       f"the weights alone, without optimizer state or step"))
    if spe is not None:
        t.overrides.append(f"trainer.checkpoint_every_n_steps={a['save_frequency'] * spe}")
    elif "save_frequency" in given:
        t.unmapped.append(("--save-frequency", "needs --train-num-samples to turn epochs into steps"))
    if a["delete_previous_checkpoint"]:
        t.overrides.append("trainer.keep_last_checkpoints=1")
    if "log_every_n_steps" in given:
        t.overrides.append(f"trainer.log_every_n_steps={a['log_every_n_steps']}")


def _eval(a: dict[str, Any], given: dict[str, Any], t: Translation, spe: int | None) -> None:
    """open_clip_train evaluates only what it is given; clipkit runs all sets at one cadence and at the end."""
    t.overrides.append("eval=none")
    sets: list[tuple[str, dict[str, Any], int]] = []
    if a["imagenet_val"]:
        if a["zeroshot_frequency"] == 0:
            t.notes.append("--imagenet-val: skipped, --zeroshot-frequency 0 turns zero-shot off in open_clip_train")
        else:
            sets.append(("imagenet", {"folder": a["imagenet_val"], "tasks": ["zeroshot_classification"]},
                         a["zeroshot_frequency"]))
            t.notes.append(f"eval.sets.imagenet: needs classnames.txt and zeroshot_classification_templates.txt in "
                           f"{a['imagenet_val']} (open_clip's IMAGENET_CLASSNAMES and OPENAI_IMAGENET_TEMPLATES; "
                           f"docs/from-open-clip.md writes them)")
    if a["val_data"]:
        kind = _dataset_type(a, a["val_data"])
        if kind != "webdataset":
            t.unmapped.append(("--val-data", f"{kind}: clipkit reads webdataset val shards here (eval.sets.<name>."
                                             f"csv wants a comma-separated file with image/caption columns)"))
        elif a["val_frequency"] == 0:
            t.notes.append("--val-data: skipped, --val-frequency 0 turns validation off in open_clip_train")
        else:
            sets.append(("val", {"urls": a["val_data"], "tasks": ["retrieval"]}, a["val_frequency"]))
            t.notes.append("eval.sets.val: recall@1/5/10 and mean/median rank, as open_clip_train's val metrics; "
                           "no validation loss")
    for name, spec, _ in sets:
        t.overrides.append(f"+eval.sets.{name}={hydra_value(spec)}")
    if sets and spe is not None:
        every = math.gcd(*(freq for _, _, freq in sets))
        t.overrides.append(f"eval.every_n_steps={every * spe}")
        if len({freq for _, _, freq in sets}) > 1:
            t.notes.append(f"eval.every_n_steps: every {every} epoch(s), the gcd of the zero-shot and val "
                           f"frequencies; clipkit runs all sets at one cadence")
    elif sets:
        t.notes.append("eval.every_n_steps: only at the end (epochs cannot become steps without --train-num-samples)")
    if not a["imagenet_val"] and "zeroshot_frequency" in given:
        t.notes.append("--zeroshot-frequency: no effect without --imagenet-val, as in open_clip_train")
    if not a["val_data"] and "val_frequency" in given:
        t.notes.append("--val-frequency: no effect without --val-data, as in open_clip_train")


def _logger(a: dict[str, Any], given: dict[str, Any], t: Translation) -> None:
    # open_clip_train tests substrings of --report-to, "all" meaning both.
    report = a["report_to"]
    wandb = "wandb" in report or "all" in report
    if wandb:
        t.overrides.append("logger=wandb")
        if "wandb_project_name" in given:
            t.overrides.append(f"logger.wandb.project={hydra_value(a['wandb_project_name'])}")
    elif "wandb_project_name" in given:
        t.notes.append("--wandb-project-name: no effect without --report-to wandb, as in open_clip_train")
    if "tensorboard" in report or "all" in report:
        t.unmapped.append(("--report-to", "tensorboard: clipkit logs to metrics.jsonl (and wandb), not TensorBoard"))


def _run(a: dict[str, Any], given: dict[str, Any], t: Translation) -> None:
    dist_backend = a["dist_backend"]
    if dist_backend in ("nccl", "gloo"):
        t.overrides.append(f"launcher.backend={dist_backend}")
    elif dist_backend:
        t.unmapped.append(("--dist-backend", f"{dist_backend}: clipkit's launcher.backend is auto|nccl|gloo"))
    if a["device"] != "cuda":
        t.unmapped.append(("--device", f"{a['device']}: clipkit uses CUDA when it is available, else the CPU"))
    if a["name"]:
        t.overrides.append(f"run_name={hydra_value(a['name'])}")
    if "logs" in given:
        if str(a["logs"]).lower() == "none":
            t.unmapped.append(("--logs", "none: clipkit always writes its run directory"))
        else:
            t.overrides.append(f"paths.output_dir={hydra_value(a['logs'])}")
    if "seed" in given:
        t.overrides.append(f"seed={a['seed']}")


# Flags the functions above read; every other open_clip_train flag is in NO_EQUIVALENT or NOTHING_TO_SET.
HANDLED = frozenset({
    "--model", "--pretrained", "--lock-image", "--lock-image-unlocked-groups", "--lock-image-freeze-bn-stats",
    "--lock-text", "--lock-text-unlocked-layers", "--lock-text-freeze-layer-norm", "--force-patch-dropout",
    "--grad-checkpointing", "--siglip", "--coca-caption-loss-weight", "--coca-contrastive-loss-weight",
    "--train-data", "--train-data-upsampling-factors", "--train-num-samples", "--dataset-type",
    "--dataset-resampled", "--batch-size", "--workers", "--accum-freq", "--opt", "--lr", "--wd", "--beta1",
    "--beta2", "--eps", "--skip-scheduler", "--lr-scheduler", "--warmup", "--epochs", "--precision",
    "--grad-clip-norm", "--resume", "--save-frequency", "--delete-previous-checkpoint", "--log-every-n-steps",
    "--imagenet-val", "--val-data", "--zeroshot-frequency", "--val-frequency", "--report-to",
    "--wandb-project-name", "--dist-backend", "--device", "--name", "--logs", "--seed",
})


def _unknown(argv: Sequence[str], extra: list[str], t: Translation) -> None:
    """Tokens open_clip_train's parser would reject: each unknown flag (with the values after it),
    and stray words."""
    argv, position = list(argv), 0
    for token in extra:
        position = argv.index(token, position) + 1 if token in argv[position:] else position
        before = argv[position - 2] if position >= 2 else ""
        if token.startswith("-") and len(token) > 1:
            t.unmapped.append((token.split("=", 1)[0], "not an open_clip_train flag"))
        elif not (before.startswith("-") and before in extra):
            t.unmapped.append((token, "stray argument: open_clip_train takes no positional arguments"))


def translate(argv: Sequence[str], world_size: int | None = None, *,
              available: Mapping[str, bool] = AVAILABLE) -> Translation:
    """open_clip_train flags -> clipkit-train overrides (see the module docstring).

    Args:
        argv: the flags, one token each (`shlex.split` of a command line), without the program.
        world_size: GPUs in the run (nodes × GPUs per node): open_clip_train's --batch-size and
            its epochs are per GPU. None assumes 1 and says so in `notes`.
        available: which in-flight clipkit keys to map to (`AVAILABLE`).
    Raises:
        OpenClipArgsError: a value open_clip_train's parser would reject (`--lr abc`).
    """
    if world_size is not None and world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    args, given_by_dest, extra = parse_open_clip_args(argv)
    given = {dest: args[dest] for dest in given_by_dest}
    t = Translation(world_size=world_size or 1)
    if world_size is None:
        t.notes.append("world size 1 assumed: pass --world-size N (nodes × GPUs per node); open_clip_train's "
                       "--batch-size and epochs are per GPU")
    _model(args, given, t, available)
    _loss(args, given, t)
    spe = _data(args, given, t)
    _optim(args, given, t)
    _sched(args, t)
    _trainer(args, given, t, spe, available)
    _eval(args, given, t, spe)
    _logger(args, given, t)
    _run(args, given, t)
    for flag in OPEN_CLIP_FLAGS:
        if _dest(flag) in given and flag in NO_EQUIVALENT:
            t.unmapped.append((flag, NO_EQUIVALENT[flag]))
        elif _dest(flag) in given and flag in NOTHING_TO_SET:
            t.notes.append(f"{flag}: {NOTHING_TO_SET[flag]}")
    if args["local_loss"] and not args["gather_with_grad"]:
        t.notes.append("--local-loss without --gather-with-grad: open_clip_train drops the gradient through the "
                       "other ranks' features there; clipkit's run follows the full gradient")
    _unknown(argv, extra, t)
    return t


def format_command(t: Translation, program: str = "clipkit-train") -> str:
    """The translation as shell text: notes and unmapped flags as comments, then the command."""
    lines = [f"# {note}" for note in t.notes]
    if t.world_size > 1:
        lines.append(f"# launch on {t.world_size} GPUs: torchrun --nnodes=... --nproc_per_node=... -m clipkit.train "
                     f"<overrides>, or launch/slurm/train.sbatch <overrides>")
    if t.unmapped:
        lines.append("# not translated:")
        lines += [f"#   {flag}: {reason}" for flag, reason in t.unmapped]
    words = [program, *(shell_word(o) for o in t.overrides)]
    lines.append(" \\\n    ".join(words))
    return "\n".join(lines)


def _cli_args(argv: list[str]) -> tuple[str, int | None]:
    """`--from-open-clip-args TEXT [--world-size N]` (either as `--x=v`); the flags as one string."""
    text, world_size, rest = None, None, list(argv)
    while rest:
        token = rest.pop(0)
        name, eq, value = token.partition("=")
        if name not in ("--from-open-clip-args", "--world-size"):
            raise OpenClipArgsError(f"unexpected argument {token!r}; usage: clipkit-train --from-open-clip-args "
                                    f"\"<open_clip_train flags>\" [--world-size N]")
        if not eq:
            if not rest:
                raise OpenClipArgsError(f"{name} needs a value")
            value = rest.pop(0)
        if name == "--world-size":
            if not value.isdigit() or int(value) < 1:
                raise OpenClipArgsError(f"--world-size must be a positive integer, got {value!r}")
            world_size = int(value)
        else:
            text = value
    if text is None:
        raise OpenClipArgsError("--from-open-clip-args needs the open_clip_train flags as one quoted string")
    return text, world_size


def main(argv: Sequence[str] | None = None) -> None:
    """`clipkit-train --from-open-clip-args "..." [--world-size N]`: prints the command, trains nothing."""
    try:
        text, world_size = _cli_args(list(sys.argv[1:] if argv is None else argv))
        print(format_command(translate(shlex.split(text), world_size)))
    except ValueError as err:  # OpenClipArgsError, or shlex's unclosed quote
        sys.exit(f"clipkit-train: error: {err}")
