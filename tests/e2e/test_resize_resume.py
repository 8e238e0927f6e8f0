"""Resuming on another number of ranks (a SLURM requeue on other nodes), through the real stack:
DeepSpeed on gloo under torchrun, and real digits shards.

- `resize_worker.py` checkpoints at ZeRO 0, 1, 2 and 3 on 2 ranks and resumes on 1 (every stage)
  and on 3 (ZeRO 0, 2, 3: ZeRO 1 takes ZeRO 2's path, the same DeepSpeed optimizer class and
  conversion, and 3 processes on 2 cores are the slowest launch; 2 -> 3 at ZeRO 1 passed by hand).
  Three launches in all. The full fp32 weights, Adam's moments, step counts, parameter groups
  and lr schedule equal the saved ones, and the losses of the steps after the resume stay within
  the noise between world sizes of an uninterrupted run at the new size.
- `clipkit-train` at ZeRO 2 with `data.record_keys=true`, 2 streams per rank, checkpoints on 2
  ranks with two epochs started, and is resumed, from copies of its run directory, on 1 and on
  3 ranks: over the run, every sample of each started epoch is read exactly once.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli, torchrun

WORKER = str(Path(__file__).with_name("resize_worker.py"))
STAGES = {1: (0, 1, 2, 3), 3: (0, 2, 3)}   # new world size -> ZeRO stages resumed there
CASES = [pytest.param(stage, world_size, id=f"zero{stage}-2to{world_size}")
         for world_size, stages in STAGES.items() for stage in stages]
NEW_SIZES = tuple(STAGES)


def launch(world_size: int, args: list[str]) -> list[str]:
    """One process runs without torchrun (a free port of its own), as `clipkit-train` does."""
    return [sys.executable, *args] if world_size == 1 else torchrun(world_size, args)


@pytest.fixture(scope="module")
def resized(tmp_path_factory) -> Path:
    """OUT/z<stage>/{save_w2,resume_w1,resume_w3}.pt and OUT/uninterrupted_w<n>.pt of `resize_worker.py`."""
    out = tmp_path_factory.mktemp("resize")
    run_cli(torchrun(2, [WORKER, str(out), "save", "0,1,2,3"]), REPO)
    for world_size, stages in STAGES.items():
        run_cli(launch(world_size, [WORKER, str(out), "resume", ",".join(map(str, stages))]), REPO)
    return out


def results(out: Path, stage: int, world_size: int) -> tuple[dict, dict]:
    load = lambda name: torch.load(out / f"z{stage}" / name, weights_only=False)  # noqa: E731  (our own files)
    return load("save_w2.pt"), load(f"resume_w{world_size}.pt")


@pytest.mark.parametrize("stage, world_size", CASES)
def test_optimizer_state_is_equal_after_the_resize(resized, stage, world_size):
    saved, resumed = results(resized, stage, world_size)
    assert "error" not in resumed, resumed.get("error")
    assert resumed["universal"] is (stage > 0) and resumed["client_step"] == 3
    before, after = saved["state"], resumed["state"]
    assert before["params"].keys() == after["params"].keys() and len(before["params"]) > 30
    for name, states in before["params"].items():
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            assert torch.equal(states[key], after["params"][name][key]), (name, key)
    assert after["optimizer_steps"] == before["optimizer_steps"] == [3.0]
    assert after["param_groups"] == before["param_groups"]
    assert [g["weight_decay"] for g in after["param_groups"]] == [0.2, 0.0]   # biases, norms, temperature: none
    assert after["lr_scheduler"] == before["lr_scheduler"] and after["global_steps"] == before["global_steps"] == 3


@pytest.mark.parametrize("stage, world_size", CASES)
def test_the_loss_continues_within_the_noise_between_world_sizes(resized, stage, world_size):
    """The worker's batches are a function of the step, so the uninterrupted run at the new size
    sees the same data as the saving run, and differs from it by float rounding alone (the order
    of reductions). That measured difference, over all 6 steps, and at least one float32 ulp of
    the loss, is the noise; the resumed run may be off by twice that.

    For scale: ZeRO-3's universal load without clipkit's repairs (`restore_param_groups`,
    `unshare_step_counts`) was off by 2.4e-4 on 1 rank, 170 times this bound (1.4e-6)."""
    saved, resumed = results(resized, stage, world_size)
    reference = torch.load(resized / f"uninterrupted_w{world_size}.pt", weights_only=False)["losses"]
    noise = max(abs(a - b) for a, b in zip(saved["losses_before"] + saved["losses_after"], reference, strict=True))
    noise = max(noise, torch.finfo(torch.float32).eps * max(reference))
    after = reference[-len(resumed["losses_after"]):]
    off = max(abs(a - b) for a, b in zip(resumed["losses_after"], after, strict=True))
    assert off <= 2 * noise, (resumed["losses_after"], after, noise)
    assert abs(reference[-1] - reference[0]) > 1000 * noise   # the loss moved: not a comparison of constants


# -- the data position, through clipkit-train ----------------------------------------------------

GLOBAL_BATCH, SAVE_AT, FINAL = 12, 6, 26


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory) -> Path:
    """A CLIPKIT_ROOT with 89 digits training samples in 6 shards (15, ..., 15, 14): an epoch is a
    few steps, so the resumed runs finish the one the resize cut."""
    from clipkit.data import write_digits_shards

    root = tmp_path_factory.mktemp("resize_root")
    write_digits_shards(root / "data" / "digits", test_fraction=0.95, shard_size=15)
    return root


def train_args(root: Path, run_name: str, *more: str) -> list[str]:
    # 2 streams per rank: on 2 ranks, the streams of one shard (15 samples) are in epoch 1 at the
    # checkpoint while those of two shards are still in epoch 0.
    return ["-m", "clipkit.train", "debug=fast", "eval=none", "trainer.export_open_clip=false", "trainer=zero2",
            f"data.train_urls={root}/data/digits/train/{{00000..00005}}.tar", "data.streams_per_rank=2",
            f"data.global_batch_size={GLOBAL_BATCH}", "data.record_keys=true", "trainer.log_every_n_steps=1",
            "sched=constant",   # the lr does not depend on max_steps, which the resumed runs raise
            f"run_name={run_name}", *more]


def epoch_keys(run_dir: Path) -> dict[int, Counter]:
    """epoch -> how often each sample key was read, over every rank's key log."""
    counts: dict[int, Counter] = {}
    for path in sorted((run_dir / "data_keys").glob("rank*.jsonl")):
        for record in map(json.loads, path.read_text().splitlines()):
            for key, epoch in zip(record["keys"], record["epochs"], strict=True):
                counts.setdefault(epoch, Counter())[key] += 1
    return counts


def test_every_sample_of_the_started_epochs_once_across_a_resize(small_digits):
    """2 ranks x 2 streams stop after the step-6 checkpoint, with epochs 0 and 1 both started; the
    runs resumed on 1 and on 3 ranks read every one of the 89 samples once in each (the new
    layout's own epochs start at 2), and no sample twice in any epoch."""
    first = small_digits / "outputs" / "resize"
    run_cli(torchrun(2, train_args(small_digits, "resize", f"trainer.max_steps={SAVE_AT}",
                                   f"trainer.checkpoint_every_n_steps={SAVE_AT}")), small_digits)
    started = epoch_keys(first)
    assert set(started) == {0, 1}   # the checkpoint cuts epoch 0 and epoch 1
    for world_size in NEW_SIZES:
        run_dir = small_digits / "outputs" / f"resize_w{world_size}"
        shutil.copytree(first, run_dir)
        run_cli(launch(world_size, train_args(small_digits, run_dir.name, "trainer.resume=latest",
                                              f"trainer.max_steps={FINAL}", "trainer.checkpoint_every_n_steps=100")),
                small_digits)
        counts = epoch_keys(run_dir)
        for epoch in (0, 1):
            assert len(counts[epoch]) == 89 and set(counts[epoch].values()) == {1}, (world_size, epoch)
        assert all(set(c.values()) == {1} for c in counts.values()) and sum(map(len, counts.values())) == FINAL * 12
        assert sorted(p.name for p in (run_dir / "data_keys").glob("*.jsonl")) == \
            [f"rank{r:05d}.jsonl" for r in range(max(2, world_size))]
        last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        samples = sum(v for k, v in last.items() if k.startswith("data/samples/"))
        assert last["step"] == FINAL and samples == FINAL * GLOBAL_BATCH   # the counters, summed over the old ranks
        assert (run_dir / "checkpoints" / "universal" / f"step_{SAVE_AT:08d}" / "zero").is_dir()
