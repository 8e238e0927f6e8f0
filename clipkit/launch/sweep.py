"""Hydra multiruns (`clipkit-train -m ...`): each point named after its swept overrides, and
every point checked before anything is submitted.

    clipkit-train -m hydra/launcher=clipkit_slurm experiment=demo_digits loss=clip,siglip optim.lr=1e-3,3e-4

runs four jobs in `outputs/demo_digits-<loss>/loss=<loss>,optim.lr=<lr>`: a point's run_name is
the run_name its config gives, then `/`, then the overrides that differ between points (Hydra's
`job.override_dirname` with every fixed key excluded, made path-safe). A requeued or rerun point
lands in the same directory, so `trainer.resume=auto` finds its checkpoints. Hydra's own output
of a point (.hydra/, train.log) goes there too, as for a single run, instead of a time-stamped
multirun/ folder.

`prepare_multirun` composes every point on the login node with `preflight` (the one-line
errors of a single run, naming the point) and adds the Hydra overrides that do the naming;
`name_sweep_run` applies the same name inside each job.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from clipkit.config import _split_argv, preflight, quote_brace_patterns

RESOLVER = "clipkit.sweep_run_name"
MULTIRUN_FLAGS = ("-m", "--multirun")
# The Hydra settings `prepare_multirun` adds unless the command line sets them.
SWEEP_DIR = "hydra.sweep.dir='${paths.output_dir}'"
SWEEP_SUBDIR = "hydra.sweep.subdir='${" + RESOLVER + ":${run_name}}'"
EXCLUDE_KEYS = "hydra.job.config.override_dirname.exclude_keys"


def point_name(override_dirname: str) -> str:
    """`loss=siglip,data.train_urls=/data/{0..9}.tar` -> one path-safe folder name (long ones
    end in a hash of the whole, so two points never share a folder)."""
    safe = re.sub(r"[^A-Za-z0-9._,=+@-]+", "_", override_dirname).strip("_")
    if len(safe) > 120:
        safe = f"{safe[:100]}-{hashlib.sha1(override_dirname.encode()).hexdigest()[:10]}"
    return safe


def sweep_run_name(base: str, override_dirname: str) -> str:
    """A point's run_name: `base/<point>`, or `base` when nothing is swept."""
    point = point_name(override_dirname)
    return f"{base}/{point}" if point else base


def _job_run_name(base: str) -> str:
    from hydra.core.hydra_config import HydraConfig

    return sweep_run_name(base, HydraConfig.get().job.override_dirname)


if not OmegaConf.has_resolver(RESOLVER):
    # hydra.sweep.subdir resolves in the job (a submitit job unpickles clipkit.train, which imports this).
    OmegaConf.register_new_resolver(RESOLVER, _job_run_name)


def name_sweep_run(cfg: Any) -> None:
    """In a multirun job, `cfg.run_name` (and so `paths.run_dir`) becomes the point's name, in place."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        cfg.run_name = _job_run_name(cfg.run_name)


def is_multirun(argv: list[str]) -> bool:
    return any(a in MULTIRUN_FLAGS for a in argv)


def _parse(overrides: list[str], prog: str) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from clipkit.config import _unparsable, one_line

    try:
        return OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        sys.exit(f"{prog}: error: {_unparsable(overrides) or one_line(err)}")


def _check_signal_delay(prog: str, config_dir: str | None, hydra_overrides: list[str], point: list[str]) -> None:
    """A SLURM launcher whose signal delay is not below its time limit signals every job as it
    starts (submitit's USR2@90 with a 2-minute limit fires after 3 s): refuse it here."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from clipkit.config import CONF_DIR, one_line

    overrides = [*hydra_overrides, *point]
    if config_dir:
        overrides.append(f"hydra.searchpath=[file://{Path(config_dir).resolve()}]")
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            launcher = compose("train", overrides=overrides, return_hydra_config=True).hydra.launcher
    except (HydraException, OmegaConfBaseException) as err:  # a mistyped hydra.launcher.* key
        sys.exit(f"{prog}: error: {one_line(err)}")
    finally:
        GlobalHydra.instance().clear()
    delay, minutes = launcher.get("signal_delay_s"), launcher.get("timeout_min")
    if delay is not None and minutes is not None and int(delay) >= int(minutes) * 60:
        sys.exit(f"{prog}: error: hydra.launcher.signal_delay_s={delay} is not below the time limit "
                 f"hydra.launcher.timeout_min={minutes} ({int(minutes) * 60} s): SLURM would signal every job as "
                 f"it starts; raise timeout_min or lower signal_delay_s")
    if str(launcher.get("_target_", "")).endswith("SlurmLauncher") and "signal" not in (
            launcher.get("additional_parameters") or {}):
        print(f"{prog}: warning: this launcher warns jobs with submitit's USR2, which clipkit does not "
              f"checkpoint on; hydra/launcher=clipkit_slurm sends USR1", file=sys.stderr)


def prepare_multirun(prog: str, argv: list[str], check: Callable[[Any], None] | None = None) -> list[str]:
    """Checks every point of a `-m` command line as `preflight` checks a single run (exits with
    `prog: error: ... (sweep point i/n: ...)`), then returns argv with the naming overrides."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    argv = [a if a.startswith("-") else quote_brace_patterns(a) for a in argv]
    words, flag_values = _split_argv(argv)
    flags = [a for a in argv if a not in words and a not in MULTIRUN_FLAGS]
    hydra_overrides = [o for o in words if o.startswith(("hydra.", "hydra/"))]
    task = _parse([o for o in words if o not in hydra_overrides], prog)
    swept = {o.key_or_group for o in task if o.is_sweep_override()} - {"run_name"}
    fixed = sorted({o.key_or_group for o in task} - swept - {"run_name"})
    try:
        points = BasicSweeper.split_arguments(task, None)[0]
    except Exception as err:  # a range or interval sweep the basic sweeper cannot expand
        sys.exit(f"{prog}: error: {err}")
    print_only = {"--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help"} & set(flag_values)
    for i, point in enumerate(points):
        name = ",".join(sorted(o.input_line for o in _parse(point, prog) if o.key_or_group in swept))

        def check_point(cfg: Any, name: str = name) -> None:
            cfg.run_name = sweep_run_name(cfg.run_name, name)
            if check is not None:
                check(cfg)

        try:
            preflight(prog, "train", [*flags, *hydra_overrides, *point], check=check_point)
        except SystemExit as stop:
            if not isinstance(stop.code, str):
                raise
            hint = "; pip install 'clipkit[launch]' for hydra-submitit-launcher" \
                if "hydra/launcher/submitit" in stop.code else ""
            where = f" (sweep point {i + 1}/{len(points)}: {name})" if len(points) > 1 else ""
            sys.exit(f"{stop.code}{hint}{where}")
    if not ({"-cn", "--config-name", "-cp", "--config-path"} | print_only) & set(flag_values):
        _check_signal_delay(prog, flag_values.get("--config-dir") or flag_values.get("-cd"), hydra_overrides,
                            points[0])
    given = {o.split("=", 1)[0] for o in hydra_overrides}
    extra = [SWEEP_DIR, SWEEP_SUBDIR, f"{EXCLUDE_KEYS}=[{','.join(repr(k) for k in ['run_name', *fixed])}]"]
    # Hydra's parser takes the overrides as one run of words: flags first, then every override.
    return [a for a in argv if a not in words] + words + [o for o in extra if o.split("=", 1)[0] not in given]
