"""Decoupled image heads (`model.heads`) through `clipkit-train` and `clipkit-export` on the
two-level caption demo (data=digits_captions): a semantic head scoring the short captions (alt)
and a perceptual head (attentional pooling, its own text projection and temperature) scoring the
long ones (full, long).

- ZeRO 3 + bf16 + the sigmoid form + FLIP's patch dropout, in one 2-step run: it trains (finite
  losses, both heads' temperatures and biases logged), and `clipkit-export RUN_DIR` writes the
  semantic model to export/ and the perceptual one to export/perceptual/, both loadable by open_clip;
- ZeRO 0 fp32 with the softmax form, exported by the run itself: the two exports are different
  open_clip models of one trunk (the perceptual one pools with open_clip's attentional pooler);
- a CoCa tower with `model.heads`, and a loss term naming a head the model lacks, are refused
  with one `clipkit-train: error:` line.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from conftest import run_cli

TRAIN = [sys.executable, "-m", "clipkit.train"]
CONSOLE_TRAIN = [str(Path(sys.executable).with_name("clipkit-train"))]   # the installed console script
TWO_HEADS = ["data=digits_captions", "model=tiny_vit", "model.context_length=64",
             "loss.terms={alt: {texts: alt}, full: {texts: full, image: perceptual}, "
             "long: {texts: long, image: perceptual}}",
             "model.heads={perceptual: {pool: attn, attn_heads: 4}}"]
FAST = ["debug=fast", "eval=none", "trainer.max_steps=2", "trainer.log_every_n_steps=1",
        "trainer.checkpoint_every_n_steps=2", "data.global_batch_size=16"]


def train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "train/loss" in r]


def check_trained(run_dir: Path, *, sigmoid: bool) -> None:
    records = train_records(run_dir)
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        logged = ["train/loss", "train/loss_alt", "train/loss_full", "train/loss_long", "train/logit_scale",
                  "train/logit_scale_perceptual"]
        if sigmoid:
            logged += ["train/logit_bias", "train/logit_bias_perceptual"]
        for key in logged:
            assert math.isfinite(r[key]), (key, r)
        assert r["train/logit_scale_perceptual"] > 0


def load(export: Path):
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{export}")
    assert all(torch.isfinite(p).all() for p in model.parameters()), export
    return model.eval()


def check_exports(export: Path, *, sigmoid: bool) -> None:
    """export/ (semantic) and export/perceptual/ load, and are two pathways of one trunk."""
    semantic, perceptual = load(export), load(export / "perceptual")
    config = json.loads((export / "perceptual" / "open_clip_config.json").read_text())["model_cfg"]
    assert config["vision_cfg"]["attentional_pool"] is True and config["vision_cfg"]["attn_pooler_queries"] == 1
    assert (semantic.logit_bias is not None) == (perceptual.logit_bias is not None) == sigmoid
    trunk = semantic.visual.transformer.state_dict()
    assert trunk.keys() == perceptual.visual.transformer.state_dict().keys()
    for name, value in perceptual.visual.transformer.state_dict().items():
        assert torch.equal(value, trunk[name]), name
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(semantic.encode_image(images), perceptual.encode_image(images))


def test_zero3_bf16_sigmoid_patch_dropout_trains_and_exports_each_head(digits_root):
    run_dir = digits_root / "outputs" / "heads_zero3"
    run_cli([*TRAIN, *TWO_HEADS, *FAST, "loss=multi_text_sigmoid", "trainer=zero3", "trainer.precision=bf16",
             "model.patch_dropout=0.5", "trainer.export_open_clip=false", f"run_name={run_dir.name}"], digits_root)
    check_trained(run_dir, sigmoid=True)
    assert not (run_dir / "export").exists()
    proc = run_cli([sys.executable, "-m", "clipkit.export", str(run_dir)], digits_root)
    assert f"local-dir:{run_dir / 'export'}" in proc.stdout
    check_exports(run_dir / "export", sigmoid=True)


def test_zero0_softmax_run_exports_each_head(digits_root):
    run_dir = digits_root / "outputs" / "heads_zero0"
    run_cli([*TRAIN, *TWO_HEADS, *FAST, "loss=multi_text", "trainer.zero_stage=0", f"run_name={run_dir.name}"],
            digits_root)
    check_trained(run_dir, sigmoid=False)
    check_exports(run_dir / "export", sigmoid=False)


@pytest.mark.parametrize("overrides,expected", [
    (["model=tiny_coca", "loss=coca", "model.heads={perceptual: {pool: attn}}"],
     "model.heads: model=clipkit-tiny-coca already pools its image tokens with an attentional pooler"),
    ([*TWO_HEADS[:3], "loss=multi_text", "loss.terms={alt: {texts: alt}, long: {texts: long, image: perceptual}}"],
     "loss=multi_text scores the image head(s) perceptual, which model=clipkit-tiny-vit does not have "
     "(model.heads: none)"),
], ids=["coca_with_heads", "term_names_a_missing_head"])
def test_head_mistakes_are_one_line(digits_root, overrides, expected):
    proc = run_cli([*CONSOLE_TRAIN, "debug=fast", "eval=none", "run_name=heads_refused", *overrides], digits_root,
                   check=False)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [lines[-1]] and lines[-1].startswith("clipkit-train: error: ") and expected in lines[-1], lines
    assert "DeepSpeed" not in proc.stdout + proc.stderr   # refused before any engine
    assert not (digits_root / "outputs" / "heads_refused").exists(), "a refused run left a run directory"
