"""Writing webdataset shards: from image folders, CSV or Parquet tables (in parallel), or any sample stream.

Layout, compatible with img2dataset's output and CLIP_benchmark's webdataset sets:

    out/{split}/00000.tar ...   members <key>.jpg|png|webp, <key>.txt (caption), <key>.cls (label),
                                <key>.json (source, sizes, extra columns); keys are 9-digit row numbers;
                                more text columns (`text_columns`) as <key>.<column>.txt, or as .json
                                fields (`texts_in="json"`; a list of texts always goes there)
    out/{split}/nshards.txt     number of shards
    out/{split}/stats.json      counts, failures by reason, per-shard sample counts
    out/classnames.txt, out/zeroshot_classification_templates.txt   (eval sets, when given)
    out/dataset_type.txt        "retrieval" for an eval split without labels (CLIP_benchmark)

Shard names: img2dataset's zero-padded `00000.tar` for the train split, CLIP_benchmark's
`0.tar, 1.tar, ...` for eval splits (`naming`), so `clip_benchmark eval --dataset wds/<name>
--dataset_root out` reads an eval split as it is.

Input rows are cut into shards of `shard_size` rows up front and each shard is one task
for a process pool, so the output does not depend on the number of processes. Rows that
fail (missing file, failed download, undecodable image, no caption) are counted per reason
and left out; shards are numbered contiguously after the failures are known. Every tar is
written under a hidden temporary name and renamed when complete.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import urllib.request
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image
from webdataset import TarWriter

from clipkit.data.eval_reader import CLASSNAMES_FILE, DATASET_TYPE_FILE, TEMPLATES_FILE
from clipkit.errors import ClipkitConfigError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
ERROR_KEY = "__error__"
IMAGE_COLUMNS = ("path", "url", "image", "filepath")
TEXTS_IN = ("members", "json")
# Keys every sample's .json has; a text column of the same name would overwrite one.
_META_KEYS = ("key", "url", "caption", "width", "height", "original_width", "original_height")
_TEXT_COLUMN = re.compile(r"^[A-Za-z0-9_-]+$")
USER_AGENT = "clipkit-shards/0.1"


@dataclass(frozen=True)
class Row:
    """One input item. `image` is a local path, a `file://` URL or an http(s) URL; `texts` are
    more texts by column name, each a string or a list of strings (`check_text_columns`)."""

    index: int
    image: str
    caption: str | None
    label: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    texts: dict[str, str | list[str]] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.index:09d}"


class RowFailure(Exception):
    """A row that cannot become a sample; `reason` is its failure category in stats.json."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


# -- one row -> one sample -------------------------------------------------------------------

def _fetch(image: str, timeout: float) -> bytes:
    if "://" not in image:
        try:
            return Path(image).read_bytes()
        except OSError as exn:
            raise RowFailure("image not found", f"{image}: {exn}") from None
    if not image.startswith(("http://", "https://", "file://")):
        raise RowFailure("unsupported url", image)
    request = urllib.request.Request(image, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()
    except (OSError, ValueError) as exn:   # URLError, HTTPError, timeouts are OSErrors
        raise RowFailure("download failed", f"{image}: {exn}") from None


def _image_member(data: bytes, max_side: int | None, image: str) -> tuple[str, bytes, tuple[int, int], tuple[int, int]]:
    """(extension, bytes, original size, stored size) of a fully decoded image; re-encoded only to shrink it.
    `image` is the row's path or URL, for the failure message."""
    try:
        with PIL.Image.open(io.BytesIO(data)) as image:
            image.load()
            fmt, original = image.format or "PNG", image.size
            ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}.get(fmt)
            if ext is not None and (max_side is None or max(image.size) <= max_side):
                return ext, data, original, original
            scale = min(1.0, max_side / max(image.size)) if max_side else 1.0
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            resized = image.resize(size, PIL.Image.BICUBIC) if size != image.size else image.copy()
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as exn:
        raise RowFailure("undecodable image", f"{image}: {exn}") from None
    if ext is None:   # GIF, BMP, TIFF, ...: stored as PNG so every reader can decode it
        fmt, ext = "PNG", "png"
    if fmt == "JPEG" and resized.mode not in ("RGB", "L"):
        resized = resized.convert("RGB")
    buffer = io.BytesIO()
    resized.save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return ext, buffer.getvalue(), original, resized.size


def check_text_columns(columns: Sequence[str]) -> list[str]:
    """Names of extra text columns: letters, digits, `_`, `-` (each becomes `<name>.txt` or a .json field)."""
    for name in columns:
        if not _TEXT_COLUMN.match(name):
            raise ClipkitConfigError(f"text column {name!r} must be letters, digits, _ or - (it names a tar member)")
        if name in _META_KEYS:
            raise ClipkitConfigError(f"text column {name!r} would overwrite the .json's own {name!r}; rename it")
    if len({c.lower() for c in columns}) != len(columns):
        raise ClipkitConfigError(f"text columns {list(columns)} name a member twice (member names are lower case)")
    return list(columns)


def _text_members(row: Row, texts_in: str) -> tuple[dict[str, str], dict[str, Any]]:
    """(tar members, .json fields) of a row's extra texts; empty texts are left out."""
    members, fields = {}, {}
    for name, value in row.texts.items():
        if isinstance(value, list):
            kept = [str(t).strip() for t in value if t is not None and str(t).strip()]
            if kept:
                fields[name] = kept
        elif value is not None and str(value).strip():
            if texts_in == "json":
                fields[name] = str(value).strip()
            else:
                members[f"{name.lower()}.txt"] = str(value).strip()
    return members, fields


def row_sample(row: Row, *, max_side: int | None = None, timeout: float = 10.0,
               texts_in: str = "members") -> dict[str, Any]:
    """The sample dict for one row; raises RowFailure."""
    if row.caption is None:
        raise RowFailure("missing caption", row.image)
    caption = row.caption.strip()
    if not caption:
        raise RowFailure("empty caption", row.image)
    ext, data, original, stored = _image_member(_fetch(row.image, timeout), max_side, row.image)
    members, fields = _text_members(row, texts_in)
    meta = {"key": row.key, "url": row.image, "caption": caption, "width": stored[0], "height": stored[1],
            "original_width": original[0], "original_height": original[1], **row.extra, **fields}
    sample = {"__key__": row.key, ext: data, "txt": caption, **members, "json": json.dumps(meta, default=str)}
    if row.label is not None:
        sample["cls"] = row.label
    return sample


# -- shards ----------------------------------------------------------------------------------

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


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


SHARD_NAMING = ("img2dataset", "clip_benchmark")


def shard_name(index: int, naming: str) -> str:
    """The file name of shard `index`: img2dataset's `00042.tar` (brace patterns like
    `{00000..00099}.tar`) or CLIP_benchmark's `42.tar` (its loader opens `{0..N-1}.tar`)."""
    if naming not in SHARD_NAMING:
        raise ClipkitConfigError(f"shard naming must be one of {SHARD_NAMING}, got {naming!r}")
    return f"{index:05d}.tar" if naming == "img2dataset" else f"{index}.tar"


def naming_for_split(split: str) -> str:
    """The default shard naming: img2dataset's for the train split, CLIP_benchmark's for eval splits."""
    return "img2dataset" if split == "train" else "clip_benchmark"


def _write_tar(samples: Iterable[dict[str, Any]], path: Path) -> int:
    """Writes `path` via its hidden temp name, so no half-written tar ever has a final name. Returns the count."""
    tmp, count = _tmp_name(path), 0
    try:
        with open(tmp, "wb") as stream:
            # Fixed mtime: the same samples give byte-identical shards.
            writer = TarWriter(stream, encoder=False, mtime=0.0)
            for sample in samples:
                writer.write(_encode(sample))
                count += 1
            writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return count


def _prepare(out: Path, overwrite: bool) -> list[Path]:
    """Creates `out`; returns the tars already there, refusing unless `overwrite`."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp"):   # left by a writer that was killed
        stale.unlink()
    existing = sorted(out.glob("*.tar"))
    if existing and not overwrite:
        raise ClipkitConfigError(
            f"{out} already holds {len(existing)} .tar shards; pass --overwrite (overwrite=True) to replace them")
    return existing


def _finish(out: Path, shards: list[dict[str, Any]], failures: Counter, rows: int | None) -> dict[str, Any]:
    total = sum(shard["count"] for shard in shards)
    if not total:
        raise ClipkitConfigError(f"no samples to write to {out} ({sum(failures.values())} could not be read: "
                                 f"{dict(failures)})")
    stats = {"count": total, "failures": sum(failures.values()), "failures_by_reason": dict(sorted(failures.items())),
             "shards": shards}
    if rows is not None:
        stats["rows"] = rows
    (out / "nshards.txt").write_text(f"{len(shards)}\n")
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def write_shards(samples: Iterable[dict[str, Any]], out_dir: str | Path, *, shard_size: int,
                 overwrite: bool = False, naming: str = "img2dataset") -> dict[str, Any]:
    """Writes `out_dir/00000.tar, 00001.tar, ...` (or `0.tar, 1.tar, ...` with naming
    "clip_benchmark") of `shard_size` samples each, plus nshards.txt and stats.json.

    Serial; for ready-made sample dicts (`__key__` plus member values: bytes, str or int).
    A sample carrying `__error__` (a source that could not read an item) is counted as a
    failure, not written. Returns the stats (see the module docstring).
    """
    if shard_size < 1:
        raise ClipkitConfigError(f"shard_size must be >= 1, got {shard_size}")
    shard_name(0, naming)  # an unknown naming is refused before anything is written
    out = Path(out_dir)
    for old in _prepare(out, overwrite):
        old.unlink()
    shards: list[dict[str, Any]] = []
    failures: Counter[str] = Counter()
    pending: list[dict[str, Any]] = []

    def flush() -> None:
        name = shard_name(len(shards), naming)
        shards.append({"name": name, "count": _write_tar(pending, out / name)})
        pending.clear()

    for sample in samples:
        if ERROR_KEY in sample:
            failures[sample.get("__reason__", "unreadable")] += 1
            log.warning("skipping %s: %s", sample.get("__key__"), sample[ERROR_KEY])
            continue
        pending.append(sample)
        if len(pending) == shard_size:
            flush()
    if pending:
        flush()
    return _finish(out, shards, failures, None)


def _shard_task(rows: list[Row], tmp: str, max_side: int | None, timeout: float, texts_in: str
                ) -> tuple[int, dict[str, int]]:
    """One process-pool task: rows -> one tar at `tmp`. Returns (samples written, failures by reason)."""
    failures: Counter[str] = Counter()

    def samples():
        for row in rows:
            try:
                yield row_sample(row, max_side=max_side, timeout=timeout, texts_in=texts_in)
            except RowFailure as failure:
                failures[failure.reason] += 1
                if failures[failure.reason] == 1:
                    log.warning("skipping row %d: %s", row.index, failure)

    count = _write_tar(samples(), Path(tmp))
    return count, dict(failures)


def write_rows(rows: Sequence[Row], out_dir: str | Path, *, shard_size: int = 1000, processes: int = 1,
               max_side: int | None = None, timeout: float = 10.0, overwrite: bool = False,
               naming: str = "img2dataset", texts_in: str = "members") -> dict[str, Any]:
    """Writes `rows` as shards in `out_dir` with `processes` worker processes; returns the stats.

    `naming` picks the shard file names (`shard_name`); `texts_in` where each row's extra string
    texts go: members `<column>.txt` or fields of the .json (lists of texts always go there)."""
    if texts_in not in TEXTS_IN:
        raise ClipkitConfigError(f"texts_in must be one of {'|'.join(TEXTS_IN)}, got {texts_in!r}")
    if shard_size < 1 or processes < 1:
        raise ClipkitConfigError(f"shard_size and processes must be >= 1, got {shard_size} and {processes}")
    shard_name(0, naming)  # an unknown naming is refused before anything is written
    if max_side is not None and max_side < 1:
        raise ClipkitConfigError(f"max_side must be >= 1, got {max_side}")
    out = Path(out_dir)
    existing = _prepare(out, overwrite)
    chunks = [list(rows[i:i + shard_size]) for i in range(0, len(rows), shard_size)]
    parts = [out / f".part{i:05d}.tar.tmp" for i in range(len(chunks))]
    args = [(chunk, str(part), max_side, timeout, texts_in) for chunk, part in zip(chunks, parts)]
    try:
        if processes == 1:
            results = [_shard_task(*a) for a in args]
        else:
            with ProcessPoolExecutor(max_workers=processes) as pool:
                results = list(pool.map(_shard_task, *zip(*args))) if args else []
        failures: Counter[str] = Counter()
        for _, failed in results:
            failures.update(failed)
        for old in existing:
            old.unlink()
        shards = []
        for part, (count, _) in zip(parts, results):
            if count:   # an all-failed chunk leaves no gap in the numbering
                name = shard_name(len(shards), naming)
                os.replace(part, out / name)
                shards.append({"name": name, "count": count})
    finally:
        for part in parts:
            part.unlink(missing_ok=True)
    return _finish(out, shards, failures, len(rows))


def read_eval_metadata(classnames: str | Path | None, templates: str | Path | None) -> dict[str, list[str]]:
    """Checked lines of the class-name and template files to copy beside the splits, keyed by
    their CLIP_benchmark file names; read (and refused) before any shard is written."""
    found = {}
    for given, name in ((classnames, CLASSNAMES_FILE), (templates, TEMPLATES_FILE)):
        if given is None:
            continue
        if not Path(given).is_file():
            raise ClipkitConfigError(f"file not found: {given}")
        lines = [line.strip() for line in Path(given).read_text(encoding="utf-8").splitlines() if line.strip()]
        if name == TEMPLATES_FILE and not all("{c}" in line for line in lines):
            raise ClipkitConfigError(f"every template in {given} needs a {{c}} placeholder for the class name")
        found[name] = lines
    return found


def write_eval_metadata(out_dir: str | Path, metadata: dict[str, list[str]], *,
                        dataset_type: str | None = None) -> None:
    """Writes CLIP_benchmark's side files beside the splits: `read_eval_metadata`'s files, and
    `dataset_type.txt` when given ("retrieval" marks a caption set; classification is the default)."""
    out = Path(out_dir)
    files = dict(metadata)
    if dataset_type is not None:
        files[DATASET_TYPE_FILE] = [dataset_type]
    for name, lines in files.items():
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{name}.tmp"
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.replace(tmp, out / name)


# -- row sources -----------------------------------------------------------------------------

def _label(value: Any, where: str) -> int | None:
    if value is None or (isinstance(value, float) and value != value) or not str(value).strip():
        return None
    try:
        return int(str(value).strip())
    except ValueError:
        raise ClipkitConfigError(f"label must be an integer, got {str(value).strip()!r} at {where}") from None


def rows_from_folder(folder: str | Path, *, text_columns: Sequence[str] = ()) -> list[Row]:
    """Rows from `name.jpg|png|...` with caption `name.txt` and optional integer `name.cls`, sorted by path;
    each of `text_columns` from an optional sidecar `name.<column>.txt`."""
    check_text_columns(text_columns)
    root = Path(folder)
    if not root.is_dir():
        raise ClipkitConfigError(f"image folder not found: {root}")
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    rows = []
    for index, image in enumerate(images):
        caption_path, label_path = image.with_suffix(".txt"), image.with_suffix(".cls")
        caption = caption_path.read_text(encoding="utf-8") if caption_path.is_file() else None
        label = _label(label_path.read_text(), str(label_path)) if label_path.is_file() else None
        texts = {}
        for column in text_columns:
            sidecar = image.with_name(f"{image.stem}.{column}.txt")
            if sidecar.is_file():
                texts[column] = sidecar.read_text(encoding="utf-8")
        rows.append(Row(index, str(image), caption, label, {"path": str(image.relative_to(root))}, texts))
    return rows


def _read_table(path: Path) -> list[dict[str, Any]]:
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _text_cell(value: Any) -> str | list[str] | None:
    """A text column's cell: a string, a list of strings (Parquet lists; in a CSV a JSON list), or None."""
    if value is None or (isinstance(value, float) and value != value) or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            parsed = json.loads(value)
        except ValueError:
            return value
        return [str(t) for t in parsed] if isinstance(parsed, list) else value
    if isinstance(value, (list, tuple)) or hasattr(value, "tolist"):
        return [str(t) for t in (value.tolist() if hasattr(value, "tolist") else value) if t is not None]
    return str(value)


def rows_from_table(table: str | Path, *, image_column: str | None = None, caption_column: str = "caption",
                    label_column: str | None = "label", extra_columns: Sequence[str] = (),
                    text_columns: Sequence[str] = ()) -> list[Row]:
    """Rows from a CSV or Parquet file (by suffix). Relative image paths resolve against the table's folder.

    `image_column` defaults to the first of path, url, image, filepath that exists; the label
    column is optional (used when present); `extra_columns` go into each sample's `.json`;
    `text_columns` are more texts per row (`Row.texts`; the caption column among them is the `txt`).
    """
    text_columns = check_text_columns([c for c in text_columns if c != caption_column])
    path = Path(table)
    if not path.is_file():
        raise ClipkitConfigError(f"table not found: {path}")
    records = _read_table(path)
    columns = list(records[0]) if records else []
    image_column = image_column or next((c for c in IMAGE_COLUMNS if c in columns), None)
    wanted = [c for c in (image_column, caption_column, *extra_columns, *text_columns) if c is not None]
    missing = [c for c in wanted if c not in columns] if records else []
    if image_column is None or missing:
        raise ClipkitConfigError(f"{path} lacks column(s) {missing or list(IMAGE_COLUMNS)}; it has {columns}")
    use_label = label_column is not None and label_column in columns
    rows = []
    for index, record in enumerate(records):
        image = str(record[image_column] or "")
        if image and "://" not in image and not os.path.isabs(image):
            image = str(path.parent / image)
        caption = record[caption_column]
        label = _label(record[label_column], f"{path} row {index + 1}") if use_label else None
        texts = {c: cell for c in text_columns if (cell := _text_cell(record[c])) is not None}
        rows.append(Row(index, image, None if caption is None else str(caption), label,
                        {c: record[c] for c in extra_columns}, texts))
    return rows

