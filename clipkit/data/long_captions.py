"""Long-caption retrieval sets from their published files, as CLIP_benchmark retrieval shards.

    clipkit-shards urban1k  Urban1k/            out/urban1k      # image/<i>.jpg + caption/<i>.txt
    clipkit-shards dci      dci_root/           out/dci          # densely_captioned_images/{splits.json,annotations,photos}
    clipkit-shards docci    docci_root/         out/docci        # docci_descriptions.jsonlines + images/
    clipkit-shards sharegpt4v share-captioner_coco_lcs_sam_1246k_1107.json out/sharegpt4v --image-root data/

Each reads the layout its evaluation code reads (Long-CLIP's `eval/retrieval/Urban1k.py`: the
first line of each caption file; LoTLIP's `dataloaders/dci_retrieval.py`: every annotation of
splits.json, short and extra caption; LoTLIP's `dataloaders/share4v.py`: the `gpt` turn of the
first entries of the ShareGPT4V caption json, 1,000 for ShareGPT4V-1k; DOCCI's jsonlines
fields `example_id, split, image_file, description`, its test split by default) and writes
`out/test/{0..N}.tar` with `nshards.txt` and `out/dataset_type.txt` ("retrieval"): one image,
one caption per sample, 1:1, the caption's whitespace (newlines included) folded to single
spaces, since an eval `.txt` holds one caption per line.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clipkit.data.writer import Row, write_eval_metadata, write_rows
from clipkit.errors import ClipkitConfigError

SPLIT = "test"


def one_line(text: str) -> str:
    """`text` with every run of whitespace (newlines too) folded to one space."""
    return " ".join(text.split())


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise ClipkitConfigError(f"{path} not found: {what}")
    return path


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exn:
        raise ClipkitConfigError(f"{path} is not valid JSON: {exn}".splitlines()[0]) from None


def rows_urban1k(root: str | Path) -> list[Row]:
    """Urban-1k: `root/caption/<name>.txt` (its first line) with `root/image/<name>.jpg`, by numeric name."""
    root = Path(root)
    captions = sorted(_need(root / "caption", "Urban-1k has caption/ and image/").glob("*.txt"),
                      key=lambda p: (not p.stem.isdigit(), int(p.stem) if p.stem.isdigit() else 0, p.stem))
    _need(root / "image", "Urban-1k has caption/ and image/")
    rows = []
    for index, caption in enumerate(captions):
        lines = caption.read_text(encoding="utf-8").splitlines()
        rows.append(Row(index, str(root / "image" / f"{caption.stem}.jpg"), one_line(lines[0]) if lines else "",
                        extra={"source_id": caption.stem}))
    return rows


def rows_dci(root: str | Path, split: str | None = None) -> list[Row]:
    """DCI: the annotations `splits.json` lists (every split, LoTLIP's protocol, or `split`), each
    its `short_caption` then `extra_caption`, with its `image` from photos/. `root` is the folder
    holding densely_captioned_images/, or that folder itself."""
    root = Path(root)
    base = root / "densely_captioned_images" if (root / "densely_captioned_images").is_dir() else root
    splits = _read_json(_need(base / "splits.json", "DCI has densely_captioned_images/splits.json"))
    if split is not None and split not in splits:
        raise ClipkitConfigError(f"DCI split {split!r} is not in {base / 'splits.json'} (it has {sorted(splits)})")
    files = [f for name, names in splits.items() if split in (None, name) for f in names]
    rows = []
    for index, name in enumerate(files):
        anno = _read_json(_need(base / "annotations" / name, "an annotation splits.json lists"))
        caption = one_line(f"{anno.get('short_caption', '')} {anno.get('extra_caption', '')}")
        rows.append(Row(index, str(base / "photos" / anno["image"]), caption, extra={"source_id": name}))
    return rows


def rows_docci(root: str | Path, split: str = "test") -> list[Row]:
    """DOCCI: `root/docci_descriptions.jsonlines` entries of `split` (`description`) with `root/images/<image_file>`."""
    root = Path(root)
    path = _need(root / "docci_descriptions.jsonlines", "DOCCI's descriptions file")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            raise ClipkitConfigError(f"{path} line {number} is not JSON") from None
        if entry.get("split") == split:
            rows.append(Row(len(rows), str(root / "images" / entry["image_file"]), one_line(entry["description"]),
                            extra={"source_id": entry["example_id"]}))
    if not rows:
        raise ClipkitConfigError(f"{path} has no entry of split {split!r}")
    return rows


def rows_sharegpt4v(annotations: str | Path, image_root: str | Path | None = None, count: int = 1000) -> list[Row]:
    """ShareGPT4V-1k: the first `count` entries of a ShareGPT4V caption json (a list of
    `{"id", "image", "conversations": [human, gpt]}`), the `gpt` turn as the caption, images under
    `image_root` (default: the json's folder)."""
    path = Path(annotations)
    entries = _read_json(_need(path, "the ShareGPT4V caption json"))
    if not isinstance(entries, list):
        raise ClipkitConfigError(f"{path} is not a list of ShareGPT4V entries")
    root = Path(image_root) if image_root is not None else path.parent
    rows = []
    for index, entry in enumerate(entries[:count]):
        answer = next((turn["value"] for turn in entry["conversations"] if turn.get("from") == "gpt"), "")
        rows.append(Row(index, str(root / entry["image"]), one_line(answer),
                        extra={"source_id": str(entry.get("id", index))}))
    return rows


READERS: dict[str, Callable[..., list[Row]]] = {
    "urban1k": rows_urban1k, "dci": rows_dci, "docci": rows_docci, "sharegpt4v": rows_sharegpt4v}


def write_retrieval_set(rows: list[Row], out_dir: str | Path, *, shard_size: int = 1000, processes: int = 1,
                        max_side: int | None = None, overwrite: bool = False) -> dict[str, Any]:
    """`rows` as CLIP_benchmark retrieval shards: `out/test/{0..N}.tar`, nshards.txt, `out/dataset_type.txt`."""
    stats = write_rows(rows, Path(out_dir) / SPLIT, shard_size=shard_size, processes=processes, max_side=max_side,
                       overwrite=overwrite, naming="clip_benchmark")
    write_eval_metadata(out_dir, {}, dataset_type="retrieval")
    return stats
