"""A run SIGKILLed at a random step and resumed from its last checkpoint trains exactly like a run
never killed: from that checkpoint on, every step's training loss is bit-for-bit the
uninterrupted run's (`train/loss` in metrics.jsonl, logged every step; JSON keeps a float's repr).

One process with a data worker (3 kill steps drawn from 3 seeds), and 2 torchrun ranks at ZeRO 2
with 2 data workers each; one uninterrupted reference run per configuration serves every kill.
With several texts per image (`1proc_texts`: the captions_digits_negatives recipe, terms over the
roles alt, full with the hard negatives neg, and long's 4 sub-captions per image), the key log
(`data.record_keys=true`) of the killed and resumed run also equals the uninterrupted run's: the
same samples at every step, and for each the same chosen texts of every role. `1proc_heads` adds a
second image head (`model.heads`, scored by the full and long terms) with its own temperature,
whose logged value resumes bit for bit as well.
The kill is `kill -9` of every process of the job (launcher, ranks, data workers: `kill_job`) as
soon as metrics.jsonl shows step k: nothing gets to save or flush on the way down.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import kill_job, process_alive, run_cli, torchrun

STEPS = 12
RUN = ["debug=fast", "eval=none", "trainer.export_open_clip=false", f"trainer.max_steps={STEPS}",
       "trainer.checkpoint_every_n_steps=3", "trainer.log_every_n_steps=1", "data.global_batch_size=16"]
CONFIGS = {
    "1proc": lambda args: [sys.executable, "-m", "clipkit.train", *args, "data.workers=1"],
    "2proc_zero2": lambda args: torchrun(2, ["-m", "clipkit.train", *args, "trainer=zero2", "data.workers=2"]),
    "1proc_texts": lambda args: [sys.executable, "-m", "clipkit.train", "experiment=captions_digits_negatives", *args,
                                 "data.workers=1", "data.record_keys=true"],
    "1proc_heads": lambda args: [sys.executable, "-m", "clipkit.train", "experiment=captions_digits_negatives", *args,
                                 "model.heads={perceptual: {pool: attn, attn_heads: 4}}",
                                 "loss.terms={alt: {texts: alt}, full: {texts: full, image: perceptual, negatives: neg}, "
                                 "long: {texts: long, image: perceptual}}", "data.workers=1"],
}
ROLES = {"alt": 1, "full": 1, "long": 4, "neg": 2}   # data=digits_captions: role -> texts per image


def metric_lines(run_dir: Path) -> list[str]:
    return (run_dir / "metrics.jsonl").read_text().splitlines()


def losses(lines: list[str]) -> list[tuple[int, float]]:
    """`(step, train/loss)` of the training records among metrics.jsonl lines."""
    return [(r["step"], r["train/loss"]) for r in map(json.loads, lines) if "train/loss" in r]


def perceptual_scales(lines: list[str]) -> list[tuple[int, float]]:
    """`(step, train/logit_scale_perceptual)`: the second image head's own temperature."""
    return [(r["step"], r["train/logit_scale_perceptual"]) for r in map(json.loads, lines) if "train/loss" in r]


def last_logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    # The writer may be caught mid-line: only whole records count.
    steps = [json.loads(line)["step"] for line in lines if line.endswith("}")]
    return max(steps, default=0)


def kill_at_step(command: list[str], root: Path, run_dir: Path, step: int, timeout: float = 300) -> int:
    """Runs `command` in its own process group and SIGKILLs the whole group once metrics.jsonl
    shows `step`; returns the last step logged before the kill landed."""
    env = {**os.environ, "CLIPKIT_ROOT": str(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while last_logged_step(run_dir) < step:
            if proc.poll() is not None:
                raise AssertionError(f"the run ended before step {step}:\n{proc.stderr.read().decode()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"step {step} not reached within {timeout} s")
            time.sleep(0.01)
    finally:
        kill_job(proc)
        proc.stderr.close()
    return last_logged_step(run_dir)


@pytest.fixture(scope="module")
def reference(digits_root):
    """config -> {step: loss} of one uninterrupted run, computed on first use."""
    by_config: dict[str, dict[int, float]] = {}

    def get(config: str) -> dict[int, float]:
        if config not in by_config:
            run_dir = digits_root / "outputs" / f"straight_{config}"
            run_cli(CONFIGS[config]([*RUN, f"run_name={run_dir.name}"]), digits_root)
            run = losses(metric_lines(run_dir))
            assert [s for s, _ in run] == list(range(1, STEPS + 1))
            by_config[config] = dict(run)
        return by_config[config]

    return get


def key_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "data_keys" / "rank00000.jsonl").read_text().splitlines()]


def check_chosen_texts(records: list[dict]) -> None:
    """Every step's record names, per role, each sample's chosen texts (pool or sentence indices)."""
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    long_counts = set()
    for record in records:
        assert record["texts"].keys() == ROLES.keys()
        for role, k in ROLES.items():
            chosen = record["texts"][role]
            assert len(chosen) == len(record["keys"]) == 16
            assert all(len(per_key) <= k and all(per_key) for per_key in chosen), (role, chosen)
        long_counts |= {len(per_key) for per_key in record["texts"]["long"]}
        assert all(len(per_key) == 1 for per_key in record["texts"]["alt"])
    assert 4 in long_counts   # the 6-sentence long captions give 4 sub-captions


@pytest.mark.parametrize("config, seed", [("1proc", 0), ("1proc", 1), ("1proc", 2), ("2proc_zero2", 0),
                                          ("1proc_texts", 0), ("1proc_heads", 0)])
def test_a_killed_run_resumes_bit_for_bit(digits_root, reference, config, seed):
    expected = reference(config)
    kill_step = random.Random(f"{config}/{seed}").randint(4, STEPS - 1)   # after the first checkpoint
    run_dir = digits_root / "outputs" / f"killed_{config}_{seed}"
    command = CONFIGS[config]([*RUN, f"run_name={run_dir.name}"])
    killed_after = kill_at_step(command, digits_root, run_dir, kill_step)
    tag = (run_dir / "checkpoints" / "latest").read_text()
    resumed_at = int(tag.removeprefix("step_"))
    assert 3 <= resumed_at <= killed_after < STEPS, (tag, killed_after)

    before_resume = metric_lines(run_dir)
    run_cli(CONFIGS[config]([*RUN, f"run_name={run_dir.name}", "trainer.resume=latest"]), digits_root)
    killed, resumed = losses(before_resume), losses(metric_lines(run_dir)[len(before_resume):])
    assert [s for s, _ in killed] == list(range(1, killed_after + 1))
    assert [s for s, _ in resumed] == list(range(resumed_at + 1, STEPS + 1))
    assert killed == [(s, expected[s]) for s, _ in killed]
    assert resumed == [(s, expected[s]) for s, _ in resumed]   # == on floats: bit for bit
    if config == "1proc_texts":
        # The resume dropped the key-log lines the killed run wrote past its checkpoint, then appended.
        records = key_records(run_dir)
        check_chosen_texts(records)
        assert records == key_records(digits_root / "outputs" / f"straight_{config}")
    if config == "1proc_heads":   # the perceptual head's temperature resumes bit for bit too
        straight = dict(perceptual_scales(metric_lines(digits_root / "outputs" / f"straight_{config}")))
        assert len(set(straight.values())) > 1   # it is trained
        got = perceptual_scales(before_resume) + perceptual_scales(metric_lines(run_dir)[len(before_resume):])
        assert got == [(s, straight[s]) for s, _ in got]


def _logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [s for s, _ in losses(metric_lines(run_dir))] if path.exists() else []


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_a_dead_or_hung_rank_ends_the_job_and_it_resumes(digits_root, fault):
    """Rank 1 of a 2-rank job is SIGKILLed, or stopped (a hung rank), mid-run. Rank 0 exits with a
    one-line error within launcher.timeout_minutes (0.25 min: 15 s) and torchrun ends the job with
    a failure; nobody waits forever. A resume from the last checkpoint then finishes the run."""
    run_dir = digits_root / "outputs" / f"dead_rank_{fault.name}"
    run = ["-m", "clipkit.train", "debug=fast", "eval=none", "trainer.export_open_clip=false",
           "trainer.checkpoint_every_n_steps=3", "trainer.log_every_n_steps=1", "data.global_batch_size=16",
           "data.workers=1", "launcher.timeout_minutes=0.25", f"run_name={run_dir.name}"]
    env = {**os.environ, "CLIPKIT_ROOT": str(digits_root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(torchrun(2, [*run, "trainer.max_steps=400"]), cwd=digits_root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while len(_logged_steps(run_dir)) < 4:   # past the first checkpoint (step 3)
            assert proc.poll() is None, proc.stderr.read().decode()[-4000:]
            assert time.monotonic() < deadline, "no training steps within the timeout"
            time.sleep(0.05)
        listed = subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True)
        rank0, rank1 = sorted(int(pid) for pid in listed.stdout.split())
        os.kill(rank1, fault)
        start = time.monotonic()
        while process_alive(rank0):
            assert time.monotonic() - start < 15 + 45, "rank 0 outlived launcher.timeout_minutes by 45 s"
            time.sleep(0.1)
        rank0_exit = time.monotonic() - start
        # torchrun then stops the rest: SIGTERM, and SIGKILL after its 30 s grace (a stopped rank ignores SIGTERM).
        _, stderr = proc.communicate(timeout=90)
    finally:
        kill_job(proc)
    stderr = stderr.decode()
    assert proc.returncode != 0
    # A killed rank's sockets stay open while its forked data workers live on (they hold copies
    # of gloo's descriptors until they notice their parent is gone), so even a dead peer can
    # take up to the timeout to be noticed; rank 0 left well within the loop's bound above.
    print(f"rank 0 exited {rank0_exit:.1f} s after rank 1 was {'killed' if fault == signal.SIGKILL else 'stopped'}")
    tag = (run_dir / "checkpoints" / "latest").read_text()
    assert ("clipkit-train: error: rank 0 lost contact with another rank" in stderr and "it died, or hung past "
            f"launcher.timeout_minutes=0.25; the last complete checkpoint is {tag}; resume with trainer.resume=latest"
            in stderr), stderr[-3000:]

    resumed_at = int(tag.removeprefix("step_"))
    run_cli(torchrun(2, [*run, f"trainer.max_steps={resumed_at + 2}", "trainer.resume=latest"]), digits_root)
    assert _logged_steps(run_dir)[-2:] == [resumed_at + 1, resumed_at + 2]
