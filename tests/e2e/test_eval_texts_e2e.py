"""Long-caption retrieval and image-caption selection in a real training run and in clipkit-eval,
on small two-level digits sets written here (conf/eval/digits_texts.yaml's layout)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import run_cli

from clipkit.data.digits import DIGIT_CLASSNAMES, _png

# tiny_vit's text tower has 16 positions: the long set asks for 12 (the shipped 128 needs a longer model).
SETS = ["eval=digits_texts", "eval.sets.digits_long.context_length=12", "eval.sets.digits_selection.context_length=16"]


def _long_caption(pixels: np.ndarray, label: int) -> str:
    ink = pixels > 8
    rows, cols = np.nonzero(ink)
    return (f"a handwritten {DIGIT_CLASSNAMES[label]}. {'thick' if ink.mean() > 0.35 else 'thin'} strokes. "
            f"{'left' if cols.mean() < 3.5 else 'right'} of centre. {'tall' if np.ptp(rows) > 6 else 'short'}.")


def _write(root: Path, name: str, rows: list[dict], dataset_type: str) -> None:
    (root / name / "test").mkdir(parents=True)
    with wds.TarWriter(str(root / name / "test" / "0.tar")) as writer:
        for row in rows:
            writer.write(row)
    (root / name / "test" / "nshards.txt").write_text("1\n")
    (root / name / "dataset_type.txt").write_text(dataset_type + "\n")


@pytest.fixture(scope="module")
def texts_root(digits_root: Path, tmp_path_factory) -> Path:
    """A CLIPKIT_ROOT with data/digits (the session's shards) and data/digits_texts: the digits
    test split, and 40 held-out digits as a long-caption set and a selection set."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("texts_root")
    (root / "data").mkdir()
    (root / "data" / "digits").symlink_to(digits_root / "data" / "digits")
    out = root / "data" / "digits_texts"
    shutil.copytree(digits_root / "data" / "digits" / "test", out / "test")
    for side in ("classnames.txt", "zeroshot_classification_templates.txt"):
        shutil.copy(digits_root / "data" / "digits" / side, out / side)
    digits = load_digits()
    long_rows, selection_rows = [], []
    for i in range(40):
        pixels, label = digits.images[i], int(digits.target[i])
        caption = _long_caption(pixels, label)
        swapped = caption.replace(DIGIT_CLASSNAMES[label], DIGIT_CLASSNAMES[(label + 1) % 10], 1)
        flipped = caption.replace("thick", "THIN").replace("thin", "thick").replace("THIN", "thin")
        png = _png(pixels, 32)
        long_rows.append({"__key__": f"{i:06d}", "png": png, "txt": caption})
        selection_rows.append({"__key__": f"{i:06d}", "png": png, "txt": caption,
                               "json": {"negatives": [swapped, flipped]}})
    _write(out, "long", long_rows, "retrieval")
    _write(out, "selection", selection_rows, "selection")
    return root


@pytest.fixture(scope="module")
def texts_run(texts_root: Path) -> Path:
    """6 steps of tiny_vit, evaluating the three digits_texts sets at steps 3 and 6."""
    run_cli([sys.executable, "-m", "clipkit.train", "debug=fast", "run_name=texts", *SETS, "eval.every_n_steps=3"],
            texts_root)
    return texts_root / "outputs" / "texts"


def test_training_and_clipkit_eval_score_long_captions_and_selection(texts_root: Path, texts_run: Path) -> None:
    run_dir = texts_run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "digits_selection/acc" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert all(0 <= r["digits_selection/acc"] <= 1 and "digits_long/image_retrieval_recall@1" in r
               and "digits/acc1" in r for r in evals)
    selection = json.loads((run_dir / "eval" / "digits_selection_selection.json").read_text())
    assert selection["task"] == "image_caption_selection" and set(selection["metrics"]) == {"acc"}
    long = json.loads((run_dir / "eval" / "digits_long_retrieval.json").read_text())["metrics"]
    assert {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)} <= set(long)

    out = texts_root / "outputs" / "eval"
    run_cli([sys.executable, "-m", "clipkit.evaluate", f"run_dir={run_dir}", f"out_dir={out}", *SETS], texts_root)
    for name in ("digits_selection_selection.json", "digits_long_retrieval.json"):
        scored = json.loads((out / "texts" / name).read_text())["metrics"]
        trained = json.loads((run_dir / "eval" / name).read_text())["metrics"]
        assert scored == pytest.approx(trained, abs=1e-6), name   # the same last checkpoint


def test_a_context_longer_than_the_model_is_one_line_in_clipkit_eval(texts_root: Path, texts_run: Path) -> None:
    proc = run_cli([sys.executable, "-m", "clipkit.evaluate", f"run_dir={texts_run}", "eval=digits_texts"],
                   texts_root, check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last == ("clipkit-eval: error: eval.sets.digits_long.context_length=128 exceeds the model's text context "
                    "of 16 positions; lower it or set model.context_length=128")
