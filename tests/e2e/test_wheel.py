"""`pip install .` (a real wheel, not editable) gives working console scripts and the shipped
configs, from a directory that has nothing of the repository in it."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from clipkit.config import CONF_DIR

REPO = Path(__file__).resolve().parents[2]


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # A copy of the source tree: setuptools leaves build/ and *.egg-info beside the sources.
    source = out / "source"
    top_level_only = {".git", ".venv", "outputs", "data", "build", "wandb", ".pytest_cache"}

    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
        return skip | (top_level_only & set(names) if Path(folder) == REPO else set())

    shutil.copytree(REPO, source, ignore=ignore)
    # --no-build-isolation: build with this environment's setuptools, no index needed.
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
         source, dict(os.environ, PYTHONWARNINGS="ignore"))
    (path,) = out.glob("clipkit-*.whl")
    return path


def test_the_wheel_ships_every_config_and_module(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"clipkit/conf/{p.relative_to(CONF_DIR).as_posix()}" for p in CONF_DIR.rglob("*.yaml")}
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "clipkit").rglob("*.py")}
    assert configs and configs <= names, sorted(configs - names)
    assert modules <= names, sorted(modules - names)


def test_an_installed_wheel_trains_from_an_empty_directory(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CLIPKIT_ROOT")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)], tmp_path, env)
    # The dependencies (torch, open_clip, deepspeed, ...) come from this environment: a .pth line
    # appends its site-packages, after the venv's own, which holds the wheel's clipkit. The
    # editable clipkit there is not reachable: .pth files in an appended path are not processed.
    venv_site = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                             text=True).strip())
    ours = sysconfig.get_paths()["purelib"]
    (venv_site / "deps.pth").write_text("\n".join(dict.fromkeys([ours, *site.getsitepackages()])) + "\n")

    work = tmp_path / "empty"
    work.mkdir()
    probe = "import clipkit, clipkit.config as c; print(clipkit.__version__, clipkit.__file__, c.CONF_DIR)"
    where = _run([str(python), "-c", probe], work, env).stdout.split()
    assert where[1].startswith(str(venv_site)) and where[2] == str(venv_site / "clipkit" / "conf"), where
    bin_dir = venv / "bin"
    _run([str(bin_dir / "clipkit-shards"), "digits", "data/digits"], work, env)
    proc = _run([str(bin_dir / "clipkit-train"), "debug=fast", "trainer.max_steps=2", "trainer.checkpoint_every_n_steps=2"],
                work, env)
    assert "zeroshot_classification" in proc.stdout
    run = work / "outputs" / "clipkit-tiny-vit-clip"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert (run / "export" / "open_clip_pytorch_model.bin").is_file()
    proc = _run([str(bin_dir / "clipkit-eval"), f"run_dir={run}"], work, env)
    assert "acc1" in proc.stdout
