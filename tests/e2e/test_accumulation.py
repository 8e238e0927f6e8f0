"""Exact gradient accumulation, by its definition: trainer.accum_steps=4 equals accum_steps=1 on
the same global batch, through the real DeepSpeed engine, in 1 and 2 gloo processes: the loss,
every parameter's gradient (temperature and bias included) and the parameters after 3 steps.

With several texts per image (data=digits_captions: roles alt, full, long with K=4 sub-captions
of 32 tokens, neg with K=2 optional hard negatives), every role's features are cached and
backpropagated: the multi-positive softmax and sigmoid losses, with hard negatives for every
image (scope all) or their own (scope own), and each term's logged loss, match too; so do runs
with a second image head (`model.heads`, terms scoring it with `image: perceptual`), whose
`...@perceptual` features are cached alike and whose temperature has its own gradient. ZeRO 3 is
left out: clipkit refuses accum_steps > 1 there (`test_accumulation_refuses_what_it_cannot_do`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli, torchrun

WORKER = str(Path(__file__).with_name("accumulation_worker.py"))
TRAIN = [sys.executable, "-m", "clipkit.train"]

CASES = [  # (processes, overrides); FLIP's patch dropout is on in the first
    (1, ["model=tiny_flip", "loss=clip"]),
    (1, ["loss=siglip"]),
    (1, ["model=tiny_filip", "loss=filip"]),
    (1, ["model=tiny_coca", "loss=coca"]),
    (1, ["model=tiny_distill", "loss=distill"]),
    (2, ["model=tiny_flip", "loss=clip", "trainer.zero_stage=2"]),
    (2, ["loss=siglip", "loss.exchange=ring", "trainer.zero_stage=1"]),
    (2, ["model=tiny_filip", "loss=filip"]),
]
TEXTS = ["data=digits_captions", "model.context_length=64"]
CASES += [
    (1, [*TEXTS, "loss=multi_text",
         "loss.terms={alt: {texts: alt}, long: {texts: long, weight: 0.5, negatives: neg, negative_scope: all}}"]),
    (1, [*TEXTS, "loss=multi_text_sigmoid",
         "loss.terms={long: {texts: long, negatives: neg, negative_scope: own}, full: {texts: full, weight: 0.25}}"]),
    (2, [*TEXTS, "loss=multi_text", "trainer.zero_stage=2",
         "loss.terms={alt: {texts: alt}, full: {texts: full, negatives: neg}, long: {texts: long, weight: 2.0}}"]),
]
HEADS = "model.heads={perceptual: {pool: attn, attn_heads: 4}}"   # a second image head, its own temperature
CASES += [
    (1, [*TEXTS, HEADS, "loss=multi_text",
         "loss.terms={alt: {texts: alt}, full: {texts: full, image: perceptual}, long: {texts: long, image: perceptual}}"]),
    (2, [*TEXTS, HEADS, "loss=multi_text_sigmoid", "trainer.zero_stage=2",
         "loss.terms={alt: {texts: alt}, long: {texts: long, image: perceptual, negatives: neg}}"]),
]


def _case_id(nproc: int, overrides: list[str]) -> str:
    if TEXTS[0] not in overrides:
        return f"{nproc}p-{'-'.join(overrides)}"
    kept = [o for o in overrides if o not in (*TEXTS, HEADS) and not o.startswith("loss.terms=")]
    return f"{nproc}p-{'two_heads' if HEADS in overrides else 'texts'}-{'-'.join(kept)}"


def _close(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    # 1e-5 relative to the tensor's scale: entries far below it carry only summation-order noise.
    scale = max(float(a.abs().max()), 1e-12)
    assert float((a - b).abs().max()) <= 1e-5 * scale, f"{name}: max diff {(a - b).abs().max():.3g} at scale {scale:.3g}"


@pytest.mark.parametrize("nproc,overrides", CASES, ids=[_case_id(n, o) for n, o in CASES])
def test_four_micro_batches_equal_one_batch(tmp_path, digits_root, demo_export, nproc, overrides):
    out = tmp_path / "result.pt"
    run_cli(torchrun(nproc, [WORKER, str(out), "4", *overrides]), digits_root)
    one, four = (r for _, r in sorted(torch.load(out, weights_only=False).items()))
    assert four["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert four["terms"] == pytest.approx(one["terms"], rel=1e-5)
    assert len(one["terms"]) == sum(o.count("texts:") for o in overrides)   # every term logged
    assert one["grads"].keys() == four["grads"].keys()
    scalars = [n for n in one["grads"] if n.startswith("loss.")]
    assert scalars, "the loss's temperature must be trained"
    for name, grad in one["grads"].items():
        _close(grad.float(), four["grads"][name].float(), f"grad {name}")
    if HEADS in overrides:   # both heads are trained, each with its own temperature
        assert {"loss.temperature.logit_scale", "loss.head_temperatures.perceptual.logit_scale"} <= set(scalars)
        assert any(n.startswith("model.heads.perceptual.attn_pool.") for n in one["grads"])
    for name in scalars:
        assert float(one["grads"][name].abs().max()) > 0, name
    # Parameters to 1e-5 (absolute, as well as relative): Adam divides by sqrt(v), so for weights
    # whose gradients are near zero (biases starting at 0) float noise in g moves them by ~1e-7.
    for name, value in one["params"].items():
        torch.testing.assert_close(four["params"][name].float(), value.float(), rtol=1e-5, atol=1e-5, msg=name)
    assert four["global_steps"] == one["global_steps"] == 3 and four["lr"] == one["lr"]


def test_accumulated_training_runs_end_to_end(digits_root):
    """The CLI path: 4 micro-batches per step, a checkpoint, a resume, finite losses."""
    args = [*TRAIN, "debug=fast", "trainer.accum_steps=4", "run_name=accum", "trainer.max_steps=4",
            "trainer.checkpoint_every_n_steps=2", "eval.every_n_steps=0"]
    run_cli(args, digits_root)
    run_cli([*args, "trainer.max_steps=6", "trainer.resume=latest"], digits_root)
    ckpt = digits_root / "outputs" / "accum" / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_00000006"


@pytest.mark.parametrize("override,expected", [
    ("trainer.accum_steps=3", "data.global_batch_size=128 is not divisible by the world size 1 x trainer.accum_steps=3"),
    ("trainer.accum_steps=2 trainer.zero_stage=3", "ZeRO-3 is not supported with it"),
])
def test_accumulation_refuses_what_it_cannot_do(digits_root, override, expected):
    proc = run_cli([*TRAIN, "debug=fast", "run_name=accum_bad", *override.split()], digits_root, check=False)
    assert proc.returncode != 0 and expected in proc.stderr.strip().splitlines()[-1]
