"""Launching as a cluster user does, on a real SLURM 22.05 cluster (two emulated nodes on this
machine, tests/e2e/slurm_cluster.py):

- `clipkit-launch slurm --dry-run` renders the #SBATCH lines from the flags and conf/launcher/slurm.yaml;
- `clipkit-launch slurm` trains on 2 nodes, then `clipkit-launch slurm --eval` scores the run with
  2 ranks on one node, and the scores equal those the 2-node run logged for its last step;
- `clipkit-train -m hydra/launcher=clipkit_slurm loss=clip,siglip` runs two jobs, each in its own
  run directory named after its point;
- a bad override stops on the login node with one line, and no job is submitted.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from slurm_cluster import SlurmCluster, cluster_fixture

RUN = ["debug=fast", "trainer.export_open_clip=false", "data.global_batch_size=16"]
slurm = cluster_fixture()


def login_env(cluster: SlurmCluster, root: Path) -> dict[str, str]:
    """The login node's environment; sbatch hands it to the job. The job scripts name their
    interpreter (CLIPKIT_PYTHON, submitit's sys.executable), so PATH stays as it is."""
    return {**cluster.env, "CLIPKIT_ROOT": str(root), "OMP_NUM_THREADS": "1"}


def run(args: list[str], root: Path, env: dict[str, str], timeout: int = 800) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)


def clipkit_launch(*args: str) -> list[str]:
    return [sys.executable, "-m", "clipkit.launch.cli", *args]


def next_job_id(cluster: SlurmCluster) -> str:
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, env=cluster.env).stdout
    return re.search(r"NEXT_JOB_ID\s*=\s*(\d+)", out).group(1)


def completed(state: dict[str, str]) -> bool:
    return state.get("JobState") == "COMPLETED"


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_dry_run_renders_the_sbatch_lines(digits_root, tmp_path, monkeypatch, capsys):
    from clipkit.launch import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CLIPKIT_ROOT", str(digits_root))
    with pytest.raises(SystemExit) as done:
        cli.main(["slurm", "--nodes", "4", "--gpus-per-node", "8", "--time", "72:00:00", "--partition", "P",
                  "--account", "A", "--qos", "Q", "--constraint", "C", "--cpus-per-task", "12", "--mem", "480G",
                  "--cluster", "example", "--sbatch-extra", "--exclusive", "--dry-run", "--",
                  "debug=fast", "run_name=r4", "data.global_batch_size=64"])
    assert done.value.code == 0
    script = capsys.readouterr().out
    run_dir = digits_root / "outputs" / "r4"
    assert [line for line in script.splitlines() if line.startswith("#SBATCH")] == [
        "#SBATCH --job-name=r4", "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=12", "#SBATCH --mem=480G", "#SBATCH --time=72:00:00", "#SBATCH --partition=P",
        "#SBATCH --account=A", "#SBATCH --qos=Q", "#SBATCH --constraint=C", "#SBATCH --signal=USR1@120",
        "#SBATCH --requeue", "#SBATCH --open-mode=append", f"#SBATCH --output={run_dir}/launch/train-%j.out",
        f"#SBATCH --chdir={tmp_path}", "#SBATCH --exclusive"]
    assert f"export CLIPKIT_CLUSTER_PROFILE={run_dir}/launch/example.env" in script
    assert f"export CLIPKIT_PYTHON={sys.executable}" in script
    assert 'set -- debug=fast run_name=r4 data.global_batch_size=64 "$@"' in script
    assert "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))" in script
    assert '-m clipkit.train launcher=slurm trainer.resume=auto "$@"' in script
    assert not run_dir.exists()  # a dry run writes nothing

    # The checks run for the job's 32 ranks, and for its time limit.
    for args, message in [(["--nodes", "4", "--gpus-per-node", "8"], "is not divisible by the world size 32"),
                          (["--time", "2"], "not longer than the preemption warning")]:
        with pytest.raises(SystemExit) as done:
            cli.main(["slurm", *args, "--dry-run", "--", "debug=fast", "data.global_batch_size=60"
                      if "--nodes" in args else "debug=fast"])
        assert message in str(done.value.code) and str(done.value.code).startswith("clipkit-launch: error: ")

    # An eval job: one node, one rank per task, no preemption warning or requeue.
    with pytest.raises(SystemExit):
        cli.main(["slurm", "--eval", "--gpus-per-node", "0", "--ntasks-per-node", "2", "--time", "30", "--dry-run",
                  "--", f"run_dir={digits_root}", "eval=digits"])
    script = capsys.readouterr().out
    sbatch = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --nodes=1" in sbatch and "#SBATCH --ntasks-per-node=2" in sbatch
    assert not [line for line in sbatch if "--signal" in line or "--requeue" in line]
    assert '-m clipkit.evaluate "$@"' in script

    # On this machine: torchrun, after the same checks for its 2 ranks.
    with pytest.raises(SystemExit):
        cli.main(["local", "--nproc", "2", "--dry-run", "--", "debug=fast", "run_name=r2"])
    assert capsys.readouterr().out.split() == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                               "--nproc_per_node=2", "-m", "clipkit.train", "debug=fast", "run_name=r2"]


@pytest.mark.parametrize("value,seconds", [("30", 1800), ("5:30", 330), ("72:00:00", 259200), ("1-12", 129600),
                                           ("2-00:30:00", 174600), ("UNLIMITED", None)])
def test_time_limits_read_as_sbatch_reads_them(value, seconds):
    from clipkit.launch.sbatch import time_limit_s

    assert time_limit_s(value) == seconds


@pytest.mark.timeout(1500)  # two jobs, each given 600 s: a cold DeepSpeed op build takes minutes on a busy machine
def test_sbatch_job_trains_on_two_nodes_and_evaluates_on_two_ranks(slurm, digits_root, tmp_path):
    env = login_env(slurm, digits_root)
    run_dir = digits_root / "outputs" / "launch_2n"
    submitted = run(clipkit_launch("slurm", "--nodes", "2", "--gpus-per-node", "0", "--ntasks-per-node", "1",
                                   "--time", "15", "--partition", "debug", "--",
                                   *RUN, "run_name=launch_2n", "eval=digits"), digits_root, env)
    assert submitted.returncode == 0, submitted.stderr
    job = re.search(r"submitted job (\d+)", submitted.stdout).group(1)
    assert f"{run_dir}/launch/train-{job}.out" in submitted.stdout and str(run_dir / "train.log") in submitted.stdout
    state = slurm.wait_for(job, completed, 600, "the training job")
    log = (run_dir / "launch" / f"train-{job}.out").read_text()
    assert state["ExitCode"] == "0:0" and state["NumNodes"] == "2", log[-4000:]
    assert (run_dir / "launch" / "train.sbatch").is_file()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    final = [r for r in records(run_dir) if r["step"] == 6 and any(k.endswith("acc1") for k in r)][-1]
    assert "2 CPU processes" in (run_dir / "train.log").read_text()

    out_dir = tmp_path / "eval"
    submitted = run(clipkit_launch("slurm", "--eval", "--gpus-per-node", "0", "--ntasks-per-node", "2",
                                   "--time", "15", "--", f"run_dir={run_dir}", f"out_dir={out_dir}"), digits_root, env)
    assert submitted.returncode == 0, submitted.stderr
    job = re.search(r"submitted job (\d+)", submitted.stdout).group(1)
    state = slurm.wait_for(job, completed, 600, "the eval job")
    log = (out_dir / "launch" / f"eval-launch_2n-{job}.out").read_text()
    assert state["ExitCode"] == "0:0" and state["NumTasks"] == "2", log[-4000:]
    scores = {f"{s['dataset']}/{k}": v for p in (out_dir / "launch_2n").glob("*.json")
              for s in [json.loads(p.read_text())] for k, v in s["metrics"].items()}
    logged = {k: v for k, v in final.items() if k in scores}
    assert logged and all(scores[k] == pytest.approx(v, abs=1e-6, nan_ok=True) for k, v in logged.items()), \
        (scores, final)
    assert log.count("acc1") >= 1  # rank 0 prints the table once


def test_submitit_sweep_runs_a_job_per_point_in_its_own_run_dir(slurm, digits_root):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install 'clipkit[launch]'")
    env = login_env(slurm, digits_root)
    sweep = run([sys.executable, "-m", "clipkit.train", "-m", "hydra/launcher=clipkit_slurm",
                 "hydra.launcher.timeout_min=15", "hydra.launcher.partition=debug", *RUN, "eval=none",
                 "run_name=sweep", "loss=clip,siglip"], digits_root, env)
    assert sweep.returncode == 0, sweep.stderr[-6000:]
    jobs = set()
    for loss in ("clip", "siglip"):
        run_dir = digits_root / "outputs" / "sweep" / f"loss={loss}"
        assert [r["step"] for r in records(run_dir) if "train/loss" in r][-1] == 6
        assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000006"
        assert f"- loss={loss}" in (run_dir / ".hydra" / "overrides.yaml").read_text()
        jobs.add(OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.job.id)
    assert len(jobs) == 2
    (submission,) = (digits_root / "outputs" / ".submitit").glob("*/*_submission.sh")
    assert "#SBATCH --signal=USR1@120" in submission.read_text()


def test_a_bad_override_is_refused_on_the_login_node(slurm, digits_root):
    env = login_env(slurm, digits_root)
    before = next_job_id(slurm)
    refused = run(clipkit_launch("slurm", "--nodes", "2", "--gpus-per-node", "0", "--time", "15", "--",
                                 *RUN, "run_name=refused", "trainer.max_stpes=5"), digits_root, env, timeout=300)
    assert refused.returncode != 0 and refused.stdout == ""
    assert refused.stderr.strip().splitlines() == [
        "clipkit-launch: error: trainer.max_stpes is not a key of trainer; did you mean trainer.max_steps?"]
    refused = run([sys.executable, "-m", "clipkit.train", "-m", "hydra/launcher=clipkit_slurm", *RUN,
                   "run_name=refused", "loss=clip,focal"], digits_root, env, timeout=300)
    assert refused.returncode != 0
    (line,) = refused.stderr.strip().splitlines()
    assert line.startswith("clipkit-train: error: In 'train': Could not find 'loss/focal'")
    assert line.endswith("(sweep point 2/2: loss=focal)")
    assert next_job_id(slurm) == before and not (digits_root / "outputs" / "refused").exists()
