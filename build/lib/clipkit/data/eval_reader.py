"""Deterministic reading of evaluation shards (CLIP_benchmark layout) in fixed batches."""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import PIL.Image
import torch
import webdataset as wds
from webdataset.tariterators import tarfile_samples

from clipkit.data.urls import expand_urls, is_local
from clipkit.errors import ClipkitConfigError

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
DATASET_TYPE_FILE = "dataset_type.txt"  # CLIP_benchmark: "retrieval"; absent means classification


@dataclass
class EvalBatch:
    """One batch of an eval set, in set order.

    images: [b, 3, H, W] float32. captions: per image its captions (`[]` when the set has
    none). labels: [b] int64, -1 where a sample has no `cls`. keys: webdataset `__key__`s.
    """

    images: torch.Tensor
    captions: list[list[str]]
    labels: torch.Tensor
    keys: list[str]


def _decode(sample: dict[str, Any], preprocess: Callable[[PIL.Image.Image], torch.Tensor]
            ) -> tuple[torch.Tensor, list[str], int]:
    image_key = next((k for k in IMAGE_KEYS if k in sample), None)
    where = f"sample {sample['__key__']} in {sample['__url__']}"
    if image_key is None:
        raise ClipkitConfigError(f"eval {where} has no image (looked for {', '.join(IMAGE_KEYS)})")
    try:
        with PIL.Image.open(io.BytesIO(sample[image_key])) as raw:
            image = raw.convert("RGB")
    except (OSError, ValueError) as exn:
        # Skipping would silently change the metric's denominator, so eval refuses instead.
        raise ClipkitConfigError(f"eval {where}: undecodable image ({exn})") from exn
    text = sample.get("txt", b"").decode("utf-8")
    captions = [line.strip() for line in text.splitlines() if line.strip()]
    label = int(sample["cls"].decode("utf-8").strip()) if "cls" in sample else -1
    return preprocess(image), captions, label


def iter_eval_batches(urls: list[str], *, preprocess: Callable[[PIL.Image.Image], torch.Tensor],
                      batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[EvalBatch]:
    """Batches of this rank's samples: sample i of the whole set (shards in order) is rank i % world_size's."""
    batch: list[tuple[str, tuple[torch.Tensor, list[str], int]]] = []
    samples = tarfile_samples({"url": url} for url in urls)
    for index, sample in enumerate(samples):
        if index % world_size != rank:
            continue
        batch.append((sample["__key__"], _decode(sample, preprocess)))
        if len(batch) == batch_size:
            yield _collate(batch)
            batch = []
    if batch:
        yield _collate(batch)


def _collate(batch: list[tuple[str, tuple[torch.Tensor, list[str], int]]]) -> EvalBatch:
    return EvalBatch(images=torch.stack([image for _, (image, _, _) in batch]),
                     captions=[captions for _, (_, captions, _) in batch],
                     labels=torch.tensor([label for _, (_, _, label) in batch], dtype=torch.long),
                     keys=[key for key, _ in batch])


def _read_lines(location: str) -> list[str] | None:
    if is_local(location):
        if not os.path.isfile(location):
            return None
        with open(location, encoding="utf-8") as f:
            text = f.read()
    else:
        try:
            with wds.gopen(location, "rb") as f:
                text = f.read().decode("utf-8")
        except Exception:  # Any failure to fetch a remote side file means "not provided".
            return None
    return [line.strip() for line in text.splitlines() if line.strip()] or None


def _parent(location: str) -> str:
    return os.path.dirname(os.path.abspath(location)) if is_local(location) else location.rsplit("/", 1)[0]


def read_set_metadata(shard_dir_or_url_root: str) -> tuple[list[str] | None, list[str] | None]:
    """(classnames, templates) from the shards' directory or its parent; None for each file absent.

    Accepts a directory, a URL root, or a shard path/spec (its directory is used).
    """
    root = shard_dir_or_url_root.rstrip("/")
    if root.endswith(".tar") or "{" in root:
        root = _parent(root)
    parent = _parent(root)
    found = []
    for name in (CLASSNAMES_FILE, TEMPLATES_FILE):
        lines = _read_lines(f"{root}/{name}")
        found.append(lines if lines is not None else _read_lines(f"{parent}/{name}"))
    return found[0], found[1]


def clip_benchmark_set(root: str, split: str) -> tuple[list[str], str]:
    """(shard URLs, dataset type) of a set in CLIP_benchmark's webdataset layout.

    `root` is the directory (or URL root) that CLIP_benchmark's `--dataset_root` names:
    `root/{split}/nshards.txt` holds N, the shards are `root/{split}/{0..N-1}.tar`, and
    `root/dataset_type.txt` says "retrieval" for caption sets (absent: "classification").
    """
    root = root.rstrip("/")
    count = _read_lines(f"{root}/{split}/nshards.txt")
    if not count or not count[0].isdigit() or int(count[0]) < 1:
        raise ClipkitConfigError(f"{root}/{split}/nshards.txt is missing or not a positive shard count; "
                                 "a CLIP_benchmark set has <root>/<split>/nshards.txt and <split>/0.tar ...")
    dataset_type = (_read_lines(f"{root}/{DATASET_TYPE_FILE}") or ["classification"])[0].lower()
    return expand_urls(f"{root}/{split}/{{0..{int(count[0]) - 1}}}.tar"), dataset_type
