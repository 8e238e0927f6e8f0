"""Weights that are not there end in one `clipkit-eval: error: ...` / `clipkit-train: error: ...`
line that says what to do: a missing file, an unknown tag, or a known open_clip tag whose file
is not in the (here empty) Hugging Face cache while HF_HUB_OFFLINE=1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from clipkit.errors import ClipkitConfigError
from clipkit.models.factory import check_pretrained_file, missing_weights_explained


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A CLIPKIT_ROOT with the digits sets (so only the weights are missing) and an empty HF_HOME."""
    from clipkit.data import write_digits_shards

    path = tmp_path_factory.mktemp("root")
    write_digits_shards(path / "data" / "digits")
    return path


def _run(module: str, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "CLIPKIT_ROOT": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)


def _one_error_line(proc: subprocess.CompletedProcess, prog: str) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: error: "), proc.stderr[-3000:]
    assert sum(line.startswith(f"{prog}: error") for line in proc.stderr.splitlines()) == 1
    return last


@pytest.mark.parametrize("pretrained, says", [
    ("/no/such/file.pt", ["file not found: /no/such/file.pt", "path of an open_clip checkpoint"]),
    ("openai", ["tag 'openai'", "Hugging Face cache", "HF_HUB_OFFLINE=1", "pretrained=/path/to/"]),
])
def test_clipkit_eval_missing_weights_is_one_line(pretrained: str, says: list[str], root: Path) -> None:
    line = _one_error_line(_run("clipkit.evaluate", ["model_name=ViT-B-32", f"pretrained={pretrained}"], root),
                           "clipkit-eval")
    assert all(s in line for s in says), line


def test_clipkit_train_uncached_tag_is_one_line(root: Path) -> None:
    line = _one_error_line(_run("clipkit.train", ["experiment=demo_digits", "model.name=ViT-B-32", "model.config=null",
                                                  "model.pretrained=openai", "eval=none", "debug=fast",
                                                  "trainer.max_steps=1", "run_name=no_weights"], root),
                           "clipkit-train")
    assert "model.pretrained=openai" in line and "HF_HUB_OFFLINE=1" in line and "Hugging Face cache" in line


def test_unknown_tag_lists_the_models_tags() -> None:
    with pytest.raises(ClipkitConfigError, match="neither a file nor a pretrained tag of ViT-B-32.*openai"):
        with missing_weights_explained("ViT-B-32", "nosuchtag"):
            raise RuntimeError("Pretrained value 'nosuchtag' is not a known tag or valid file path")
    with pytest.raises(RuntimeError, match="unrelated"):   # other errors pass through unchanged
        with missing_weights_explained("ViT-B-32", "openai"):
            raise RuntimeError("unrelated")
    check_pretrained_file("ViT-B-32", "openai")            # a bare word is a tag: checked when loaded
    with pytest.raises(ClipkitConfigError, match="model.pretrained file not found: weights/x.bin"):
        check_pretrained_file("ViT-B-32", "weights/x.bin")
