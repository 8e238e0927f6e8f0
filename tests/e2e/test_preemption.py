"""Preemption through the real stack: SIGUSR1 to one rank of a 2-rank torchrun job (with data
workers) makes both ranks checkpoint at the same step and stop with exit code 75; resuming
from that checkpoint finishes the run without repeating or skipping a step. (That a resumed
stream continues with exactly an uninterrupted run's samples is tests/e2e/test_data_resume.py.)
A signal that arrives after the last step changes nothing: the run finishes and exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import run_cli, torchrun
from test_data_resume import key_log

STEPS = 400  # far more than run before the signal: the stop must come from it
RUN = ["debug=fast", "eval=none", "trainer.export_open_clip=false", "trainer.checkpoint_every_n_steps=0",
       "trainer.log_every_n_steps=1", "data.workers=2", "data.global_batch_size=16", "data.record_keys=true"]


def rank_pids(parent: int) -> list[int]:
    """The ranks: torchrun's direct children (their own children are data workers)."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(parent)], capture_output=True, text=True).stdout
    return sorted(int(p) for p in out.split())


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if "train/loss" in r]


def test_signal_on_one_rank_checkpoints_every_rank_and_resumes(digits_root):
    run_dir = digits_root / "outputs" / "preempted"
    args = torchrun(2, ["-m", "clipkit.train", *RUN, f"trainer.max_steps={STEPS}", "run_name=preempted"])
    env = {**os.environ, "CLIPKIT_ROOT": str(digits_root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, cwd=digits_root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while len(logged_steps(run_dir)) < 3:  # training is under way, data workers included
            assert proc.poll() is None, proc.stderr.read().decode()[-4000:]
            assert time.monotonic() < deadline, "no training steps within the timeout"
            time.sleep(0.05)
        ranks = rank_pids(proc.pid)
        assert len(ranks) == 2, ranks
        os.kill(ranks[1], signal.SIGUSR1)  # one rank only, as when a signal reaches nodes at different times
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stderr = stderr.decode()
    # torchrun reports a worker's nonzero exit as its own failure; each rank exits with 75.
    assert "exitcode  : 75" in stderr or "exitcode: 75" in stderr, stderr[-4000:]
    stopped = int((run_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    assert 3 <= stopped < STEPS
    assert f"stopped by a preemption signal after step {stopped}" in stderr
    keys = key_log(run_dir)
    assert [s for s, _ in keys[0]] == [s for s, _ in keys[1]] == list(range(1, stopped + 1))  # both ranks stopped there

    final = stopped + 3
    run_cli(torchrun(2, ["-m", "clipkit.train", *RUN, f"trainer.max_steps={final}", "run_name=preempted",
                         "trainer.resume=latest"]), digits_root)
    resumed = key_log(run_dir)
    for rank in range(2):  # the steps before the stop are kept as they were, then it carries on
        assert resumed[rank][:stopped] == keys[rank] and [s for s, _ in resumed[rank]] == list(range(1, final + 1))
    seen = [k for rank in range(2) for _, ks in resumed[rank] for k in ks]
    assert 16 * final < 1437 and len(seen) == len(set(seen))  # within one epoch of the digits: no sample twice
    assert logged_steps(run_dir)[-1] == final


def test_a_signal_after_the_last_step_neither_kills_nor_stops_the_finishing_run(digits_root):
    """SIGUSR1 while the run finishes (final eval, export): a SLURM job signalled this late must
    end as completed, not be killed by the signal's default action or requeued."""
    run_dir = digits_root / "outputs" / "late_signal"
    args = [sys.executable, "-m", "clipkit.train", "debug=fast", "trainer.max_steps=3", "run_name=late_signal"]
    env = {**os.environ, "CLIPKIT_ROOT": str(digits_root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, cwd=digits_root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    latest = run_dir / "checkpoints" / "latest"
    try:
        deadline = time.monotonic() + 300
        while not latest.exists():   # the last step's checkpoint: training is over, the final eval is next
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.3)   # past the trainer's return into the final eval
        os.kill(proc.pid, signal.SIGUSR1)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = output.decode()
    assert proc.returncode == 0, output[-4000:]
    assert not any(r.get("preempted") for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()))
    assert (run_dir / "export" / "open_clip_model.safetensors").exists()   # finish() ran to its end
