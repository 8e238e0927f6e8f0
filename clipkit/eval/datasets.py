"""Eval sets read straight from files, no shards: CSV/JSONL captions and class folders.

Each reader yields the same `EvalBatch`es as `clipkit.data.eval_reader.iter_eval_batches`
(set order; item i belongs to rank i % world_size), so the suite embeds them alike.
The suite picks a reader by the set's key (conf/eval/*.yaml):

    urls:   webdataset shards (CLIP_benchmark layout)           -> clipkit.data
    csv:    rows of (image, caption); rows sharing an image are grouped, and a caption cell
            may also hold a JSON list of captions (COCO/Flickr: 5 per image)
    jsonl:  one {"image": path, "captions": [...]} (or "caption": str) per line
    folder: root/<class>/*.{jpg,png,...}; class names from root/classnames.txt (one per
            line, in sorted-directory order) or the directory names
Relative image paths resolve against the CSV/JSONL file's directory, or `image_root`.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import PIL.Image
import torch

from clipkit.data.eval_reader import CLASSNAMES_FILE, TEMPLATES_FILE, EvalBatch
from clipkit.errors import ClipkitConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
FILE_SOURCES = ("csv", "jsonl", "folder")


def _captions_of(cell: object) -> list[str]:
    if isinstance(cell, list):
        return [str(c).strip() for c in cell if str(c).strip()]
    text = str(cell or "").strip()
    if text.startswith("["):
        try:
            return _captions_of(json.loads(text))
        except json.JSONDecodeError:
            pass
    return [text] if text else []


def read_caption_items(path: str, *, image_key: str = "image", caption_key: str = "caption",
                       image_root: str | None = None) -> list[tuple[str, list[str], int]]:
    """CSV or JSONL (by suffix) -> [(image path, captions, label=-1)] in first-appearance order.

    JSONL rows may use `captions` (a list) or `caption_key`; CSV rows repeat an image
    once per caption or hold a JSON list in the caption cell.
    """
    if not os.path.isfile(path):
        raise ClipkitConfigError(f"eval set file not found: {path}")
    root = Path(image_root) if image_root else Path(path).parent
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    else:
        with open(path, newline="", encoding="utf-8") as f:
            records = list(csv.DictReader(f))
    grouped: dict[str, list[str]] = {}
    for n, rec in enumerate(records, 1):
        if image_key not in rec:
            raise ClipkitConfigError(f"{path} row {n}: no '{image_key}' column/key (have {sorted(rec)})")
        caps = _captions_of(rec.get("captions", rec.get(caption_key)))
        grouped.setdefault(str(rec[image_key]), []).extend(caps)
    return [(str(root / image), caps, -1) for image, caps in grouped.items()]


def folder_classes(root: str) -> tuple[list[str], list[str]]:
    """(class directory names sorted, class names for prompts): classnames.txt when present."""
    if not os.path.isdir(root):
        raise ClipkitConfigError(f"eval folder not found: {root}")
    dirs = sorted(d.name for d in Path(root).iterdir() if d.is_dir())
    names_file = Path(root) / CLASSNAMES_FILE
    names = [line.strip() for line in names_file.read_text(encoding="utf-8").splitlines() if line.strip()] \
        if names_file.exists() else list(dirs)
    if len(names) != len(dirs):
        raise ClipkitConfigError(f"{names_file}: {len(names)} names for {len(dirs)} class directories")
    return dirs, names


def folder_templates(root: str) -> list[str] | None:
    path = Path(root) / TEMPLATES_FILE
    if not path.exists():
        return None
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] or None


def read_folder_items(root: str) -> list[tuple[str, list[str], int]]:
    """root/<class>/<image> -> [(path, [], class index)], classes and files in sorted order."""
    dirs, _ = folder_classes(root)
    items = [(str(p), [], label) for label, d in enumerate(dirs)
             for p in sorted(Path(root, d).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise ClipkitConfigError(f"eval folder {root}: no images ({', '.join(IMAGE_SUFFIXES)}) under class dirs")
    return items


def iter_item_batches(items: list[tuple[str, list[str], int]], *,
                      preprocess: Callable[[PIL.Image.Image], torch.Tensor], batch_size: int,
                      rank: int = 0, world_size: int = 1) -> Iterator[EvalBatch]:
    """EvalBatches of this rank's items (item i is rank i % world_size's), images decoded lazily."""
    mine = items[rank::world_size]
    for s in range(0, len(mine), batch_size):
        chunk = mine[s:s + batch_size]
        images = []
        for path, _, _ in chunk:
            try:
                with PIL.Image.open(path) as raw:
                    images.append(preprocess(raw.convert("RGB")))
            except (OSError, ValueError) as exn:
                # Skipping would silently change the metric's denominator, so eval refuses instead.
                raise ClipkitConfigError(f"eval image {path}: unreadable ({exn})") from exn
        yield EvalBatch(images=torch.stack(images), captions=[caps for _, caps, _ in chunk],
                        labels=torch.tensor([label for _, _, label in chunk], dtype=torch.long),
                        keys=[path for path, _, _ in chunk])
