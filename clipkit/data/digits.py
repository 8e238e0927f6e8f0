"""The demo dataset: sklearn's bundled 8x8 handwritten digits as captioned, labelled shards.

Layout follows CLIP_benchmark: `train/` and `test/` shard folders, with `classnames.txt`
and `zeroshot_classification_templates.txt` beside them.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from clipkit.data.eval_reader import CLASSNAMES_FILE, TEMPLATES_FILE
from clipkit.data.writer import naming_for_split, write_shards
from clipkit.errors import ClipkitConfigError

DIGIT_CLASSNAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_TEMPLATES = [
    "a photo of the digit {c}.",
    "a handwritten {c}.",
    "the number {c}, written by hand.",
    "a black and white image of the number {c}.",
    "a scan of a handwritten digit {c}.",
]


def digit_png(pixels: np.ndarray, image_size: int) -> bytes:
    """PNG bytes of one [8, 8] digit (values 0..16) as an `image_size`^2 grayscale image."""
    gray = np.round(pixels * (255.0 / 16.0)).astype(np.uint8)
    image = PIL.Image.fromarray(gray).resize((image_size, image_size), PIL.Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _samples(indices: Sequence[int], images: np.ndarray, targets: np.ndarray, image_size: int,
             rng: random.Random, extra: Callable[[int], dict[str, Any]] | None = None) -> Iterator[dict[str, Any]]:
    for index in indices:
        label = int(targets[index])
        yield {"__key__": digit_key(index), "png": digit_png(images[index], image_size),
               "txt": rng.choice(DIGIT_TEMPLATES).format(c=DIGIT_CLASSNAMES[label]), "cls": label,
               **(extra(index) if extra is not None else {})}


def digit_key(index: int) -> str:
    return f"digit{index:04d}"


def split_digits(test_fraction: float = 0.2, seed: int = 0) -> tuple[Any, np.ndarray, np.ndarray]:
    """(sklearn's digits bunch, train indices, test indices): the stratified, seeded split of the shards."""
    if not 0.0 < test_fraction < 1.0:
        raise ClipkitConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    digits = load_digits()
    train_idx, test_idx = train_test_split(np.arange(len(digits.target)), test_size=test_fraction,
                                           stratify=digits.target, random_state=seed)
    return digits, train_idx, test_idx


def eval_shard_size(shard_size: int, count: int) -> int:
    """Eval shards hold at most half the set, so an eval can always be split over 2 shards."""
    return min(shard_size, math.ceil(count / 2))


def write_digits_shards(out_dir: str | Path, *, image_size: int = 32, test_fraction: float = 0.2,
                        shard_size: int = 200, seed: int = 0, overwrite: bool = False,
                        extra: Callable[[int], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Writes the 1797 digits as a stratified, seeded train/test split; same seed, byte-identical shards.

    Test shards hold at most half the test set so an eval can always be split over 2 shards.
    `extra(index)` adds members to a digit's sample (`clipkit.data.digits_captions`).
    Returns {"count": 1797, "train": stats, "test": stats} with `write_shards`' stats per split.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ClipkitConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if image_size < 8:
        raise ClipkitConfigError(f"image_size must be >= 8 (the digits are 8x8), got {image_size}")
    out = Path(out_dir)
    # Checked for both splits first so a refusal never leaves train rewritten but test stale.
    held = [split for split in ("train", "test") if any((out / split).glob("*.tar"))]
    if held and not overwrite:
        raise ClipkitConfigError(
            f"{out} already holds {'/'.join(held)} shards; pass --overwrite (overwrite=True) to replace them")
    digits, train_idx, test_idx = split_digits(test_fraction, seed)
    rng = random.Random(seed)
    stats: dict[str, Any] = {"count": len(digits.target)}
    for split, indices, size in (("train", train_idx, shard_size),
                                 ("test", test_idx, eval_shard_size(shard_size, len(test_idx)))):
        samples = _samples([int(i) for i in indices], digits.images, digits.target, image_size, rng, extra)
        stats[split] = write_shards(samples, out / split, shard_size=size, overwrite=overwrite,
                                    naming=naming_for_split(split))
    (out / CLASSNAMES_FILE).write_text("\n".join(DIGIT_CLASSNAMES) + "\n")
    (out / TEMPLATES_FILE).write_text("\n".join(DIGIT_TEMPLATES) + "\n")
    return stats
