"""Preemption: a signal asks for a checkpoint at the next step boundary, then a clean stop.

SLURM warns a job before its time limit or a preemption with `--signal=USR1@<seconds>`
(`launch/slurm/train.sbatch` asks for it), and schedulers end a job with SIGTERM. The handler
only sets a flag; the trainer folds the flag into the loss all-reduce it does every step, so
every rank sees the request at the same step, whichever rank the signal reached first. The
run then saves a checkpoint (atomic, like any other), and under SLURM with `launcher.requeue`
rank 0 requeues the job, which resumes there with `trainer.resume=auto`. `clipkit-train`
exits with PREEMPTED_EXIT_CODE, so a wrapper script can tell an early stop from a finished run.

Selected by `launcher.preempt_signals` (names such as SIGUSR1) and `launcher.requeue`.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Sequence

log = logging.getLogger(__name__)

# EX_TEMPFAIL from sysexits.h: "a temporary failure; the request may be retried".
PREEMPTED_EXIT_CODE = 75


class Preempted(Exception):
    """Raised by `run_training` on every rank after the preemption checkpoint is written."""

    def __init__(self, step: int, requeued: bool):
        self.step, self.requeued = step, requeued
        then = "the SLURM job was requeued and resumes there" if requeued else \
            "resume with trainer.resume=latest (or auto)"
        super().__init__(f"stopped by a preemption signal after step {step}, whose checkpoint is saved; {then}")


def parse_signals(names: Sequence[str]) -> list[signal.Signals]:
    """["SIGUSR1", "TERM", ...] -> signals; an unknown name is a ValueError naming it."""
    out = []
    for name in names:
        key = str(name).upper()
        key = key if key.startswith("SIG") else f"SIG{key}"
        if key not in signal.Signals.__members__ or key in ("SIGKILL", "SIGSTOP"):
            raise ValueError(f"launcher.preempt_signals: {name!r} is not a signal a process can catch")
        out.append(signal.Signals[key])
    return out


class PreemptionWatch:
    """Installs handlers for `signals` that record the first one received (main thread only).

    After `close` (training is over) a signal is logged and ignored: a SIGUSR1 that arrives
    after the last step must neither kill a finishing run (its default action) nor requeue it,
    and the SIGTERM with which a requeue ends the job must not cut the exit short.
    """

    def __init__(self, signals: Sequence[signal.Signals]):
        self.received: signal.Signals | None = None
        self.closed = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def _handle(self, signum: int, frame) -> None:
        if self.closed:
            log.warning("received %s after training stopped: ignored while the run finishes",
                        signal.Signals(signum).name)
        elif self.received is None:
            self.received = signal.Signals(signum)
            log.warning("received %s: checkpointing at the end of this step, then stopping", self.received.name)

    @property
    def flag(self) -> float:
        """1.0 once a signal arrived on this rank, else 0.0 (summed over ranks by the trainer)."""
        return float(self.received is not None)

    def close(self) -> None:
        """Training is over: from now on the signals are logged and ignored (see the class)."""
        self.closed = True

    def restore(self) -> None:
        """Gives the signals back their handlers from before the watch."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


def ignore_preemption_signals(worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: SLURM signals every process of a job step, data workers
    included, and SIGUSR1's default action would kill them mid-batch; the main process stops
    them itself once its checkpoint is written."""
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def requeue_slurm_job() -> bool:
    """`scontrol requeue $SLURM_JOB_ID` (the job must allow it: `sbatch --requeue`); False outside SLURM."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if done.returncode != 0:
        log.error("scontrol requeue %s failed: %s", job, done.stderr.strip())
        return False
    log.warning("requeued SLURM job %s; it resumes from the checkpoint just written", job)
    return True
