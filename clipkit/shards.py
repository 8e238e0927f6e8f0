"""`clipkit-shards`: write webdataset shards from the bundled digits, an image folder, or a CSV."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from clipkit.data.digits import write_digits_shards
from clipkit.data.writer import samples_from_csv, samples_from_folder, write_shards
from clipkit.errors import ClipkitConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipkit-shards", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    digits = commands.add_parser("digits", help="sklearn's bundled 8x8 digits as train/ and test/ shards")
    digits.add_argument("out")
    digits.add_argument("--image-size", type=int, default=32)
    digits.add_argument("--shard-size", type=int, default=200)
    digits.add_argument("--seed", type=int, default=0)
    digits.add_argument("--overwrite", action="store_true")
    for name, source, help_text in (("folder", "src", "images with name.txt caption (and name.cls label) sidecars"),
                                    ("csv", "file", "a CSV with path,caption[,label] columns")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument(source)
        sub.add_argument("out")
        sub.add_argument("--shard-size", type=int, default=1000)
        sub.add_argument("--max-side", type=int, default=None, help="shrink images so the longer side fits")
        sub.add_argument("--overwrite", action="store_true")
    return parser


def _run(args: argparse.Namespace) -> str:
    if args.command == "digits":
        stats = write_digits_shards(args.out, image_size=args.image_size, shard_size=args.shard_size,
                                    seed=args.seed, overwrite=args.overwrite)
        train, test = stats["train"], stats["test"]
        return (f"wrote {stats['count']} digits to {args.out}: train {train['count']} samples in "
                f"{len(train['shards'])} shards, test {test['count']} samples in {len(test['shards'])} shards")
    samples = (samples_from_folder(args.src, args.max_side) if args.command == "folder"
               else samples_from_csv(args.file, args.max_side))
    stats = write_shards(samples, args.out, shard_size=args.shard_size, overwrite=args.overwrite)
    return (f"wrote {stats['count']} samples in {len(stats['shards'])} shards to {args.out} "
            f"({stats['failures']} failed, see {args.out}/stats.json)")


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        print(_run(args))
    except ClipkitConfigError as exn:
        sys.exit(f"clipkit-shards: error: {exn}")


if __name__ == "__main__":
    main()
