"""Writing webdataset shards from image folders, CSV files, or any stream of sample dicts."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import PIL.Image
from webdataset import TarWriter

from clipkit.errors import ClipkitConfigError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
ERROR_KEY = "__error__"


def _encode(sample: dict[str, Any]) -> dict[str, Any]:
    """Values as tar member bytes: str as utf-8, int (e.g. `cls`) as its decimal text."""
    out: dict[str, Any] = {}
    for key, value in sample.items():
        if isinstance(value, str) and not key.startswith("__"):
            value = value.encode("utf-8")
        elif isinstance(value, int):
            value = str(value).encode("utf-8")
        out[key] = value
    return out


def _write_tar(samples: list[dict[str, Any]], path: Path) -> None:
    """Writes one tar via a hidden temp name so no half-written tar ever has a final name."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as stream:
            # Fixed mtime: the same samples give byte-identical shards.
            writer = TarWriter(stream, encoder=False, mtime=0.0)
            for sample in samples:
                writer.write(_encode(sample))
            writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_shards(samples: Iterable[dict[str, Any]], out_dir: str | Path, *, shard_size: int,
                 overwrite: bool = False) -> dict[str, Any]:
    """Writes `out_dir/00000.tar, 00001.tar, ...` of `shard_size` samples each, plus nshards.txt and stats.json.

    Each sample holds `__key__` and member values (bytes, str, or int). A sample carrying
    `__error__` (a source that could not read an item) is counted as a failure, not written.
    Returns the stats: {"count": n, "shards": [{"name", "count"}], "failures": k}.
    """
    if shard_size < 1:
        raise ClipkitConfigError(f"shard_size must be >= 1, got {shard_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(out.glob("*.tar"))
    if existing and not overwrite:
        raise ClipkitConfigError(
            f"{out} already holds {len(existing)} .tar shards; pass --overwrite (overwrite=True) to replace them")
    for old in existing:
        old.unlink()
    shards: list[dict[str, Any]] = []
    failures = 0
    pending: list[dict[str, Any]] = []

    def flush() -> None:
        name = f"{len(shards):05d}.tar"
        _write_tar(pending, out / name)
        shards.append({"name": name, "count": len(pending)})
        pending.clear()

    for sample in samples:
        if ERROR_KEY in sample:
            failures += 1
            log.warning("skipping %s: %s", sample.get("__key__"), sample[ERROR_KEY])
            continue
        pending.append(sample)
        if len(pending) == shard_size:
            flush()
    if pending:
        flush()
    total = sum(shard["count"] for shard in shards)
    if not total:
        raise ClipkitConfigError(f"no samples to write to {out} ({failures} could not be read)")
    stats = {"count": total, "shards": shards, "failures": failures}
    (out / "nshards.txt").write_text(f"{len(shards)}\n")
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def _image_member(path: Path, max_side: int | None) -> tuple[str, bytes]:
    """(extension, bytes) of a verified image; re-encoded only when `max_side` shrinks it."""
    data = path.read_bytes()
    with PIL.Image.open(io.BytesIO(data)) as image:
        image.load()
        if max_side is None or max(image.size) <= max_side:
            return path.suffix.lower().lstrip("."), data
        fmt = image.format or "PNG"
        scale = max_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        resized = image.resize(size, PIL.Image.BICUBIC)
    if fmt == "JPEG" and resized.mode not in ("RGB", "L"):
        resized = resized.convert("RGB")
    buffer = io.BytesIO()
    resized.save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return {"JPEG": "jpg"}.get(fmt, fmt.lower()), buffer.getvalue()


def _label(text: str | None, where: str) -> int | None:
    if text is None or not text.strip():
        return None
    try:
        return int(text)
    except ValueError:
        raise ClipkitConfigError(f"label must be an integer, got {text.strip()!r} at {where}") from None


def _sample(key: str, image_path: Path, caption: str, label: int | None, max_side: int | None) -> dict[str, Any]:
    if not caption:
        return {"__key__": key, ERROR_KEY: f"empty caption for {image_path}"}
    try:
        ext, data = _image_member(image_path, max_side)
    except (OSError, ValueError, PIL.Image.DecompressionBombError) as exn:
        return {"__key__": key, ERROR_KEY: f"cannot read image {image_path}: {exn}"}
    sample: dict[str, Any] = {"__key__": key, ext: data, "txt": caption}
    if label is not None:
        sample["cls"] = label
    return sample


def samples_from_folder(folder: str | Path, max_side: int | None = None) -> Iterator[dict[str, Any]]:
    """Samples from `name.jpg|png|...` with caption `name.txt` and optional integer `name.cls`, sorted by path.

    The folder is checked now, not on first iteration, so a wrong path fails before
    `write_shards` touches the output directory.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ClipkitConfigError(f"image folder not found: {root}")
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())

    def generate() -> Iterator[dict[str, Any]]:
        for index, image_path in enumerate(images):
            key = f"{index:08d}"
            caption_path, label_path = image_path.with_suffix(".txt"), image_path.with_suffix(".cls")
            if not caption_path.is_file():
                yield {"__key__": key, ERROR_KEY: f"no caption file {caption_path}"}
                continue
            label = _label(label_path.read_text(), str(label_path)) if label_path.is_file() else None
            yield _sample(key, image_path, caption_path.read_text(encoding="utf-8").strip(), label, max_side)

    return generate()


def samples_from_csv(csv_path: str | Path, max_side: int | None = None) -> Iterator[dict[str, Any]]:
    """Samples from CSV rows `path,caption[,label]`; relative paths are resolved against the CSV's directory.

    The CSV is read and its columns checked now, before `write_shards` touches the output.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise ClipkitConfigError(f"CSV file not found: {csv_path}")
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"path", "caption"} - set(reader.fieldnames or ())
        if missing:
            raise ClipkitConfigError(f"{csv_path} lacks column(s) {sorted(missing)}; need path,caption[,label]")
        rows = list(reader)
    labels = [_label(row.get("label"), f"{csv_path} row {i + 2}") for i, row in enumerate(rows)]
    return (_sample(f"{i:08d}", csv_path.parent / row["path"], (row["caption"] or "").strip(), label, max_side)
            for i, (row, label) in enumerate(zip(rows, labels)))
