"""launch/slurm/train.sbatch on a real SLURM cluster (two emulated nodes on this machine): a
2-node job with ranks from SLURM's env, preempted with SIGUSR1, checkpoints, requeues itself,
comes back on one node (SLURM does not promise the same nodes) and finishes from where it
stopped: the two ranks' data streams are re-dealt to the one rank, no sample seen twice."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from slurm_cluster import SlurmCluster, cluster_fixture
from test_data_resume import key_log

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
RUN = ["debug=fast", "eval=none", "trainer.export_open_clip=false", "data.global_batch_size=16",
       "data.record_keys=true", "trainer.log_every_n_steps=1"]


slurm = cluster_fixture()


def job_env(cluster: SlurmCluster, root: Path) -> dict[str, str]:
    # sbatch exports the submitting environment: the test's CLIPKIT_ROOT, and this interpreter
    # (CLIPKIT_PYTHON; PATH stays as it is: the venv's bin/ holds another ninja than /usr/bin, and
    # a JIT-built op whose .ninja_log the two versions take turns writing is rebuilt every time).
    return {**cluster.env, "CLIPKIT_ROOT": str(root), "OMP_NUM_THREADS": "1", "CLIPKIT_PYTHON": sys.executable}


def sbatch(cluster: SlurmCluster, root: Path, log: Path, *overrides: str) -> str:
    """Submits train.sbatch on 2 nodes x 1 task; returns the job id."""
    cmd = ["sbatch", "--nodes=2", "--ntasks-per-node=1", "--time=20", f"--output={log}", str(SBATCH), *RUN,
           *overrides]
    submitted = subprocess.run(cmd, cwd=root, env=job_env(cluster, root), capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.split()[-1]


def completed(state: dict[str, str]) -> bool:
    return state.get("JobState") == "COMPLETED"


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_preempted_job_checkpoints_requeues_and_finishes(slurm, digits_root, tmp_path):
    steps, run_dir, log = 12, digits_root / "outputs" / "slurm_preempted", tmp_path / "job.out"
    job = sbatch(slurm, digits_root, log, "run_name=slurm_preempted", f"trainer.max_steps={steps}", "data.workers=2")
    deadline = time.monotonic() + 300
    while len([r for r in metrics(run_dir) if "train/loss" in r]) < 3:
        assert slurm.job_state(job).get("JobState") in ("PENDING", "RUNNING"), log.read_text()[-4000:]
        assert time.monotonic() < deadline, "no training steps within the timeout"
        time.sleep(0.1)
    # What SLURM sends --signal=USR1@120 before the time limit: every task of the job's steps
    # (data workers included), not the batch shell.
    subprocess.run(["scancel", "--signal=USR1", job], check=True, env=slurm.env)
    slurm.wait_for(job, lambda s: s.get("Restarts") == "1", 120, "requeue")
    # SLURM holds a requeued batch job for about two minutes before it may start again; an
    # admin's StartTime=now skips only that wait. Not within the second of the requeue: slurmd
    # revoked the old run's credential at a whole-second time and refuses a new credential of
    # the same job created in that second ("Job credential revoked"; the job then FAILs).
    # The requeued job gets one node: the checkpoint of 2 ranks resumes on 1.
    slurm.wait_for(job, lambda s: s.get("JobState") == "PENDING", 60, "the requeued job to pend")
    subprocess.run(["scontrol", "update", f"JobId={job}", "NumNodes=1", "NumTasks=1"], env=slurm.env, check=True)
    time.sleep(2.0)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm.env, capture_output=True)
    state = slurm.wait_for(job, completed, 300, "completion after the requeue")
    assert state["ExitCode"] == "0:0" and state["Restarts"] == "1", log.read_text()[-6000:]
    assert state["NumNodes"] == "1", state
    records = metrics(run_dir)
    stopped = [r["step"] for r in records if r.get("preempted")]
    assert len(stopped) == 1 and 3 <= stopped[0] < steps
    assert [r["step"] for r in records if "train/loss" in r][-1] == steps
    keys = key_log(run_dir)  # one log per rank: both before the requeue, rank 0 alone after it
    assert [s for s, _ in keys[0]] == list(range(1, steps + 1))
    assert [s for s, _ in keys[1]] == list(range(1, stopped[0] + 1))
    seen = [k for rank in keys.values() for _, ks in rank for k in ks]
    assert len(seen) == steps * 16 and len(set(seen)) == len(seen)   # 192 of the 1,437 samples, none twice
    output = log.read_text()
    assert f"stopped by a preemption signal after step {stopped[0]}" in output and "requeued" in output
