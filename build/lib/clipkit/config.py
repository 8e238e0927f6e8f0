"""Config composition checks that turn Hydra's multi-line reports into one-line errors.

`preflight` composes the config from the command line once, before `@hydra.main` runs, so
an unknown group option (`loss=focal`) or a mistyped key (`trainer.max_stpes=5`) is
reported in one line naming the override, before any process group or worker exists.
"""

from __future__ import annotations

import sys
from pathlib import Path


def _conf_dir() -> Path:
    """The shipped Hydra configs: `clipkit/conf` inside an installed wheel, the repository's
    top-level `conf/` in a source checkout or an editable install."""
    package = Path(__file__).resolve().parent
    installed = package / "conf"
    return installed if (installed / "train.yaml").is_file() else package.parent / "conf"


CONF_DIR = _conf_dir()


def one_line(message: str) -> str:
    """Hydra's report as one line, without its search-path dump."""
    parts = []
    for line in str(message).splitlines():
        if line.startswith("Config search path"):
            break
        if line.strip():
            parts.append(line.strip().rstrip("."))
    return "; ".join(parts).replace(":; ", ": ")


def preflight(prog: str, config_name: str, argv: list[str]) -> None:
    """Exits with `prog: error: ...` if the overrides in `argv` do not compose."""
    overrides = [a for a in argv if not a.startswith("hydra.") and not a.startswith("-")]
    if len(overrides) != len(argv):  # Hydra flags (--multirun, -cn, ...): leave them to Hydra
        return
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        sys.exit(f"{prog}: error: {one_line(err)}")
    finally:
        GlobalHydra.instance().clear()
