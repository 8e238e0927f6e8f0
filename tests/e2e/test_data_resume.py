"""Exact data resume through the real stack: torchrun 2 ranks x 2 dataloader workers, DeepSpeed
checkpoints, a SIGKILL of the whole job after a middle checkpoint, then `trainer.resume=latest`.

The (rank, step, sample keys) sequence, recorded by `data.record_keys=true`, must equal an
uninterrupted run's, step for step, in both data modes (the resampled run is marked slow:
each case starts three 2-rank jobs, and tests/unit/test_data_loader.py covers resampled
resume with real worker processes).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import kill_job, run_cli, torchrun

STEPS = 12
RUN = ["debug=fast", "eval=none", "trainer.export_open_clip=false", f"trainer.max_steps={STEPS}",
       "trainer.checkpoint_every_n_steps=3", "trainer.log_every_n_steps=3", "data.workers=2",
       "data.global_batch_size=16", "data.record_keys=true"]


def key_log(run_dir: Path) -> dict[int, list[tuple[int, list[str]]]]:
    """rank -> [(step, keys)] as recorded."""
    return {rank: [(r["step"], r["keys"]) for r in map(json.loads, (run_dir / "data_keys" / f"rank{rank:05d}.jsonl")
                                                       .read_text().splitlines())]
            for rank in range(2)}


def last_record(run_dir: Path) -> dict:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]


def run_and_kill_after_first_checkpoint(args: list[str], root: Path, run_dir: Path, timeout: float = 300) -> None:
    """Starts the job in its own session and SIGKILLs all of it (torchrun, ranks, data workers:
    `kill_job`) as soon as a checkpoint is complete, like a node lost mid-run."""
    env = {**os.environ, "CLIPKIT_ROOT": str(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.monotonic() + timeout
    try:
        while not latest.exists():
            if proc.poll() is not None:
                raise AssertionError(f"job ended before its first checkpoint:\n{proc.stderr.read().decode()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("no checkpoint within the timeout")
            time.sleep(0.02)
    finally:
        kill_job(proc)
        proc.stderr.close()


@pytest.mark.parametrize("data", ["digits", pytest.param("mixture", marks=pytest.mark.slow)],
                         ids=["epoch", "resampled"])   # resampled resume is also covered by test_data_loader.py
def test_killed_and_resumed_run_sees_the_same_samples(digits_root, data):
    straight, killed = digits_root / "outputs" / f"keys_{data}", digits_root / "outputs" / f"keys_{data}_killed"
    train = ["-m", "clipkit.train", f"data={data}", *RUN]
    run_cli(torchrun(2, [*train, f"run_name={straight.name}"]), digits_root)

    run_and_kill_after_first_checkpoint(torchrun(2, [*train, f"run_name={killed.name}"]), digits_root, killed)
    tag = (killed / "checkpoints" / "latest").read_text()
    resumed_at = int(tag.removeprefix("step_"))
    assert 0 < resumed_at < STEPS, f"the job was killed too late ({tag}) to test a resume"
    run_cli(torchrun(2, [*train, f"run_name={killed.name}", "trainer.resume=latest"]), digits_root)

    expected, got = key_log(straight), key_log(killed)
    for rank in range(2):
        assert [step for step, _ in got[rank]] == list(range(1, STEPS + 1))
        assert got[rank][resumed_at:] == expected[rank][resumed_at:]
        assert got[rank] == expected[rank]
    assert expected[0][0][1] != expected[1][0][1]   # the ranks read different samples
    # The per-source counters were restored from the checkpoint and summed over both ranks.
    final = last_record(killed)
    counts = {k: v for k, v in final.items() if k.startswith("data/samples/")}
    assert counts == {k: v for k, v in last_record(straight).items() if k.startswith("data/samples/")}
    assert sum(counts.values()) == STEPS * 16 and final["step"] == STEPS
