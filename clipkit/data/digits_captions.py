"""The long-caption demo: sklearn's digits with a long caption measured from each image, and hard negatives.

    clipkit-shards digits-captions data/digits_captions

Same split, images, keys, short captions (`txt`) and labels as `clipkit-shards digits` (so the
digits eval reads it as it is), plus per sample a `.json`:

    {"long_caption": "A handwritten seven. The strokes are thick. The digit leans to the right. ...",
     "negatives": [the long caption with one attribute swapped to a wrong value, 2 or 3 of them],
     "attributes": {"thickness": "thick", ...}, "measures": {"thickness": 41.3, ...}}

The long caption says what the class name alone does not: five attributes measured from the
8x8 pixels (values 0..16), each binned into three words by the train split's tertiles:

    thickness   ink mass (sum of the pixels / 16)                  thin | of medium thickness | thick
    slant       -cov(x, y) / var(y) of the ink (y grows down)      leans to the left | stands upright | leans to the right
    size        area of the ink's box of +-1 std around its centroid  small | medium-sized | large
                (a sharp bounding box of 8x8 pixels takes a handful of values, most of them the whole frame)
    position    the ink's horizontal centroid                      left of centre | in the centre | right of centre
    brightness  mean of the pixels >= 4                            faint | grey | bright

Beside train/ and test/, two held-out sets of the test images in CLIP_benchmark's layout:

    long_retrieval/test/{0..N}.tar   png + txt (the long caption); dataset_type.txt "retrieval"
    selection/test/{0..N}.tar        png + txt (the true long caption) + json {"negatives": [...]};
                                     dataset_type.txt "selection"

Train a role on it with `data.texts` (docs/texts.md), e.g.
`{alt: {sources: [txt]}, long: {sources: ["json:long_caption"], k: 2, select: subcaptions},
neg: {sources: ["json:negatives"], k: 2, select: sample, negative: true}}`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np

from clipkit.data.digits import (
    DIGIT_CLASSNAMES,
    digit_key,
    digit_png,
    eval_shard_size,
    split_digits,
    write_digits_shards,
)
from clipkit.data.writer import write_eval_metadata, write_shards
from clipkit.errors import ClipkitConfigError

ATTRIBUTES = ("thickness", "slant", "size", "position", "brightness")
WORDS = {
    "thickness": ("thin", "of medium thickness", "thick"),
    "slant": ("leans to the left", "stands upright", "leans to the right"),
    "size": ("small", "medium-sized", "large"),
    "position": ("left of centre", "in the centre", "right of centre"),
    "brightness": ("faint", "grey", "bright"),
}
SENTENCES = {
    "thickness": "The strokes are {}.",
    "slant": "The digit {}.",
    "size": "It is {} in the frame.",
    "position": "It sits {}.",
    "brightness": "The ink is {}.",
}
INK = 4.0   # of 16: a pixel counts as ink for the brightness
SETS = ("train", "test", "long_retrieval", "selection")


def measure(pixels: np.ndarray) -> dict[str, float]:
    """The five attributes of one [8, 8] digit (values 0..16), as numbers."""
    pixels = pixels.astype(np.float64)
    ys, xs = np.mgrid[0:pixels.shape[0], 0:pixels.shape[1]]
    mass = pixels.sum()
    cy, cx = (pixels * ys).sum() / mass, (pixels * xs).sum() / mass
    var_y = (pixels * (ys - cy) ** 2).sum() / mass
    var_x = (pixels * (xs - cx) ** 2).sum() / mass
    cov = (pixels * (xs - cx) * (ys - cy)).sum() / mass
    ink = pixels >= INK
    return {"thickness": float(mass / 16.0), "slant": float(-cov / var_y) if var_y > 0 else 0.0,
            "size": float(4.0 * np.sqrt(var_x * var_y)),
            "position": float(cx), "brightness": float(pixels[ink].mean()) if ink.any() else 0.0}


def tertiles(values: np.ndarray) -> tuple[float, float]:
    """The 1/3 and 2/3 quantiles of `values` (the bin edges)."""
    low, high = np.quantile(values, [1 / 3, 2 / 3])
    return float(low), float(high)


def word_index(value: float, edges: tuple[float, float]) -> int:
    return 0 if value < edges[0] else 1 if value < edges[1] else 2


def long_caption(label: int, words: dict[str, str]) -> str:
    return " ".join([f"A handwritten {DIGIT_CLASSNAMES[label]}."] + [SENTENCES[a].format(words[a]) for a in ATTRIBUTES])


def negatives(label: int, words: dict[str, str], rng: random.Random) -> list[str]:
    """2 or 3 copies of the long caption, each with one attribute (a different one each) swapped to a wrong word."""
    out = []
    for attribute in rng.sample(ATTRIBUTES, rng.choice((2, 3))):
        wrong = rng.choice([w for w in WORDS[attribute] if w != words[attribute]])
        out.append(long_caption(label, {**words, attribute: wrong}))
    return out


def describe(images: np.ndarray, targets: np.ndarray, train_idx: np.ndarray, seed: int) -> dict[int, dict[str, Any]]:
    """Per digit index its `.json` document; the bins come from the train split's tertiles only."""
    measures = [measure(image) for image in images]
    edges = {a: tertiles(np.array([measures[i][a] for i in train_idx])) for a in ATTRIBUTES}
    rng = random.Random(f"digits-captions/{seed}")
    out = {}
    for index, (values, target) in enumerate(zip(measures, targets)):
        words = {a: WORDS[a][word_index(values[a], edges[a])] for a in ATTRIBUTES}
        label = int(target)
        out[index] = {"long_caption": long_caption(label, words), "negatives": negatives(label, words, rng),
                      "attributes": words, "measures": {a: round(v, 4) for a, v in values.items()}}
    return out


def write_digits_caption_shards(out_dir: str | Path, *, image_size: int = 32, test_fraction: float = 0.2,
                                shard_size: int = 200, seed: int = 0, overwrite: bool = False) -> dict[str, Any]:
    """Writes the demo (see the module docstring); same seed, byte-identical shards.

    Returns {"count", "train", "test", "long_retrieval", "selection"} with `write_shards`' stats per set.
    """
    out = Path(out_dir)
    folders = {"train": out / "train", "test": out / "test", "long_retrieval": out / "long_retrieval" / "test",
               "selection": out / "selection" / "test"}
    held = [name for name, folder in folders.items() if any(folder.glob("*.tar"))]
    if held and not overwrite:
        raise ClipkitConfigError(
            f"{out} already holds {'/'.join(held)} shards; pass --overwrite (overwrite=True) to replace them")
    digits, train_idx, test_idx = split_digits(test_fraction, seed)
    documents = describe(digits.images, digits.target, train_idx, seed)
    stats = write_digits_shards(out, image_size=image_size, test_fraction=test_fraction, shard_size=shard_size,
                                seed=seed, overwrite=overwrite,
                                extra=lambda index: {"json": json.dumps(documents[index])})
    held_out = [int(i) for i in test_idx]
    size = eval_shard_size(shard_size, len(held_out))

    def samples(with_negatives: bool):
        for index in held_out:
            document = documents[index]
            sample = {"__key__": digit_key(index), "png": digit_png(digits.images[index], image_size),
                      "txt": document["long_caption"]}
            if with_negatives:
                sample["json"] = json.dumps({"negatives": document["negatives"]})
            yield sample

    for name, with_negatives in (("long_retrieval", False), ("selection", True)):
        stats[name] = write_shards(samples(with_negatives), folders[name], shard_size=size, overwrite=overwrite,
                                   naming="clip_benchmark")
        write_eval_metadata(out / name, {}, dataset_type="retrieval" if name == "long_retrieval" else "selection")
    return stats
