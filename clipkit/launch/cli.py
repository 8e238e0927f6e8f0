"""`clipkit-launch`: a training or eval run as a SLURM job, or under torchrun on this machine.

    clipkit-launch slurm --nodes 4 --gpus-per-node 8 --time 72:00:00 --partition P --account A -- experiment=...
    clipkit-launch slurm --eval --gpus-per-node 8 --time 2:00:00 --partition P -- run_dir=outputs/my_run
    clipkit-launch local --nproc 2 -- experiment=demo_digits

Everything after `--` is a Hydra override, as for `clipkit-train` (or `clipkit-eval` with
`--eval`). The overrides are composed and checked here first, for the job's world size, and a
bad one stops with `clipkit-launch: error: ...` before anything is submitted. `slurm` writes
the job script into `<run_dir>/launch/` (eval: `<out_dir>/launch/`), submits it and prints the
job id, the run directory and the log paths; `--dry-run` prints the script instead.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipkit.errors import ClipkitConfigError

PROG = "clipkit-launch"
# clipkit-launch's options that take one value which may itself start with "--".
_VERBATIM_VALUE = ("--sbatch-extra",)


@dataclass(frozen=True)
class Target:
    """What a job runs: `python -m <module>`, which composes `conf/<config_name>.yaml`."""

    module: str          # clipkit.train | clipkit.evaluate
    config_name: str     # train | eval
    template: str        # launch/slurm/<template>
    fixed: tuple[str, ...]   # overrides the template's srun line puts before the user's


TRAIN = Target("clipkit.train", "train", "train.sbatch", ("launcher=slurm", "trainer.resume=auto"))
EVAL = Target("clipkit.evaluate", "eval", "eval.sbatch", ())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    slurm = modes.add_parser("slurm", help="render the job script, check the config, sbatch it")
    local = modes.add_parser("local", help="torchrun on this machine")
    for sub in (slurm, local):
        sub.add_argument("--eval", action="store_true", help="run clipkit-eval instead of clipkit-train")
        sub.add_argument("--dry-run", action="store_true", help="print what would run; submit and write nothing")
        sub.add_argument("overrides", nargs="*", help="Hydra overrides, after --")
    local.add_argument("--nproc", type=int, default=None, help="processes (default: one per GPU, else 2)")
    # None: the value in conf/launcher/slurm.yaml (launcher.<key>).
    slurm.add_argument("--nodes", type=int)
    slurm.add_argument("--gpus-per-node", type=int)
    slurm.add_argument("--ntasks-per-node", type=int, help="ranks per node (default: one per GPU, 1 without)")
    slurm.add_argument("--cpus-per-task", type=int)
    slurm.add_argument("--mem", help="memory per node, e.g. 480G (0: all of it)")
    slurm.add_argument("--time", help="time limit: minutes, HH:MM:SS or D-HH:MM:SS")
    slurm.add_argument("--partition")
    slurm.add_argument("--account")
    slurm.add_argument("--qos")
    slurm.add_argument("--constraint")
    slurm.add_argument("--cluster", help="profile launch/slurm/clusters/NAME.env (or a FILE.env) the job sources")
    slurm.add_argument("--sbatch-extra", action="append", default=[],
                       help="one more #SBATCH option, e.g. --sbatch-extra '--exclusive' (repeatable)")
    return parser


def _join_verbatim_values(argv: list[str]) -> list[str]:
    """`--sbatch-extra --exclusive` -> `--sbatch-extra=--exclusive` (argparse would read the
    value as an option of its own); arguments after `--` are left alone."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--":
            return out + argv[i:]
        if argv[i] in _VERBATIM_VALUE and i + 1 < len(argv):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


@contextlib.contextmanager
def _world(size: int) -> Iterator[None]:
    """The checks see the job's world size (the batch split per rank) as rank 0 would."""
    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE")}
    os.environ.update(RANK="0", WORLD_SIZE=str(size))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _compose(target: Target, overrides: list[str], world_size, *, fixed: tuple[str, ...] = ()) -> tuple[Any, list[str]]:
    """`preflight` on `fixed` + the user's overrides -> (the composed config, the user's
    overrides as Hydra gets them). The target's checks run for the world size `world_size(cfg)`
    gives; an error exits with one line."""
    from clipkit.config import preflight

    if {"-m", "--multirun"} & set(overrides):
        sys.exit(f"{PROG}: error: a sweep is `clipkit-train -m hydra/launcher=clipkit_slurm ...` "
                 f"(one job per point); clipkit-launch submits one run")
    if target is TRAIN:
        from clipkit.train import check
    else:
        from clipkit.evaluate import check
    composed: list[Any] = []

    def check_for_world(cfg: Any) -> None:
        with _world(world_size(cfg)):
            check(cfg)
        composed.append(cfg)

    argv = preflight(PROG, target.config_name, [*fixed, *overrides], check=check_for_world)
    if not composed:
        sys.exit(f"{PROG}: error: nothing to launch: the arguments after -- only print ({' '.join(overrides)})")
    return composed[0], argv[len(fixed):]


def _launcher_defaults(cfg: Any, target: Target) -> dict[str, Any]:
    """`launcher.*` of the composed training config; for eval, conf/launcher/slurm.yaml's."""
    from omegaconf import OmegaConf

    if target is TRAIN:
        return OmegaConf.to_container(cfg.launcher, resolve=True)
    from clipkit.config import CONF_DIR

    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "launcher" / "slurm.yaml"), resolve=True)


def _resources(args: argparse.Namespace, defaults: dict[str, Any], target: Target, *, job_name: str,
               output: Path):
    from clipkit.launch.sbatch import SlurmResources

    def pick(flag: str, key: str):
        value = getattr(args, flag)
        return value if value is not None else defaults.get(key)

    gpus = int(pick("gpus_per_node", "gpus_per_node") or 0)
    tasks = pick("ntasks_per_node", "tasks_per_node") or max(gpus, 1)
    nodes = int(pick("nodes", "nodes") or 1)
    if target is EVAL and nodes != 1:
        raise ClipkitConfigError(f"--nodes {nodes}: an eval job runs on one node (its ranks share the sets)")
    training = target is TRAIN
    resources = SlurmResources(
        job_name=job_name, nodes=nodes, tasks_per_node=int(tasks), gpus_per_node=gpus,
        time=str(pick("time", "time")), output=str(output), chdir=str(Path.cwd()),
        cpus_per_task=pick("cpus_per_task", "cpus_per_task"),
        mem=None if pick("mem", "mem") is None else str(pick("mem", "mem")),
        partition=pick("partition", "partition"), account=pick("account", "account"), qos=pick("qos", "qos"),
        constraint=pick("constraint", "constraint"),
        signal_lead_s=int(defaults.get("signal_lead_s", 120)) if training else None,
        requeue=bool(defaults.get("requeue")) and training,
        extra=tuple([*(defaults.get("sbatch_extra") or []), *args.sbatch_extra]))
    resources.check()
    return resources


def _job_files(cfg: Any, target: Target) -> tuple[str, Path, str]:
    """(job name, the folder that holds the script and the job log, the file stem)."""
    if target is TRAIN:
        return cfg.run_name.replace("/", "_"), Path(cfg.paths.run_dir).resolve() / "launch", "train"
    from clipkit.evaluate import result_folder

    label = result_folder(Path(str(cfg.run_dir)).name if cfg.run_dir is not None else str(cfg.model_name))
    return f"eval-{label}", Path(cfg.out_dir).resolve() / "launch", f"eval-{label}"


def launch_slurm(args: argparse.Namespace, target: Target) -> int:
    """Checks, renders `launch/slurm/<target.template>` into the run's launch/ folder, sbatch."""
    from clipkit.launch.sbatch import SCRIPTS_DIR, cluster_profile, render, submit

    pending: dict[str, Any] = {}

    def world_size(cfg: Any) -> int:
        name, folder, stem = _job_files(cfg, target)
        pending["resources"] = _resources(args, _launcher_defaults(cfg, target), target, job_name=name,
                                          output=folder / f"{stem}-%j.out")
        return pending["resources"].world_size

    cfg, overrides = _compose(target, args.overrides, world_size, fixed=target.fixed)
    resources = pending["resources"]
    _, folder, stem = _job_files(cfg, target)
    profile_name = args.cluster or _launcher_defaults(cfg, target).get("cluster")
    profile = cluster_profile(profile_name) if profile_name else None
    profile_copy = folder / profile.name if profile else None
    script_path = folder / f"{stem}.sbatch"
    root = Path(str(cfg.paths.root)).resolve()
    what = f"run {cfg.run_name}" if target is TRAIN else f"eval of {cfg.run_dir or cfg.model_name}"
    about = [f"The {what}; `sbatch {script_path}` submits it again"
             + (" (it resumes from its latest checkpoint)." if target is TRAIN else ".")]
    script = render(SCRIPTS_DIR / target.template, resources, args=overrides, about=about, env={
        "CLIPKIT_PYTHON": sys.executable, "CLIPKIT_ROOT": str(root),
        "CLIPKIT_CLUSTER_PROFILE": str(profile_copy) if profile_copy else None})
    if args.dry_run:
        print(script, end="")
        print(f"{PROG}: dry run: nothing written or submitted (the script would be {script_path})", file=sys.stderr)
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    if profile:
        shutil.copyfile(profile, profile_copy)
    script_path.write_text(script)
    job = submit(script_path)
    where = Path(str(cfg.paths.run_dir if target is TRAIN else cfg.out_dir)).resolve()
    shape = f"{resources.nodes} node{'s' if resources.nodes > 1 else ''} x {resources.tasks_per_node} tasks"
    print(f"submitted job {job}: {what}, {shape}, time limit {resources.time}")
    print(f"  {'run directory' if target is TRAIN else 'results':<15}{where}")
    print(f"  {'job script':<15}{script_path}")
    print(f"  {'job log':<15}{folder / f'{stem}-{job}.out'}")
    if target is TRAIN:
        print(f"  {'training log':<15}{where / 'train.log'}")
    return 0


def launch_local(args: argparse.Namespace, target: Target) -> int:
    """Checks for `--nproc` ranks, then replaces this process with torchrun."""
    nproc = args.nproc
    if nproc is None:
        import torch

        nproc = torch.cuda.device_count() or 2
    if nproc < 1:
        raise ClipkitConfigError(f"--nproc {nproc}: need at least one process")
    cfg, overrides = _compose(target, args.overrides, lambda cfg: nproc)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", target.module, *overrides]
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    where = cfg.paths.run_dir if target is TRAIN else cfg.out_dir
    print(f"{PROG}: {nproc} processes; {'run directory' if target is TRAIN else 'results'} {Path(where).resolve()}",
          flush=True)
    os.execv(sys.executable, cmd)
    return 1  # not reached


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(_join_verbatim_values(sys.argv[1:] if argv is None else argv))
    target = EVAL if args.eval else TRAIN
    try:
        sys.exit(launch_slurm(args, target) if args.mode == "slurm" else launch_local(args, target))
    except ClipkitConfigError as err:
        sys.exit(f"{PROG}: error: {err}")


if __name__ == "__main__":
    main()
