"""open_clip_train command lines -> clipkit-train overrides (clipkit/from_open_clip.py).

The parser is checked against the installed open_clip_train's, every override produced here
is composed through Hydra, and the CLI runs end to end in a subprocess.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from clipkit.config import CONF_DIR
from clipkit.from_open_clip import (
    AVAILABLE,
    HANDLED,
    NO_EQUIVALENT,
    NOTHING_TO_SET,
    OPEN_CLIP_FLAGS,
    OpenClipArgsError,
    format_command,
    hydra_value,
    open_clip_defaults,
    parse_open_clip_args,
    shell_word,
    steps_per_epoch,
    translate,
)

REPO = Path(__file__).resolve().parents[2]

# open_clip's README (4 GPUs), with a schedule and a model as its other examples give them.
CC12M = ("--train-data '/data/cc12m/cc12m-train-{0000..2175}.tar' --train-num-samples 10968539 "
         "--dataset-type webdataset --batch-size 320 --precision amp --workers 4 "
         "--imagenet-val /data/imagenet/validation/ --epochs 32 --lr 1e-3 --wd 0.1 --warmup 2000 --model RN50 "
         "--report-to wandb --local-loss --gather-with-grad")
SIGLIP = ("--model ViT-B-16-SigLIP --siglip --train-data '/data/laion/{00000..41407}.tar' "
          "--train-num-samples 400000000 --dataset-resampled --batch-size 1024 --epochs 10 --lr 1e-3 --wd 0.2 "
          "--warmup 5000 --precision amp_bf16 --grad-clip-norm 1.0 --workers 8 --save-frequency 1 "
          "--name siglip-b16 --logs /ckpt")
LIT = ("--model ViT-B-32 --pretrained laion2b_s34b_b79k --lock-image --lock-image-unlocked-groups 2 "
       "--lock-image-freeze-bn-stats --train-data=/data/cc3m/{00000..00331}.tar --train-num-samples=2905954 "
       "--batch-size=256 --epochs=5 --lr=5e-4 --warmup=1000")
FLIP_RESUME = ("--model ViT-L-14 --force-patch-dropout 0.5 --resume latest --train-data /data/x/{000..099}.tar "
               "--train-num-samples 100000 --batch-size 100 --epochs 2 --beta2 0.95 --precision fp32 "
               "--lock-text --lock-text-unlocked-layers 2 --save-frequency 0 --delete-previous-checkpoint")
MIXTURE = ("--model coca_ViT-B-32 --train-data '/a/{0..9}.tar::/b/{0..4}.tar' --dataset-resampled "
           "--train-data-upsampling-factors 1::3 --train-num-samples 50000 --batch-size 64 --epochs 3 "
           "--lr-scheduler const --coca-caption-loss-weight 1.5 --val-data '/v/{0..1}.tar' --val-frequency 1 "
           "--imagenet-val /in/val --zeroshot-frequency 2 --dist-backend gloo --seed 7 "
           "--name \"it's a run\" --logs ./logs/ --log-every-n-steps 25 --report-to wandb "
           "--wandb-project-name proj")
# open_clip's README single-GPU example: CSV data and TensorBoard, which clipkit does not have.
README_CSV = ("--save-frequency 1 --zeroshot-frequency 1 --report-to tensorboard "
              "--train-data=/path/to/train_data.csv --val-data=/path/to/validation_data.csv "
              "--csv-img-key filepath --csv-caption-key title --imagenet-val=/path/to/imagenet/root/val/ "
              "--warmup 10000 --batch-size=128 --lr=1e-3 --wd=0.1 --epochs=30 --workers=8 --model RN50")
COMMANDS = {"cc12m": (CC12M, 4), "siglip": (SIGLIP, 32), "lit": (LIT, None), "flip_resume": (FLIP_RESUME, 2),
            "mixture": (MIXTURE, 2), "readme_csv": (README_CSV, 1),
            "skip_scheduler": ("--train-data /d/{0..3}.tar --train-num-samples 10 --skip-scheduler", 1)}


def translated(name: str, **kwargs):
    text, world_size = COMMANDS[name]
    return translate(shlex.split(text), world_size, **kwargs)


def composed(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def open_clip_parser() -> argparse.ArgumentParser:
    """The parser open_clip_train.params.parse_args builds (captured at its parse_args call)."""
    from open_clip_train import params

    class Captured(Exception):
        pass

    original = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        raise Captured(self)

    argparse.ArgumentParser.parse_args = capture
    try:
        params.parse_args([])
    except Captured as got:
        return got.args[0]
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError("open_clip_train.params.parse_args built no parser")


def test_flag_table_mirrors_open_clip_train():
    actions = {a.option_strings[0]: a for a in open_clip_parser()._actions if a.option_strings[0] != "-h"}
    assert list(actions) == list(OPEN_CLIP_FLAGS)
    for flag, action in actions.items():
        spec = OPEN_CLIP_FLAGS[flag]
        if isinstance(action, argparse._StoreTrueAction):
            assert spec.type is bool and spec.default is False, flag
            continue
        assert (action.type or str, action.default, action.nargs) == (spec.type, spec.default, spec.nargs), flag
        assert (tuple(action.choices) if action.choices else None) == spec.choices, flag


def test_beta_eps_defaults_follow_open_clip_train():
    from open_clip_train.params import get_default_params

    for model in ("RN50", "ViT-B-32", "vit_medium_patch16_gap_256", "coca_ViT-B-32", "convnext_base", "EVA02-B-16"):
        assert open_clip_defaults(model) == get_default_params(model)


@pytest.mark.parametrize("name", [n for n in COMMANDS])
def test_parsed_values_equal_open_clip_train(name):
    from open_clip_train.params import parse_args

    argv = shlex.split(COMMANDS[name][0])
    ours, _, extra = parse_open_clip_args(argv)
    assert ours == vars(parse_args(argv)) and extra == []


@pytest.mark.parametrize("model,betas,eps", [
    ("ViT-B-32", [0.9, 0.98], 1e-6), ("RN50", [0.9, 0.999], 1e-8), ("coca_ViT-B-32", [0.9, 0.98], 1e-6),
    ("convnext_base", [0.9, 0.999], 1e-8),
])
def test_betas_and_eps_depend_on_vit_in_the_model_name(model, betas, eps):
    overrides = translate(["--model", model]).overrides
    assert f"optim.betas={hydra_value(betas)}" in overrides and f"optim.eps={hydra_value(eps)}" in overrides
    given = translate(["--model", model, "--beta1", "0.8", "--beta2", "0.95", "--eps", "1e-7"]).overrides
    assert "optim.betas=[0.8,0.95]" in given and "optim.eps=1e-07" in given


def test_readme_cc12m_run():
    t = translated("cc12m")
    # 10,968,539 / (320 · 4) -> 8,570 batches -> 8,572 (a multiple of 4 workers) per epoch, × 32 epochs.
    assert steps_per_epoch(10968539, 320, 4, 4, 1) == 8572
    assert t.overrides == [
        "model=RN50", "data=webdataset", "data.train_urls='/data/cc12m/cc12m-train-{0000..2175}.tar'",
        "data.global_batch_size=1280", "data.workers=4", "optim.lr=0.001", "optim.weight_decay=0.1",
        "optim.betas=[0.9,0.999]", "optim.eps=1e-08", "sched.warmup_steps=2000", "trainer.max_steps=274304",
        "trainer.precision=bf16", "trainer.grad_clip=null", "trainer.checkpoint_every_n_steps=8572", "eval=none",
        "+eval.sets.imagenet={folder:/data/imagenet/validation/,tasks:[zeroshot_classification]}",
        "eval.every_n_steps=17144", "logger=wandb"]
    assert t.unmapped == []
    assert any(n.startswith("--local-loss: nothing to set") for n in t.notes)
    assert any(n.startswith("--gather-with-grad: nothing to set") for n in t.notes)
    assert any("amp" in n and "bf16" in n for n in t.notes)


def test_world_size_defaults_to_one_and_says_so():
    t = translate(shlex.split(CC12M))
    assert "data.global_batch_size=320" in t.overrides and "trainer.max_steps=1096960" in t.overrides
    assert t.notes[0].startswith("world size 1 assumed")
    assert not translate(shlex.split(CC12M), 1).notes[0].startswith("world size")


def test_siglip_run():
    assert translated("siglip").overrides == [
        "model.name=ViT-B-16-SigLIP", "model.config=null", "loss=siglip", "data=webdataset",
        "data.train_urls='/data/laion/{00000..41407}.tar'", "data.mode=resampled", "data.epoch_samples=400000000",
        "data.global_batch_size=32768", "data.workers=8", "optim.lr=0.001", "optim.weight_decay=0.2",
        "optim.betas=[0.9,0.98]", "optim.eps=1e-06", "sched.warmup_steps=5000", "trainer.max_steps=122080",
        "trainer.precision=bf16", "trainer.grad_clip=1.0", "trainer.checkpoint_every_n_steps=12208", "eval=none",
        "run_name=siglip-b16", "paths.output_dir=/ckpt"]


def test_lit_run():
    t = translated("lit")
    assert t.overrides == [
        "model=ViT-B-32", "model.pretrained=laion2b_s34b_b79k",
        "model.lock_image={unlocked_groups:2,freeze_bn_stats:true}", "data=webdataset",
        "data.train_urls='/data/cc3m/{00000..00331}.tar'", "data.global_batch_size=256", "optim.lr=0.0005",
        "optim.weight_decay=0.2", "optim.betas=[0.9,0.98]", "optim.eps=1e-06", "sched.warmup_steps=1000",
        "trainer.max_steps=56760", "trainer.precision=bf16", "trainer.grad_clip=null",
        "trainer.checkpoint_every_n_steps=11352", "eval=none"]
    assert t.unmapped == []


def test_patch_dropout_lock_text_and_resume():
    t = translated("flip_resume")
    assert t.overrides == [
        "model.name=ViT-L-14", "model.config=null", "model.lock_text={unlocked_layers:2,freeze_layer_norm:false}",
        "model.patch_dropout=0.5", "data=webdataset", "data.train_urls='/data/x/{000..099}.tar'",
        "data.global_batch_size=200", "optim.lr=0.0005", "optim.weight_decay=0.2", "optim.betas=[0.9,0.95]",
        "optim.eps=1e-06", "sched.warmup_steps=10000", "trainer.max_steps=1000", "trainer.precision=fp32",
        "trainer.grad_clip=null", "trainer.resume=auto", "trainer.checkpoint_every_n_steps=0",
        "trainer.keep_last_checkpoints=1", "eval=none"]
    assert t.unmapped == []


def test_mixture_coca_evals_and_bookkeeping():
    t = translated("mixture")
    # 50,000 / (64 · 2) -> 391 -> 392 batches (4 workers) per epoch. open_clip_train draws a shard
    # ∝ its source's factor, so the sources weigh 1·10 and 3·5.
    assert t.overrides == [
        "model.name=coca_ViT-B-32", "model.config=null", "loss=coca", "loss.caption_loss_weight=1.5",
        "loss.clip_loss_weight=1.0", "data=webdataset", "data.train_urls='/a/{0..9}.tar::/b/{0..4}.tar'",
        "data.mode=resampled", "data.epoch_samples=50000", "data.weights=[10.0,15.0]", "data.global_batch_size=128",
        "optim.lr=0.0005", "optim.weight_decay=0.2", "optim.betas=[0.9,0.98]", "optim.eps=1e-06", "sched=constant",
        "sched.warmup_steps=10000", "trainer.max_steps=1176", "trainer.precision=bf16", "trainer.grad_clip=null",
        "trainer.checkpoint_every_n_steps=392", "trainer.log_every_n_steps=25", "eval=none",
        "+eval.sets.imagenet={folder:/in/val,tasks:[zeroshot_classification]}",
        "+eval.sets.val={urls:'/v/{0..1}.tar',tasks:[retrieval]}", "eval.every_n_steps=392", "logger=wandb",
        "logger.wandb.project=proj", "launcher.backend=gloo", "run_name='it\\'s a run'",
        "paths.output_dir='./logs/'", "seed=7"]
    assert any(n.startswith("eval.every_n_steps: every 1 epoch") for n in t.notes)


def test_skip_scheduler_is_a_constant_lr_without_warmup():
    assert "sched=constant" in translated("skip_scheduler").overrides
    assert "sched.warmup_steps=0" in translated("skip_scheduler").overrides


def test_unmapped_flags_come_with_reasons():
    t = translated("readme_csv")
    unmapped = dict(t.unmapped)
    assert set(unmapped) == {"--train-data", "--save-frequency", "--val-data", "--report-to", "--csv-img-key",
                             "--csv-caption-key"}
    assert "clipkit-shards csv" in unmapped["--train-data"] and "TensorBoard" in unmapped["--report-to"]
    t = translate(shlex.split(
        "--train-data /d/{0..3}.tar --precision fp16 --torchcompile --resume /ckpt/epoch_3.pt --opt timm/lamb "
        "--grad-checkpointing --accum-freq 4 --lr-scheduler const-cooldown --epochs-cooldown 2 --no-such-flag 3 "
        "--model hf-hub:timm/ViT-B-16-SigLIP stray"))
    unmapped = dict(t.unmapped)
    assert all(reason for reason in unmapped.values())
    assert "no fp16" in unmapped["--precision"] and "torch.compile" in unmapped["--torchcompile"]
    assert "model.pretrained=<file>" in unmapped["--resume"] and "AdamW" in unmapped["--opt"]
    # Both exist in clipkit: exact accumulation and open_clip's activation checkpointing.
    assert "--grad-checkpointing" not in unmapped and "--accum-freq" not in unmapped
    assert {"model.grad_checkpointing=true", "trainer.accum_steps=4"} <= set(t.overrides)
    assert "--epochs-cooldown" in unmapped and "const-cooldown" in unmapped["--lr-scheduler"]
    assert unmapped["--no-such-flag"] == "not an open_clip_train flag" and "3" not in unmapped
    assert unmapped["stray"].startswith("stray argument") and "hf-hub" in unmapped["--model"]
    assert "--train-num-samples" in unmapped  # epochs cannot become steps
    assert not any(o.startswith("trainer.max_steps") for o in t.overrides)


def test_accum_freq_multiplies_the_global_batch_and_divides_the_steps():
    t = translate(shlex.split("--train-data /d/{0..9}.tar --train-num-samples 1000000 --batch-size 256 "
                              "--accum-freq 2 --epochs 1"), 8)
    # ceil(1e6 / 2048) = 489 -> 492 (4 workers) batches -> 246 optimizer steps.
    assert "data.global_batch_size=4096" in t.overrides and "trainer.max_steps=246" in t.overrides


def test_argparse_semantics():
    long_form = translate(["--batch-size", "32", "--model", "ViT-B-32"]).overrides
    assert translate(["--batch-size=32", "--model=ViT-B-32"]).overrides == long_form
    assert translate(["--batch-s", "32", "--mod", "ViT-B-32"]).overrides == long_form  # argparse prefixes
    for bad in (["--lr", "abc"], ["--precision", "fp8"], ["--lock", "1"], ["--batch-size"]):
        with pytest.raises(OpenClipArgsError):
            translate(bad)


def test_every_flag_is_handled_or_explained():
    assert not (HANDLED & set(NO_EQUIVALENT)) and not (HANDLED & set(NOTHING_TO_SET))
    assert HANDLED | set(NO_EQUIVALENT) | set(NOTHING_TO_SET) == set(OPEN_CLIP_FLAGS)


@pytest.mark.parametrize("name", [n for n in COMMANDS])
def test_every_override_composes(name):
    t = translated(name)
    cfg = OmegaConf.to_container(composed(t.overrides), resolve=True)
    args = parse_open_clip_args(shlex.split(COMMANDS[name][0]))[0]
    assert cfg["optim"]["betas"] == [args["beta1"], args["beta2"]] and cfg["optim"]["eps"] == args["eps"]
    if any(o.startswith("data.train_urls=") for o in t.overrides):
        assert cfg["data"]["train_urls"] == args["train_data"]  # braces and '::' kept verbatim
    if args["imagenet_val"]:
        assert cfg["eval"]["sets"]["imagenet"]["folder"] == args["imagenet_val"]
    if args["name"]:
        assert cfg["run_name"] == args["name"]


def test_translated_sections_pass_clipkit_checks(tmp_path):
    """The mixture's data, engine and optimizer sections build as clipkit-train would build them."""
    import torch

    from clipkit.data import build_sources
    from clipkit.engine import build_optimizer, render_deepspeed_config

    for source, count in (("a", 10), ("b", 5)):
        (tmp_path / source).mkdir()
        for i in range(count):
            (tmp_path / source / f"{i}.tar").touch()
    t = translate(shlex.split(MIXTURE.replace("'/a/", f"'{tmp_path}/a/").replace("::/b/", f"::{tmp_path}/b/")), 2)
    cfg = composed(t.overrides)
    sources = build_sources(cfg.data)
    # A shard of /b is 3x as likely as one of /a in open_clip_train: P(/a) = 10 / (10 + 3·5) here too.
    assert [len(s.urls) for s in sources] == [10, 5] and [s.weight for s in sources] == [10.0, 15.0]
    ds = render_deepspeed_config(global_batch_size=cfg.data.global_batch_size, world_size=2,
                                 zero_stage=cfg.trainer.zero_stage, precision=cfg.trainer.precision,
                                 grad_clip=cfg.trainer.grad_clip)
    assert ds["train_micro_batch_size_per_gpu"] == 64 and ds["gradient_clipping"] == 0.0
    build_optimizer(torch.nn.Linear(2, 2), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                    betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)


def test_switched_on_features_replace_the_unmapped_entries():
    argv = shlex.split("--train-data /d/{0..9}.tar --train-num-samples 1000 --epochs 3 --accum-freq 2 "
                       "--grad-checkpointing")
    t = translate(argv, 1, available=dict.fromkeys(AVAILABLE, True))
    assert {"trainer.accum_steps=2", "model.grad_checkpointing=true"} <= set(t.overrides)
    # --epochs stays a step count: open_clip_train rounds an epoch's steps up to a multiple of --workers.
    assert any(o.startswith("trainer.max_steps") for o in t.overrides) and t.unmapped == []


@pytest.mark.parametrize("key", list(AVAILABLE))
def test_available_table_matches_this_tree(key):
    """Flip AVAILABLE[key] when the key lands: this fails until the table agrees with conf/."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        composed([f"{key}=1"])
        composes = True
    except (HydraException, OmegaConfBaseException):
        composes = False
    assert composes == AVAILABLE[key]


@pytest.mark.parametrize("text", ["plain", "/data/{0..9}.tar", "it's", "a\\b", "end\\", "quote\\'d", "${x}",
                                  "a b::c", "true", "1e-3", "./rel"])
def test_string_values_survive_hydra_and_the_shell(text):
    override = f"run_name={hydra_value(text)}"
    assert OmegaConf.to_container(composed([override]), resolve=True)["run_name"] == text
    assert shlex.split(shell_word(override)) == [override]


def test_docs_imagenet_snippet_makes_a_folder_clipkit_can_score(tmp_path):
    """docs/from-open-clip.md's snippet writes the class names and templates eval.sets.imagenet reads."""
    import re

    from clipkit.eval.suite import build_eval_specs

    doc = (REPO / "docs" / "from-open-clip.md").read_text(encoding="utf-8")
    code = re.search(r"python - \S+ <<'EOF'\n(.*?)\nEOF", doc, re.S).group(1)
    for i in range(1000):  # ImageNet's synset folders sort in IMAGENET_CLASSNAMES order
        (tmp_path / f"n{i:08d}").mkdir()
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=300)
    spec, = build_eval_specs({"imagenet": {"folder": str(tmp_path), "tasks": ["zeroshot_classification"]}})
    assert len(spec.classnames) == 1000 and spec.classnames[0] == "tench"
    assert spec.templates[0] == "a bad photo of a {c}."


def test_cli_prints_a_runnable_command(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "clipkit.train", "--from-open-clip-args", CC12M, "--world-size", "4"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == format_command(translated("cc12m")) + "\n"
    # bash reads the printed text back into exactly the overrides (comments, quotes, line continuations).
    echo = subprocess.run(["bash", "-c", 'clipkit-train() { printf "%s\\0" "$@"; }\n' + proc.stdout],
                          capture_output=True, text=True, check=True)
    assert echo.stdout.split("\0")[:-1] == translated("cc12m").overrides
    assert not (tmp_path / "outputs").exists()  # nothing trained

    proc = subprocess.run([sys.executable, "-m", "clipkit.train", f"--from-open-clip-args={README_CSV}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "#   --csv-img-key: " in proc.stdout

    proc = subprocess.run([sys.executable, "-m", "clipkit.train", "--from-open-clip-args", "--lr abc"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith("clipkit-train: error: argument --lr")
