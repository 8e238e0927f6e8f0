"""Deterministic reading of evaluation shards (CLIP_benchmark layout) in fixed batches.

Which texts a sample gives (`EvalTexts`, from `eval.sets.<name>.caption_source` and
`negatives_source`):

    a member (`txt`, `long.txt`)   its UTF-8 text split into lines, each non-empty line one
                                   caption (CLIP_benchmark's retrieval rule). A long caption of
                                   several sentences on one line stays one caption; a line break
                                   inside it would cut it in two, so keep it on one line or in json.
    `json:<field>`                 a field of the sample's `.json` (a dotted path such as
                                   `json:captions.long`): a string is one caption, never split;
                                   a list gives one caption per non-empty string.
    `rest` (negatives only)        the caption source's texts after the first: CLIP_benchmark's
                                   image_caption_selection order, [true caption, negative, ...].

A selection set (`negatives_source` set) gives each image its true caption first, then its
hard negatives, in `EvalBatch.captions`; the eval scores the first against the rest.
"""

from __future__ import annotations

import io
import json
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
JSON_PREFIX = "json:"
REST = "rest"


@dataclass(frozen=True)
class EvalTexts:
    """Where a sample's texts come from (module docstring).

    caption: a member extension or `json:<field>`: the captions (the true caption of a selection set).
    negatives: None for retrieval and classification sets; for a selection set a member,
        `json:<field>` or `rest`: the hard negatives.
    """

    caption: str = "txt"
    negatives: str | None = None

    def __post_init__(self) -> None:
        for what, source in (("caption_source", self.caption), ("negatives_source", self.negatives)):
            if source is None:
                continue
            if not source or source.startswith(".") or source == JSON_PREFIX or (source == REST and what == "caption_source"):
                raise ClipkitConfigError(f"{what}={source!r}: give a member extension (txt, long.txt) or json:<field>"
                                         + (" or rest" if what == "negatives_source" else ""))


@dataclass
class EvalBatch:
    """One batch of an eval set, in set order.

    images: [b, 3, H, W] float32. captions: per image its captions (`[]` when the set has
    none); in a selection set the true caption, then the hard negatives. labels: [b] int64,
    -1 where a sample has no `cls`. keys: webdataset `__key__`s.
    """

    images: torch.Tensor
    captions: list[list[str]]
    labels: torch.Tensor
    keys: list[str]


def _texts_of(sample: dict[str, Any], source: str, where: str) -> list[str]:
    """The texts `source` names in `sample` (module docstring); [] when it is absent."""
    if source.startswith(JSON_PREFIX):
        if "json" not in sample:
            return []
        try:
            value: Any = json.loads(sample["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exn:
            raise ClipkitConfigError(f"eval {where}: its .json is not valid UTF-8 JSON ({exn})") from None
        for part in source[len(JSON_PREFIX):].split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is None:
            return []
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(t, str) for t in items):
            raise ClipkitConfigError(f"eval {where}: {source} is a {type(value).__name__}, not a string or a list of strings")
        return [t.strip() for t in items if t.strip()]
    if source not in sample:
        return []
    try:
        text = sample[source].decode("utf-8")
    except UnicodeDecodeError:
        raise ClipkitConfigError(f"eval {where}: its .{source} is not UTF-8") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def sample_texts(sample: dict[str, Any], texts: EvalTexts) -> list[str]:
    """The captions of one raw sample; for a selection set [true caption, *negatives].

    A selection sample must have exactly one true caption and at least one negative:
    anything else would change the accuracy's denominator, so it is refused, not skipped.
    """
    where = f"sample {sample['__key__']} in {sample['__url__']}"
    captions = _texts_of(sample, texts.caption, where)
    if texts.negatives is None:
        return captions
    if texts.negatives == REST:
        true, negatives = captions[:1], captions[1:]
    else:
        true, negatives = captions, _texts_of(sample, texts.negatives, where)
    if len(true) != 1 or not negatives:
        raise ClipkitConfigError(
            f"eval {where}: a selection sample needs one true caption ({texts.caption}) and at least one negative "
            f"({texts.negatives}); it has {len(true)} and {len(negatives)}")
    return true + negatives


def _decode(sample: dict[str, Any], preprocess: Callable[[PIL.Image.Image], torch.Tensor],
            texts: EvalTexts | None = None) -> tuple[torch.Tensor, list[str], int]:
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
    captions = sample_texts(sample, texts or EvalTexts())
    label = int(sample["cls"].decode("utf-8").strip()) if "cls" in sample else -1
    return preprocess(image), captions, label


def iter_eval_batches(urls: list[str], *, preprocess: Callable[[PIL.Image.Image], torch.Tensor],
                      batch_size: int, rank: int = 0, world_size: int = 1,
                      texts: EvalTexts | None = None) -> Iterator[EvalBatch]:
    """Batches of this rank's samples: sample i of the whole set (shards in order) is rank i % world_size's.

    `texts` says which members or `.json` fields hold the captions (and a selection set's negatives)."""
    batch: list[tuple[str, tuple[torch.Tensor, list[str], int]]] = []
    samples = tarfile_samples({"url": url} for url in urls)
    for index, sample in enumerate(samples):
        if index % world_size != rank:
            continue
        batch.append((sample["__key__"], _decode(sample, preprocess, texts)))
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
    `root/dataset_type.txt` says "retrieval" for caption sets, "selection" (or CLIP_benchmark's
    task name "image_caption_selection") for image-caption selection sets (absent: "classification").
    """
    root = root.rstrip("/")
    count = _read_lines(f"{root}/{split}/nshards.txt")
    if not count or not count[0].isdigit() or int(count[0]) < 1:
        raise ClipkitConfigError(f"{root}/{split}/nshards.txt is missing or not a positive shard count; "
                                 "a CLIP_benchmark set has <root>/<split>/nshards.txt and <split>/0.tar ...")
    dataset_type = (_read_lines(f"{root}/{DATASET_TYPE_FILE}") or ["classification"])[0].lower()
    dataset_type = "selection" if dataset_type == "image_caption_selection" else dataset_type
    return expand_urls(f"{root}/{split}/{{0..{int(count[0]) - 1}}}.tar"), dataset_type
