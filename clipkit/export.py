"""`clipkit-export RUN_DIR [--tag step_00000500] [--out DIR]`: a run's checkpoint as open_clip weights.

    open_clip.create_model_and_transforms("local-dir:<out>")   # loads the result
"""

from __future__ import annotations

import argparse
import sys

from clipkit.checkpoint import export_open_clip
from clipkit.errors import ClipkitConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipkit-export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a clipkit run directory (outputs/<run_name>)")
    parser.add_argument("--tag", default=None, help="checkpoint tag; default: the latest complete one")
    parser.add_argument("--out", default=None, help="output directory; default: <run_dir>/export")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        weights = export_open_clip(args.run_dir, args.out, args.tag)
    except ClipkitConfigError as err:
        sys.exit(f"clipkit-export: error: {err}")
    print(f"wrote {weights} (load with open_clip.create_model_and_transforms('local-dir:{weights.parent}'))")


if __name__ == "__main__":
    main()
