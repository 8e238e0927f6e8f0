"""Composing the config: where the shipped configs live, the checks that turn Hydra's reports
into one-line errors, and the values derived once at the entry point.

`preflight` composes the config from the command line before `@hydra.main` runs, so an
unknown group option (`loss=focal`), a misspelt key (`trainer.max_stpes=5`: "did you mean
trainer.max_steps?"), a mistyped value (`trainer.zero_stage=two`) or a missing shard is
reported in one line naming the override, before any run directory, process group or worker
exists. The keys and their types are declared once, in `clipkit.schema`; a declared key needs
no `+` (preflight adds or drops it for Hydra), and no `+` adds an undeclared one.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clipkit import schema


def _conf_dir() -> Path:
    """The shipped Hydra configs: `clipkit/conf` inside an installed wheel, the repository's
    top-level `conf/` in a source checkout or an editable install."""
    package = Path(__file__).resolve().parent
    installed = package / "conf"
    return installed if (installed / "train.yaml").is_file() else package.parent / "conf"


CONF_DIR = _conf_dir()
# conf/train.yaml and conf/eval.yaml list the root schemas first in their defaults: anything that
# composes them (the CLIs, tests, a notebook) gets the schema by importing this module for CONF_DIR.
schema.register()

# Hydra command-line flags that take a value, and those that only print (no run, no checks).
_VALUE_FLAGS = {"--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn", "--cfg", "-c",
                "--package", "-p", "--info", "-i", "--experimental-rerun"}
_PRINT_ONLY = {"--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help", "--version",
               "--shell-completion", "-sc", "--resolve"}
# A shell brace pattern in a value: {00000..41407} or {a,b}, no Hydra dict (no ':' inside).
_BRACE_PATTERN = re.compile(r"\{[^{}:'\"]*(\.\.|,)[^{}:'\"]*\}")


def one_line(message: str) -> str:
    """Hydra's report as one line, without its search-path dump."""
    parts = []
    for line in str(message).splitlines():
        if line.startswith("Config search path"):
            break
        if line.strip():
            parts.append(line.strip().rstrip("."))
    return "; ".join(parts).replace(":; ", ": ")


def quote_brace_patterns(override: str) -> str:
    """`key=/data/{00000..41407}.tar` -> `key='/data/{00000..41407}.tar'`.

    The README's `data.train_urls='/data/laion/{00000..41407}.tar'` reaches Python without its
    quotes (the shell takes them), and Hydra's grammar reads `{` as the start of a dict. A value
    holding a shell brace pattern and no quotes of its own is quoted for Hydra, so the command
    works as printed. Hydra dicts (`key={a: 1}`) have a ':' inside the braces and are left alone.
    """
    key, sep, value = override.partition("=")
    if not sep or not _BRACE_PATTERN.search(value) or "'" in value or '"' in value or value.startswith("{"):
        return override
    return f"{key}{sep}'{value}'"


def _split_argv(argv: list[str]) -> tuple[list[str], dict[str, str | None]]:
    """-> (overrides, Hydra flags with their values)."""
    overrides, flags, i = [], {}, 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-"):
            name, eq, value = arg.partition("=")
            if name in _VALUE_FLAGS and not eq:
                value = argv[i + 1] if i + 1 < len(argv) else None
                i += 1
            flags[name] = value if (eq or name in _VALUE_FLAGS) else None
        else:
            overrides.append(arg)
        i += 1
    return overrides, flags


def resolve_step_budget(cfg: Any) -> None:
    """`trainer.epochs` (open_clip_train's habit) -> `trainer.max_steps`, in place.

    With `trainer.epochs=E`, max_steps = ceil(E · samples per epoch / data.global_batch_size),
    where an epoch is `data.train_num_samples` samples (or `data.epoch_samples` when resampled).
    """
    epochs = cfg.trainer.epochs
    if epochs is None:
        return
    samples = cfg.data.train_num_samples or cfg.data.epoch_samples
    if not samples:
        from clipkit.errors import ClipkitConfigError

        raise ClipkitConfigError(f"trainer.epochs={epochs:g} needs the epoch length: set data.train_num_samples "
                                 "(samples in the training shards), or give trainer.max_steps instead")
    cfg.trainer.max_steps = math.ceil(epochs * samples / cfg.data.global_batch_size)


def freeze(cfg: Any, config_name: str = "train") -> Any:
    """Checks the composed config against the schema (`clipkit.schema.validate`) and makes it
    read-only: from here on config flows down and nothing writes into it. Returns `cfg`."""
    from omegaconf import OmegaConf

    schema.validate(cfg, config_name)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _unparsable(overrides: list[str]) -> str | None:
    """A message naming the first override Hydra's grammar rejects, with quoting that works."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except HydraException as err:
            key, _, value = override.partition("=")
            return (f"cannot parse the override {override!r} ({one_line(err).split('; See ')[0]}); a value holding "
                    f"braces, spaces, ':' or '=' needs Hydra's quotes inside the shell's: \"{key}='{value}'\"")
    return None


def _override_key(override: str) -> str:
    """`+model.x@pkg=1` -> `model.x`."""
    return override.lstrip("+~").split("=", 1)[0].split("@", 1)[0]


def _plus_fix(message: str, overrides: list[str], toggled: set[int]) -> int | None:
    """The override to add a `+` to (Hydra: "Could not override 'k'": k is not in the config yet)
    or drop one from ("An item is already at 'k'"); None if Hydra's report is about neither."""
    missing = re.match(r"Could not override '([^']+)'", message)
    present = re.match(r"Could not append to config\. An item is already at '([^']+)'", message)
    for i, override in enumerate(overrides):
        if i in toggled:
            continue
        if missing and not override.startswith(("+", "~")) and _override_key(override) == missing[1]:
            return i
        if present and override.startswith("+") and not override.startswith("++") \
                and _override_key(override) == present[1]:
            return i
    return None


def compose_overrides(config_name: str, overrides: list[str]) -> tuple[Any, list[str]]:
    """Hydra's `compose`, inside `initialize_config_dir`, with `+` as the schema would have it:
    added to an override of a key the composed config lacks (a new `eval.sets.<name>`, a key
    inside a sub-dict), dropped from one of a key it has (`+model.patch_dropout=0.5` from an older
    command). Returns (config, the overrides as composed). A key that is not declared still
    gets in this way: `clipkit.schema.validate` is what refuses it."""
    from hydra import compose
    from hydra.errors import HydraException

    overrides, toggled = list(overrides), set()
    while True:
        try:
            return compose(config_name=config_name, overrides=overrides), overrides
        except HydraException as err:
            at = _plus_fix(str(err), overrides, toggled)
            if at is None:
                raise
            toggled.add(at)
            override = overrides[at]
            overrides[at] = override[1:] if override.startswith("+") else f"+{override}"


def preflight(prog: str, config_name: str, argv: list[str],
              check: Callable[[Any], None] | None = None) -> list[str]:
    """Composes the command line's overrides and exits with `prog: error: ...` if they do not
    compose, break the schema (`clipkit.schema.validate`) or `check(cfg)` raises a
    ClipkitConfigError. Returns argv for `@hydra.main`: shell brace patterns quoted for Hydra
    (`quote_brace_patterns`) and each override's `+` as `compose_overrides` settled it.

    `--config-dir DIR` (a user's own config folder, extending the shipped groups) is honoured;
    `--cfg`, `--info` and other print-only flags compose and check the schema, without `check`
    (no paths are read); a multirun (`-m`) and `--config-name`/`--config-path` are left to
    Hydra (each job's config is still checked against the schema when it starts).
    """
    argv = [a if a.startswith("-") else quote_brace_patterns(a) for a in argv]
    overrides, flags = _split_argv(argv)
    if {"-m", "--multirun", "-cn", "--config-name", "-cp", "--config-path", "--help", "-h", "--hydra-help",
            "--version", "--shell-completion", "-sc"} & set(flags):
        return argv
    overrides = [o for o in overrides if not o.startswith("hydra.")]
    config_dir = flags.get("--config-dir") or flags.get("-cd")
    search_path = [f"hydra.searchpath=[file://{Path(config_dir).resolve()}]"] if config_dir else []
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from clipkit.errors import ClipkitConfigError

    composed = overrides
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg, composed = compose_overrides(config_name, overrides + search_path)
        schema.validate(cfg, config_name)
        if check is not None and not (_PRINT_ONLY & set(flags)):
            check(cfg)
    except (HydraException, OmegaConfBaseException) as err:
        sys.exit(f"{prog}: error: {_unparsable(overrides) or schema.explain(err, config_name) or one_line(err)}")
    except ClipkitConfigError as err:
        sys.exit(f"{prog}: error: {err}")
    finally:
        GlobalHydra.instance().clear()
    settled = dict(zip(overrides, composed[:len(overrides)], strict=True))
    return [settled.get(a, a) for a in argv]
