"""`clipkit-shards`: write webdataset shards from the bundled digits, an image folder, a CSV or a Parquet table.

    clipkit-shards digits data/digits
    clipkit-shards folder photos/ out/ --split train --processes 4 --max-side 512
    clipkit-shards csv pairs.csv out/ --caption-col text --extra-cols source,license
    clipkit-shards parquet val.parquet out/ --split test --classnames names.txt --templates templates.txt

Output: `out/<split>/{00000..N}.tar` (train) or CLIP_benchmark's `out/<split>/{0..N}.tar` (other
splits; `--naming` overrides), `nshards.txt` and `stats.json` (see clipkit/data/writer.py). An eval
split without labels also gets CLIP_benchmark's `out/dataset_type.txt` ("retrieval").
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from clipkit.data.digits import write_digits_shards
from clipkit.data.writer import (
    SHARD_NAMING,
    naming_for_split,
    read_eval_metadata,
    rows_from_folder,
    rows_from_table,
    write_eval_metadata,
    write_rows,
)
from clipkit.errors import ClipkitConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipkit-shards", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    digits = commands.add_parser("digits", help="sklearn's bundled 8x8 digits as train/ and test/ shards")
    digits.add_argument("out")
    digits.add_argument("--image-size", type=int, default=32)
    digits.add_argument("--shard-size", type=int, default=200)
    digits.add_argument("--seed", type=int, default=0)
    digits.add_argument("--overwrite", action="store_true")
    for name, source, help_text in (
            ("folder", "src", "images with name.txt caption (and name.cls label) sidecars"),
            ("csv", "file", "a CSV with an image path or URL column and a caption column"),
            ("parquet", "file", "a Parquet table with an image path or URL column and a caption column")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument(source)
        sub.add_argument("out")
        sub.add_argument("--split", default="train", help="shards go to OUT/SPLIT/ (default: train)")
        sub.add_argument("--shard-size", type=int, default=1000, help="rows per shard (default: 1000)")
        sub.add_argument("--processes", type=int, default=1, help="parallel worker processes (default: 1)")
        sub.add_argument("--max-side", type=int, default=None, help="shrink images so the longer side fits")
        sub.add_argument("--timeout", type=float, default=10.0, help="seconds per http(s) download")
        sub.add_argument("--classnames", help="eval sets: copied to OUT/classnames.txt")
        sub.add_argument("--templates", help="eval sets: copied to OUT/zeroshot_classification_templates.txt")
        sub.add_argument("--overwrite", action="store_true", help="replace existing shards in OUT/SPLIT/")
        sub.add_argument("--naming", choices=SHARD_NAMING, default=None,
                         help="shard file names: img2dataset's 00000.tar or CLIP_benchmark's 0.tar "
                              "(default: img2dataset for --split train, clip_benchmark otherwise)")
        if name != "folder":
            sub.add_argument("--image-col", default=None, help="default: the first of path, url, image, filepath")
            sub.add_argument("--caption-col", default="caption")
            sub.add_argument("--label-col", default="label", help="integer class label, used when present")
            sub.add_argument("--extra-cols", default="", help="comma-separated columns kept in each sample's .json")
    return parser


def _run(args: argparse.Namespace) -> str:
    if args.command == "digits":
        stats = write_digits_shards(args.out, image_size=args.image_size, shard_size=args.shard_size,
                                    seed=args.seed, overwrite=args.overwrite)
        train, test = stats["train"], stats["test"]
        return (f"wrote {stats['count']} digits to {args.out}: train {train['count']} samples in "
                f"{len(train['shards'])} shards, test {test['count']} samples in {len(test['shards'])} shards")
    if args.command == "folder":
        rows = rows_from_folder(args.src)
    else:
        extra = [c.strip() for c in args.extra_cols.split(",") if c.strip()]
        rows = rows_from_table(args.file, image_column=args.image_col, caption_column=args.caption_col,
                               label_column=args.label_col, extra_columns=extra)
    split_dir = f"{args.out}/{args.split}"
    metadata = read_eval_metadata(args.classnames, args.templates)  # checked before any shard is written
    naming = args.naming or naming_for_split(args.split)
    stats = write_rows(rows, split_dir, shard_size=args.shard_size, processes=args.processes,
                       max_side=args.max_side, timeout=args.timeout, overwrite=args.overwrite, naming=naming)
    unlabelled_eval = args.split != "train" and all(row.label is None for row in rows)
    write_eval_metadata(args.out, metadata, dataset_type="retrieval" if unlabelled_eval else None)
    reasons = ", ".join(f"{n} {reason}" for reason, n in stats["failures_by_reason"].items())
    return (f"wrote {stats['count']} of {stats['rows']} rows in {len(stats['shards'])} shards to {split_dir} "
            f"({stats['failures']} failed{': ' + reasons if reasons else ''}; see {split_dir}/stats.json)")


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        print(_run(args))
    except ClipkitConfigError as exn:
        sys.exit(f"clipkit-shards: error: {exn}")


if __name__ == "__main__":
    main()
