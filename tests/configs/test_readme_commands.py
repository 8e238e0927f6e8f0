"""Every command line the README and docs/ print runs as printed, in its cheapest real form:

- `clipkit-train` / `clipkit-eval` (also behind torchrun, sbatch and launch/local/train.sh):
  the real CLI with `--cfg job`, which composes every override and prints the config (no
  paths are read, so a LAION path composes too); `--from-open-clip-args` runs as printed;
- `clipkit-shards` / `clipkit-export`: their real argument parsers;
- `clipkit-launch`: the real CLI with `--dry-run` (every check runs on real digits shards, the
  job script is printed, nothing is submitted), in a temporary directory;
- `clipkit-train -m` (a sweep): every point composed and checked as the login node does before
  submitting (`clipkit.launch.sweep.prepare_multirun`); nothing is run;
- `make <target>`: `make -n` (the target exists; nothing is run).

The lines are split the way a shell splits them (`shlex`), quotes and comments included.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PROGRAMS = ("clipkit-train", "clipkit-eval", "clipkit-shards", "clipkit-export", "clipkit-launch", "make", "torchrun",
            "sbatch", "launch/local/train.sh")
# A sweep's login-node checks, without Hydra's multirun (which would submit).
SWEEP_CHECK = ("import sys; from clipkit.launch.sweep import prepare_multirun; from clipkit.train import check; "
               "print(prepare_multirun('clipkit-train', sys.argv[1:], check))")
# The user config folder that `--config-dir myconf experiment=mine` in the docs refers to (docs/launch.md).
MYCONF = {"experiment/mine.yaml": "# @package _global_\ndefaults:\n  - override /loss: siglip\ntrainer:\n  max_steps: 50\n",
          "model/my_tiny.yaml": None}


def _command_lines(path: Path) -> list[str]:
    """Lines of fenced code blocks, and inline `code` spans, that start with a program above."""
    text = path.read_text()
    lines = []
    for language, block in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S):
        if language in ("", "bash", "sh", "console"):   # not yaml, json, python, text
            lines += [line.strip() for line in block.replace("\\\n", " ").splitlines()]   # join `\` continuations
    # Inline spans with arguments only: a bare `clipkit-export` or `clipkit-train --flag` names a
    # program or an option, it is no command.
    lines += [span for span in re.findall(r"`([^`\n]+ [^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
              if not span.split()[-1].startswith("--")]
    found = []
    for line in lines:
        for part in line.split("&&"):
            part = part.strip()
            if part.split() and part.split()[0] in PROGRAMS and not part.startswith("make test-"):
                found.append(part)
    return found


COMMANDS = sorted({(path.relative_to(REPO).as_posix(), line) for path in DOCS for line in _command_lines(path)})


def test_the_readme_prints_commands():
    readme = [line for where, line in COMMANDS if where == "README.md"]
    assert any(line.startswith("make demo") for line in readme) and any(line.startswith("make test") for line in readme)
    assert sum(line.startswith("clipkit-train") for line in readme) >= 10


def _hydra_args(words: list[str]) -> tuple[str, list[str]] | None:
    """(module, overrides) for a line that ends in a clipkit Hydra CLI, else None."""
    if words[0] in ("clipkit-train", "clipkit-eval"):
        return ("clipkit.train" if words[0] == "clipkit-train" else "clipkit.evaluate"), words[1:]
    if words[0] == "torchrun":
        at = words.index("-m")
        return words[at + 1], words[at + 2:]
    if words[0] == "sbatch":
        script = next(w for w in words if w.endswith(".sbatch"))
        assert (REPO / script).is_file(), script
        return "clipkit.train", ["launcher=slurm", *words[words.index(script) + 1:]]
    if words[0] == "launch/local/train.sh":
        assert os.access(REPO / words[0], os.X_OK)
        return "clipkit.train", words[1:]
    return None


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory, demo_model_yaml) -> Path:
    root = tmp_path_factory.mktemp("readme_cwd")
    for name, text in MYCONF.items():
        (root / "myconf" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "myconf" / name).write_text(text if text is not None else demo_model_yaml)
    return root


@pytest.fixture(scope="module")
def demo_model_yaml() -> str:
    return (REPO / "conf" / "model" / "tiny_vit.yaml").read_text().replace("clipkit-tiny-vit", "my-tiny-vit")


def _checked_for_real(words: list[str], user_dir: Path) -> list[str] | None:
    """The command for a `clipkit-launch` or sweep line, whose checks read real shards and the
    run directories it names (made, empty, in `user_dir`); else None."""
    for word in words:
        if word.startswith("run_dir="):
            (user_dir / word.split("=", 1)[1]).mkdir(parents=True, exist_ok=True)
    if words[0] == "clipkit-launch":
        return [sys.executable, "-m", "clipkit.launch.cli", words[1], "--dry-run", *words[2:]]
    if words[0] == "clipkit-train" and {"-m", "--multirun"} & set(words):
        return [sys.executable, "-c", SWEEP_CHECK, *words[1:]]
    return None


@pytest.mark.parametrize("where,line", COMMANDS, ids=[f"{w}:{line[:60]}" for w, line in COMMANDS])
def test_command_runs_as_printed(where, line, user_dir, request):
    words = shlex.split(line, comments=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if words[0] == "clipkit-launch" or (words[0] == "clipkit-train" and {"-m", "--multirun"} & set(words)):
        digits_root = request.getfixturevalue("digits_root")
        cmd = _checked_for_real(words, user_dir)
        proc = subprocess.run(cmd, cwd=user_dir, env={**env, "CLIPKIT_ROOT": str(digits_root)}, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, f"{where}: {line}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        assert proc.stdout.strip(), f"{where}: {line} printed nothing"
        return
    if words[0] == "make":
        proc = subprocess.run(["make", "-n", *words[1:]], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return
    if words[0] == "clipkit-shards":
        from clipkit.shards import _parser
        _parser().parse_args(words[1:])
        return
    if words[0] == "clipkit-export":
        from clipkit.export import _parser
        _parser().parse_args(words[1:])
        return
    module, args = _hydra_args(words)
    if "--from-open-clip-args" in args:
        cmd = [sys.executable, "-m", module, *args]
    else:
        cmd = [sys.executable, "-m", module, *args, "--cfg", "job"]
    proc = subprocess.run(cmd, cwd=user_dir, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{where}: {line}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    assert proc.stdout.strip(), f"{where}: {line} printed nothing"
