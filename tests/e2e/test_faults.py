"""Faults injected into real runs: dead `pipe:` sources, a checkpoint of another model, a truncated
checkpoint file, an unwritable run directory, a disk that fills during a checkpoint.

Each run is a `debug=fast`-sized `clipkit-train` in a fresh process on the real digits shards;
nothing is mocked inside clipkit. The full disk is injected from outside: `fault_injection/
sitecustomize.py` makes `torch.save` fail with ENOSPC halfway through one checkpoint's files.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from conftest import run_cli

TRAIN = [sys.executable, "-m", "clipkit.train"]
EXPORT = [sys.executable, "-m", "clipkit.export"]
FAST = ["debug=fast", "eval=none", "trainer.export_open_clip=false", "data.global_batch_size=32"]
FAULTS = Path(__file__).parent / "fault_injection"


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def last_line(proc) -> str:
    return proc.stderr.strip().splitlines()[-1]


def with_faults(**env: str) -> dict[str, str]:
    """Environment that loads `fault_injection/sitecustomize.py` into every Python process of a run."""
    return {"PYTHONPATH": os.pathsep.join([str(FAULTS), os.environ.get("PYTHONPATH", "")]), **env}


def test_dead_pipe_sources_are_retried_skipped_counted_and_logged(digits_root, tmp_path):
    """One source's shards come through `pipe:` commands: one reads well, one fails mid-shard
    (exit 3), one stalls (no byte for data.read_timeout_s=1). The run goes on."""
    train = digits_root / "data" / "digits" / "train"
    scripts = {5: f"cat {train}/00005.tar",
               6: f"head -c 5000 {train}/00006.tar; echo 's3: connection reset by peer' >&2; exit 3",
               7: f"head -c 5000 {train}/00007.tar; sleep 30"}
    for i, script in scripts.items():
        (tmp_path / f"shard_{i}.sh").write_text(script + "\n")
    piped = f"pipe:sh {tmp_path}/shard_{{5..7}}.sh"
    proc = run_cli([*TRAIN, *FAST, "run_name=dead_pipes", f"data.train_urls={train}/{{00000..00004}}.tar::{piped}",
                    "data.source_names=[local,piped]", "data.read_timeout_s=1", "data.open_retries=1",
                    "data.retry_delay_s=0.1", "data.global_batch_size=128"], digits_root)
    run_dir = digits_root / "outputs" / "dead_pipes"
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000006"
    final = metrics(run_dir)[-1]
    # 6 steps x 128 samples pull the whole first epoch through the shuffle buffer: each dead
    # shard is skipped once, after its retry.
    assert final["data/skipped/failed_source"] == 1 and final["data/skipped/stalled_source"] == 1
    assert final["data/samples/piped"] > 0
    log = proc.stdout + proc.stderr
    assert f"skipping the rest of shard pipe:sh {tmp_path}/shard_6.sh after" in log
    assert "exited with status 3; stderr: s3: connection reset by peer) (2 tries)" in log
    assert f"shard pipe:sh {tmp_path}/shard_7.sh" in log and "wrote nothing for 1 s (data.read_timeout_s)" in log


def test_a_source_whose_shards_all_fail_stops_the_run_naming_it(digits_root, tmp_path):
    for i in range(2):
        (tmp_path / f"dead_{i}.sh").write_text("echo 'An error occurred (AccessDenied)' >&2; exit 1\n")
    proc = run_cli([*TRAIN, *FAST, "run_name=dead_source", f"data.train_urls=pipe:sh {tmp_path}/dead_{{0..1}}.sh",
                    "data.source_names=[laion]", "data.open_retries=0"], digits_root, check=False)
    assert proc.returncode == 1
    assert last_line(proc).startswith(f"clipkit-train: error: data source 'laion' (pipe:sh {tmp_path}/dead_0.sh, ...) "
                                      "is unusable: all its 2 shards failed")
    assert "(AccessDenied)" in proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def two_step_run(digits_root) -> Path:
    """tiny_vit trained 2 steps at ZeRO 2 (its weights consolidated by zero_to_fp32 on export)."""
    run_cli([*TRAIN, *FAST, "run_name=two_steps", "trainer.max_steps=2", "trainer=zero2"], digits_root)
    return digits_root / "outputs" / "two_steps"


def test_resuming_with_another_model_is_refused_listing_keys_and_shapes(two_step_run, digits_root):
    proc = run_cli([*TRAIN, *FAST, "run_name=two_steps", "trainer.max_steps=4", "trainer=zero2",
                    "trainer.resume=latest", "model.config.vision_cfg.width=64"], digits_root, check=False)
    assert proc.returncode == 1
    line = last_line(proc)
    assert line.startswith(f"clipkit-train: error: checkpoint {two_step_run}/checkpoints/step_00000002 was written "
                           f"for a different model: ")
    assert "shapes differ (checkpoint vs model): model.visual.class_embedding [128] vs [64]" in line
    assert "Traceback" not in proc.stderr
    # The refused launch rewrote the run's open_clip_config.json; the checkpoint keeps its own.
    tag_config = json.loads((two_step_run / "checkpoints" / "step_00000002" / "open_clip_config.json").read_text())
    assert tag_config["model_cfg"]["vision_cfg"]["width"] == 128


def test_export_writes_safetensors_that_open_clip_loads_first(two_step_run, digits_root, tmp_path):
    out = tmp_path / "export"
    run_cli([*EXPORT, str(two_step_run), "--out", str(out)], digits_root)
    assert {p.name for p in out.iterdir()} == {"open_clip_model.safetensors", "open_clip_pytorch_model.bin",
                                               "open_clip_config.json"}
    only_safetensors = tmp_path / "safetensors_only"
    only_safetensors.mkdir()
    for name in ("open_clip_model.safetensors", "open_clip_config.json"):
        shutil.copy(out / name, only_safetensors / name)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    embeddings = []
    for folder in (out, only_safetensors):
        model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
        with torch.no_grad():
            embeddings.append(model.eval().encode_image(images))
    bin_state = torch.load(out / "open_clip_pytorch_model.bin", weights_only=True)
    assert torch.equal(model.state_dict()["visual.proj"], bin_state["visual.proj"])
    assert torch.equal(embeddings[0], embeddings[1])


def test_exporting_with_another_model_config_is_refused_listing_keys_and_shapes(two_step_run, digits_root, tmp_path):
    copy = digits_root / "outputs" / "two_steps_other_config"
    shutil.copytree(two_step_run, copy)
    config_path = copy / "checkpoints" / "step_00000002" / "open_clip_config.json"
    config = json.loads(config_path.read_text())
    config["model_cfg"]["text_cfg"]["width"] = 64
    config_path.write_text(json.dumps(config))
    proc = run_cli([*EXPORT, str(copy), "--out", str(tmp_path / "export")], digits_root, check=False)
    assert proc.returncode == 1
    line = last_line(proc)
    assert line.startswith(f"clipkit-export: error: checkpoint {copy}/checkpoints/step_00000002 was written for a "
                           f"different model: ") and f"its model config is {config_path}" in line
    assert "shapes differ (checkpoint vs model): positional_embedding [16, 128] vs [16, 64]" in line
    assert not (tmp_path / "export").exists()


def test_a_truncated_checkpoint_file_is_a_one_line_error(two_step_run, digits_root, tmp_path):
    copy = digits_root / "outputs" / "two_steps_truncated"
    shutil.copytree(two_step_run, copy)
    states = copy / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])
    expected = f"checkpoint file {states} cannot be read, it is truncated or corrupt (PytorchStreamReader failed"
    proc = run_cli([*TRAIN, *FAST, "run_name=two_steps_truncated", "trainer.max_steps=4", "trainer=zero2",
                    "trainer.resume=latest"], digits_root, check=False)
    assert proc.returncode == 1 and last_line(proc).startswith(f"clipkit-train: error: {expected}")
    proc = run_cli([*EXPORT, str(copy), "--out", str(tmp_path / "export")], digits_root, check=False)
    assert proc.returncode == 1 and last_line(proc).startswith(f"clipkit-export: error: {expected}")


def test_an_unwritable_run_directory_is_a_one_line_error(digits_root, tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    proc = run_cli([*TRAIN, *FAST, f"paths.output_dir={tmp_path}/a_file/outputs"], digits_root, check=False)
    assert proc.returncode == 1
    assert last_line(proc) == (f"clipkit-train: error: run directory {tmp_path}/a_file/outputs/clipkit-tiny-vit-clip "
                               f"cannot be created: {tmp_path}/a_file is a file, not a directory (set "
                               f"paths.output_dir or run_name)")


def test_a_disk_that_fills_during_a_checkpoint_keeps_the_previous_one(digits_root):
    """ENOSPC halfway through step 6's files: a one-line error naming step 3, `latest` still on
    step 3, and a resume from it finishes the run with the same losses as a run never hit."""
    run_dir = digits_root / "outputs" / "full_disk"
    args = [*TRAIN, *FAST, "run_name=full_disk", "trainer.log_every_n_steps=1"]
    proc = run_cli(args, digits_root, check=False, extra_env=with_faults(CLIPKIT_FAULT_ENOSPC="step_00000006"))
    assert proc.returncode == 1
    assert last_line(proc) == ("clipkit-train: error: checkpoint step_00000006 could not be written (No space left "
                               "on device); the last complete checkpoint is step_00000003 (resume with "
                               "trainer.resume=latest)")
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000003"
    assert (run_dir / "checkpoints" / "step_00000006").is_dir()   # the torn save, never named by `latest`
    losses = {r["step"]: r["train/loss"] for r in metrics(run_dir) if "train/loss" in r}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]

    run_cli([*args, "trainer.resume=latest"], digits_root)
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000006"
    resumed = [r for r in metrics(run_dir) if "train/loss" in r][6:]
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert [r["train/loss"] for r in resumed] == [losses[4], losses[5], losses[6]]
