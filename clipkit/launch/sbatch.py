"""SLURM job scripts: launch/slurm/*.sbatch rendered with a run's resources, then `sbatch`.

A template is a plain job script that also runs by hand (`sbatch launch/slurm/train.sbatch ...`).
Rendering keeps its body (everything after its `#SBATCH` block), puts `#SBATCH` lines made
from `SlurmResources` above it, and pins in a preamble what a requeued job must see again:
the interpreter, the data root, the cluster profile and the run's overrides. The result goes
into the run directory, so `sbatch <run_dir>/launch/train.sbatch` resubmits the same run.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from clipkit.errors import ClipkitConfigError


def _scripts_dir() -> Path:
    """launch/slurm: `clipkit/launch/slurm` inside an installed wheel, the repository's
    top-level `launch/slurm/` in a source checkout or an editable install."""
    package = Path(__file__).resolve().parent
    installed = package / "slurm"
    return installed if (installed / "train.sbatch").is_file() else package.parents[1] / "launch" / "slurm"


SCRIPTS_DIR = _scripts_dir()

# sbatch's --time: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def time_limit_s(value: str) -> int | None:
    """sbatch's `--time` in seconds ("72:00:00" -> 259200, "30" -> 1800); None for UNLIMITED.

    Raises ClipkitConfigError for anything sbatch would reject.
    """
    text = str(value).strip()
    if text.upper() in ("UNLIMITED", "INFINITE"):
        return None
    match = _TIME.match(text)
    if not match:
        raise ClipkitConfigError(f"--time {value!r} is not a SLURM time limit (minutes, HH:MM:SS or D-HH:MM:SS)")
    days, a, b, c = match.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        return int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    if c is not None:  # HH:MM:SS
        return int(a) * 3600 + int(b) * 60 + int(c)
    return int(a) * 60 + int(b or 0)  # minutes[:seconds]


@dataclass(frozen=True)
class SlurmResources:
    """One job's `#SBATCH` options. `signal_lead_s` None: no `--signal` (eval jobs)."""

    job_name: str
    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    time: str
    output: str                       # the job log; %j is the job id
    chdir: str
    cpus_per_task: int | None = None
    mem: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    signal_lead_s: int | None = None
    requeue: bool = False
    extra: tuple[str, ...] = ()

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    def check(self) -> None:
        """Raises ClipkitConfigError for what sbatch would reject or what would misbehave: a
        signal lead that is not shorter than the time limit signals the job as it starts."""
        if self.nodes < 1 or self.tasks_per_node < 1 or self.gpus_per_node < 0:
            raise ClipkitConfigError(f"--nodes {self.nodes}, --ntasks-per-node {self.tasks_per_node} and "
                                     f"--gpus-per-node {self.gpus_per_node}: need at least one node and one task")
        limit = time_limit_s(self.time)
        if self.signal_lead_s is not None and limit is not None and self.signal_lead_s >= limit:
            raise ClipkitConfigError(
                f"--time {self.time} ({limit} s) is not longer than the preemption warning launcher.signal_lead_s="
                f"{self.signal_lead_s}: SLURM would signal the job as it starts; give a longer --time")
        for name, value in self._options():
            if value is not True and re.search(r"\s", str(value)):
                raise ClipkitConfigError(f"--{name} {value!r}: a #SBATCH value cannot hold whitespace")
        for line in self.extra:
            if not line.startswith("-"):
                raise ClipkitConfigError(f"--sbatch-extra {line!r} is not an sbatch option (e.g. --exclusive)")

    def _options(self) -> list[tuple[str, object]]:
        options: list[tuple[str, object]] = [
            ("job-name", self.job_name), ("nodes", self.nodes), ("ntasks-per-node", self.tasks_per_node),
            ("gpus-per-node", self.gpus_per_node or None), ("cpus-per-task", self.cpus_per_task),
            ("mem", self.mem), ("time", self.time), ("partition", self.partition), ("account", self.account),
            ("qos", self.qos), ("constraint", self.constraint),
            ("signal", None if self.signal_lead_s is None else f"USR1@{self.signal_lead_s}"),
            ("requeue", self.requeue or None), ("open-mode", "append"), ("output", self.output),
            ("chdir", self.chdir)]
        return [(name, value) for name, value in options if value is not None]

    def sbatch_lines(self) -> list[str]:
        lines = [f"#SBATCH --{name}" if value is True else f"#SBATCH --{name}={value}"
                 for name, value in self._options()]
        return lines + [f"#SBATCH {line}" for line in self.extra]


def split_template(text: str) -> tuple[list[str], list[str]]:
    """A job script -> (its lines up to the last `#SBATCH` line, the body after it)."""
    lines = text.splitlines()
    last = max((i for i, line in enumerate(lines) if line.startswith("#SBATCH")), default=None)
    if last is None:
        raise ValueError("a job script template needs an #SBATCH block")
    return lines[:last + 1], lines[last + 1:]


def render(template: Path, resources: SlurmResources, *, args: Sequence[str], env: Mapping[str, str | None],
           about: Sequence[str] = ()) -> str:
    """The job script: `template`'s body under `resources`' #SBATCH lines and a preamble that
    exports `env` (None: unset) and sets `args` as the script's arguments (arguments given to
    a later `sbatch <script> ...` follow them). `about`: comment lines for its head."""
    _, body = split_template(template.read_text())
    preamble = [f"export {name}={shlex.quote(value)}" if value is not None else f"unset {name}"
                for name, value in env.items()]
    preamble.append(" ".join(["set --", *map(shlex.quote, args), '"$@"']))
    head = [f"# Rendered by clipkit-launch from launch/slurm/{template.name}.", *(f"# {line}" for line in about)]
    return "\n".join(["#!/usr/bin/env bash", *head, *resources.sbatch_lines(), *preamble, *body]) + "\n"


def cluster_profile(name: str) -> Path:
    """`--cluster NAME` -> launch/slurm/clusters/NAME.env, or NAME itself when it is a file."""
    path = Path(name)
    if path.suffix == ".env" and path.is_file():
        return path.resolve()
    shipped = SCRIPTS_DIR / "clusters" / f"{name}.env"
    if not shipped.is_file():
        known = ", ".join(sorted(p.stem for p in (SCRIPTS_DIR / "clusters").glob("*.env"))) or "none"
        raise ClipkitConfigError(f"--cluster {name}: no profile {shipped} (shipped: {known}); "
                                 f"give a profile's path (FILE.env) or add one there")
    return shipped


def submit(script: Path) -> str:
    """`sbatch --parsable <script>` -> the job id; raises ClipkitConfigError with sbatch's reason."""
    try:
        done = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise ClipkitConfigError("sbatch not found: run clipkit-launch slurm on a SLURM login node "
                                 "(or --dry-run to see the job script)") from None
    if done.returncode != 0:
        reason = " ".join(done.stderr.split()) or f"exit status {done.returncode}"
        raise ClipkitConfigError(f"sbatch refused {script}: {reason}")
    return done.stdout.strip().split(";")[0]
