"""End-to-end runs of the real CLIs on real digits shards: DeepSpeed, checkpoints, resume,
eval JSON, export to open_clip, wandb offline, and one-line errors for bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from conftest import run_cli, torchrun

TRAIN = [sys.executable, "-m", "clipkit.train"]
CONSOLE_TRAIN = [str(Path(sys.executable).with_name("clipkit-train"))]   # the installed console script
FAST = ["debug=fast", "eval.every_n_steps=3"]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def fast_run(digits_root) -> Path:
    """6 steps, 1 process, ZeRO 0, wandb offline; the run directory."""
    run_cli([*TRAIN, *FAST, "run_name=fast", "logger=wandb"], digits_root)
    return digits_root / "outputs" / "fast"


def test_run_directory_holds_every_artifact(fast_run):
    assert (fast_run / "checkpoints" / "latest").read_text() == "step_00000006"
    assert {p.name for p in (fast_run / "checkpoints").glob("step_*")} == {"step_00000003", "step_00000006"}
    assert "max_steps: 6" in (fast_run / "config.yaml").read_text()
    records = metrics(fast_run)
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert [r["step"] for r in records if "train/loss" in r] == [2, 4, 6]
    assert all(0 < loss < 20 for loss in losses)
    evals = [r for r in records if "digits/acc1" in r]
    assert [r["step"] for r in evals] == [3, 6]
    result = json.loads((fast_run / "eval" / "digits_zeroshot_classification.json").read_text())
    assert result["task"] == "zeroshot_classification" and 0.0 <= result["metrics"]["acc1"] <= 1.0
    retrieval = json.loads((fast_run / "eval" / "digits_retrieval.json").read_text())["metrics"]
    assert {"image_retrieval_recall@1", "text_retrieval_recall@10"} <= set(retrieval)
    assert (fast_run / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert list((fast_run / "wandb").glob("offline-run-*/run-*.wandb"))


def test_resume_latest_continues_from_the_checkpoint(fast_run, digits_root):
    run_cli([*TRAIN, *FAST, "run_name=fast", "trainer.resume=latest", "trainer.max_steps=8"], digits_root)
    steps = [r["step"] for r in metrics(fast_run) if "train/loss" in r]
    assert steps == [2, 4, 6, 8]   # resumed at 6: steps 1-6 were not run again
    assert (fast_run / "checkpoints" / "latest").read_text() == "step_00000008"


def test_existing_run_is_not_overwritten(fast_run, digits_root):
    proc = run_cli([*TRAIN, *FAST, "run_name=fast"], digits_root, check=False)
    assert proc.returncode != 0
    assert "already holds checkpoints" in proc.stderr.strip().splitlines()[-1]


def test_export_loads_in_open_clip_with_the_same_embeddings(fast_run, digits_root):
    from clipkit.checkpoint import Checkpointer, fp32_state_dict
    from clipkit.losses import ClipLoss
    from clipkit.models import build_model
    from clipkit.objective import ContrastiveObjective

    run_cli([sys.executable, "-m", "clipkit.export", str(fast_run), "--out", str(fast_run / "exported")], digits_root)
    tag = Checkpointer(fast_run / "checkpoints").latest_tag()
    cfg = json.loads((fast_run / "open_clip_config.json").read_text())
    bundle = build_model("clipkit-tiny-vit", config=cfg["model_cfg"])
    ours = ContrastiveObjective(bundle.model, ClipLoss()).eval()
    ours.load_state_dict(fp32_state_dict(fast_run / "checkpoints" / tag))

    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    weights = str(fast_run / "exported" / "open_clip_pytorch_model.bin")
    for name, pretrained in [(f"local-dir:{fast_run / 'exported'}", None), ("clipkit-tiny-vit", weights)]:
        model, _, _ = open_clip.create_model_and_transforms(name, pretrained=pretrained)
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(model.encode_image(images, normalize=True), ours.encode_image(images),
                                       rtol=1e-5, atol=1e-5)
        assert float(model.logit_scale.detach()) == pytest.approx(float(ours.loss.temperature.logit_scale.detach()))


def test_clipkit_eval_scores_a_run_directory(fast_run, digits_root):
    out = digits_root / "outputs" / "eval_fast"
    before = {p: p.stat().st_mtime_ns for p in fast_run.rglob("*")}
    proc = run_cli([sys.executable, "-m", "clipkit.evaluate", f"run_dir={fast_run}", f"out_dir={out}"], digits_root)
    assert {p: p.stat().st_mtime_ns for p in fast_run.rglob("*")} == before, "clipkit-eval wrote into the run dir"
    assert "acc1" in proc.stdout
    train_acc1 = json.loads((fast_run / "eval" / "digits_zeroshot_classification.json").read_text())["metrics"]["acc1"]
    eval_acc1 = json.loads((out / fast_run.name / "digits_zeroshot_classification.json").read_text())["metrics"]["acc1"]
    assert (out / "summary.md").exists()
    # The resumed run above ended at step 8 and evaluated it; clipkit-eval scores that same checkpoint.
    assert eval_acc1 == pytest.approx(train_acc1, abs=1e-6)


def test_training_evals_use_the_configured_search(digits_root):
    # 4 IVF lists, 1 probed: a really approximate index, so its recall against exact search shows.
    run_cli([*TRAIN, *FAST, "run_name=approx", "eval.search.index='IVF4,Flat'", "eval.search.nprobe=1"], digits_root)
    run_dir = digits_root / "outputs" / "approx"
    evals = [r for r in metrics(run_dir) if "digits/acc1" in r]
    assert [r["step"] for r in evals] == [3, 6]
    for record in evals:
        for direction in ("image", "text"):
            assert 0.0 < record[f"digits/{direction}_retrieval_search_recall_vs_exact@10"] < 1.0
            assert f"digits/{direction}_retrieval_mean_rank" not in record  # exact search only
    retrieval = json.loads((run_dir / "eval" / "digits_retrieval.json").read_text())["metrics"]
    key = "image_retrieval_search_recall_vs_exact@10"
    assert retrieval[key] == evals[-1][f"digits/{key}"]


def test_two_process_torchrun_zero2(digits_root):
    run_cli(torchrun(2, ["-m", "clipkit.train", *FAST, "run_name=ddp_z2", "trainer=zero2", "data.workers=1"]),
            digits_root)
    run_dir = digits_root / "outputs" / "ddp_z2"
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000006"
    assert list((run_dir / "checkpoints" / "step_00000006").glob("*zero_pp_rank_1*"))  # both ranks saved shards
    assert [r["step"] for r in metrics(run_dir) if "digits/acc1" in r] == [3, 6]
    assert (run_dir / "export" / "open_clip_pytorch_model.bin").exists()


@pytest.mark.parametrize("overrides", [["trainer=zero3"], ["trainer=bf16", "trainer.zero_stage=1"]],
                         ids=["zero3", "bf16"])
def test_two_process_other_stages(digits_root, overrides):
    name = "ddp_" + "_".join(o.split("=")[-1] for o in overrides)
    run_cli(torchrun(2, ["-m", "clipkit.train", *FAST, f"run_name={name}", "data.workers=0", *overrides]),
            digits_root)
    run_dir = digits_root / "outputs" / name
    losses = [r["train/loss"] for r in metrics(run_dir) if "train/loss" in r]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{run_dir / 'export'}")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_demo_experiment_with_siglip(digits_root):
    proc = run_cli([*CONSOLE_TRAIN, "experiment=demo_digits", "loss=siglip", *FAST], digits_root)
    run_dir = digits_root / "outputs" / "demo_digits-siglip"
    assert "zeroshot_classification" in proc.stdout
    record = [r for r in metrics(run_dir) if "train/logit_bias" in r][-1]
    assert record["train/logit_bias"] == pytest.approx(-10.0, abs=0.5)
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{run_dir / 'export'}")
    assert model.logit_bias is not None


@pytest.mark.parametrize("override,expected", [
    ("data.train_urls='/nonexistent/{00000..00003}.tar'", "shard not found: /nonexistent/00000.tar"),
    ("loss=focal", "Could not find 'loss/focal'; Available options in 'loss': clip; coca; distill; filip; "
                   "multi_text; multi_text_sigmoid; siglip"),
    ("trainer.max_stpes=5", "trainer.max_stpes is not a key of trainer; did you mean trainer.max_steps?"),
    ("eval.search.index=annoy", "eval.search.index='annoy'"),
    ("eval.cache_dir=/tmp/emb", "eval.cache_dir is for clipkit-eval"),
    ("model.config={a:", "cannot parse the override 'model.config={a:'"),
    ("sched.name=linear", "sched.name='linear' is not one of cosine, constant"),
    ("eval.scoring=dense", "eval.scoring='dense' is not one of auto, pooled, late_interaction"),
    ("trainer.epochs=2 data.train_num_samples=null", "trainer.epochs=2 needs the epoch length"),
])
def test_bad_input_is_one_line_before_any_worker(digits_root, override, expected):
    proc = run_cli([*CONSOLE_TRAIN, "debug=fast", "run_name=refused", *override.split(" ")], digits_root, check=False)
    assert proc.returncode != 0
    assert not (digits_root / "outputs" / "refused").exists(), "a refused run left a run directory"
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [lines[-1]] and lines[-1].startswith("clipkit-train: error: ") and expected in lines[-1]
    assert "DeepSpeed" not in proc.stdout + proc.stderr   # failed before the process group existed


def test_diverging_run_stops_with_a_clear_error_and_keeps_its_checkpoint(digits_root):
    proc = run_cli([*TRAIN, "debug=fast", "run_name=diverge", "optim.lr=1e30", "sched.warmup_steps=0",
                    "trainer.grad_clip=0", "trainer.checkpoint_every_n_steps=1"], digits_root, check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("clipkit-train: error: loss is") and "the last checkpoint is intact" in last
    ckpt = digits_root / "outputs" / "diverge" / "checkpoints"
    assert (ckpt / (ckpt / "latest").read_text()).is_dir()
