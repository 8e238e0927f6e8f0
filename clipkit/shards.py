"""`clipkit-shards`: write webdataset shards from the bundled digits, an image folder, a CSV or a Parquet table.

    clipkit-shards digits data/digits
    clipkit-shards digits-captions data/digits_captions      # + long captions, hard negatives, two held-out sets
    clipkit-shards folder photos/ out/ --split train --processes 4 --max-side 512
    clipkit-shards csv pairs.csv out/ --caption-col text --extra-cols source,license
    clipkit-shards csv pairs.csv out/ --text-columns long_caption rewrites   # more texts per image
    clipkit-shards parquet val.parquet out/ --split test --classnames names.txt --templates templates.txt
    clipkit-shards urban1k Urban1k/ out/urban1k      # also dci, docci, sharegpt4v (long-caption retrieval)

`--text-columns` writes each further text column as a member `<column>.txt` (`--texts-in json`:
a field of the .json); a list-valued cell (a Parquet list, a JSON list in a CSV cell) always
goes into the .json. A folder's further texts are sidecars `name.<column>.txt`.

Output: `out/<split>/{00000..N}.tar` (train) or CLIP_benchmark's `out/<split>/{0..N}.tar` (other
splits; `--naming` overrides), `nshards.txt` and `stats.json` (see clipkit/data/writer.py). An eval
split without labels also gets CLIP_benchmark's `out/dataset_type.txt` ("retrieval").
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from clipkit.data.digits import write_digits_shards
from clipkit.data.digits_captions import write_digits_caption_shards
from clipkit.data.long_captions import READERS, write_retrieval_set
from clipkit.data.writer import (
    SHARD_NAMING,
    TEXTS_IN,
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
    for name, help_text in (
            ("digits", "sklearn's bundled 8x8 digits as train/ and test/ shards"),
            ("digits-captions", "the digits plus measured long captions and hard negatives (.json), and "
                                "long_retrieval/ and selection/ eval sets")):
        digits = commands.add_parser(name, help=help_text)
        digits.add_argument("out")
        digits.add_argument("--image-size", type=int, default=32)
        digits.add_argument("--shard-size", type=int, default=200)
        digits.add_argument("--seed", type=int, default=0)
        digits.add_argument("--overwrite", action="store_true")
    for name, help_text in (
            ("urban1k", "Urban-1k (a folder with image/ and caption/)"),
            ("dci", "DCI (the folder holding densely_captioned_images/)"),
            ("docci", "DOCCI (a folder with docci_descriptions.jsonlines and images/)"),
            ("sharegpt4v", "ShareGPT4V-1k (the ShareGPT4V caption json; images under --image-root)")):
        sub = commands.add_parser(name, help=f"{help_text} as a retrieval set in OUT/test/")
        sub.add_argument("src")
        sub.add_argument("out")
        sub.add_argument("--shard-size", type=int, default=1000, help="rows per shard (default: 1000)")
        sub.add_argument("--processes", type=int, default=1, help="parallel worker processes (default: 1)")
        sub.add_argument("--max-side", type=int, default=None, help="shrink images so the longer side fits")
        sub.add_argument("--overwrite", action="store_true", help="replace existing shards in OUT/test/")
        if name in ("dci", "docci"):
            sub.add_argument("--split", default=None if name == "dci" else "test",
                             help="the source's split (dci default: every split, as LoTLIP; docci default: test)")
        if name == "sharegpt4v":
            sub.add_argument("--image-root", default=None, help="image paths start here (default: the json's folder)")
            sub.add_argument("--count", type=int, default=1000, help="the first N entries (default: 1000)")
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
        sub.add_argument("--text-columns", nargs="+", default=[], metavar="COLUMN",
                         help="more texts per image: members <column>.txt (a folder: sidecars name.<column>.txt)")
        sub.add_argument("--texts-in", choices=TEXTS_IN, default="members",
                         help="where string texts of --text-columns go: tar members or .json fields")
        if name != "folder":
            sub.add_argument("--image-col", default=None, help="default: the first of path, url, image, filepath")
            sub.add_argument("--caption-col", default="caption")
            sub.add_argument("--label-col", default="label", help="integer class label, used when present")
            sub.add_argument("--extra-cols", default="", help="comma-separated columns kept in each sample's .json")
    return parser


def _run(args: argparse.Namespace) -> str:
    if args.command in ("digits", "digits-captions"):
        write = write_digits_shards if args.command == "digits" else write_digits_caption_shards
        stats = write(args.out, image_size=args.image_size, shard_size=args.shard_size, seed=args.seed,
                      overwrite=args.overwrite)
        sets = ", ".join(f"{name} {stats[name]['count']} samples in {len(stats[name]['shards'])} shards"
                         for name in ("train", "test", "long_retrieval", "selection") if name in stats)
        return f"wrote {stats['count']} digits to {args.out}: {sets}"
    if args.command in READERS:
        return _long_caption_set(args)
    texts = [c.strip() for given in args.text_columns for c in given.split(",") if c.strip()]
    if args.command == "folder":
        rows = rows_from_folder(args.src, text_columns=texts)
    else:
        extra = [c.strip() for c in args.extra_cols.split(",") if c.strip()]
        rows = rows_from_table(args.file, image_column=args.image_col, caption_column=args.caption_col,
                               label_column=args.label_col, extra_columns=extra, text_columns=texts)
    split_dir = f"{args.out}/{args.split}"
    metadata = read_eval_metadata(args.classnames, args.templates)  # checked before any shard is written
    naming = args.naming or naming_for_split(args.split)
    stats = write_rows(rows, split_dir, shard_size=args.shard_size, processes=args.processes,
                       max_side=args.max_side, timeout=args.timeout, overwrite=args.overwrite, naming=naming,
                       texts_in=args.texts_in)
    unlabelled_eval = args.split != "train" and all(row.label is None for row in rows)
    write_eval_metadata(args.out, metadata, dataset_type="retrieval" if unlabelled_eval else None)
    reasons = ", ".join(f"{n} {reason}" for reason, n in stats["failures_by_reason"].items())
    return (f"wrote {stats['count']} of {stats['rows']} rows in {len(stats['shards'])} shards to {split_dir} "
            f"({stats['failures']} failed{': ' + reasons if reasons else ''}; see {split_dir}/stats.json)")


def _long_caption_set(args: argparse.Namespace) -> str:
    if args.command == "sharegpt4v":
        rows = READERS[args.command](args.src, args.image_root, args.count)
    elif args.command in ("dci", "docci"):
        rows = READERS[args.command](args.src, args.split)
    else:
        rows = READERS[args.command](args.src)
    stats = write_retrieval_set(rows, args.out, shard_size=args.shard_size, processes=args.processes,
                                max_side=args.max_side, overwrite=args.overwrite)
    reasons = ", ".join(f"{n} {reason}" for reason, n in stats["failures_by_reason"].items())
    return (f"wrote {args.command}: {stats['count']} of {stats['rows']} image-caption pairs in {len(stats['shards'])} "
            f"shards to {args.out}/test ({stats['failures']} failed{': ' + reasons if reasons else ''})")


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        print(_run(args))
    except ClipkitConfigError as exn:
        sys.exit(f"clipkit-shards: error: {exn}")


if __name__ == "__main__":
    main()
