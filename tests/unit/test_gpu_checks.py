"""The GPU checks' CPU side: the no-GPU exit, the wheel list against pyproject, the rehearsal's
resolver and the on-GPU requirement check, and the Triton parity script under the interpreter.

The GPU parts themselves (benchmarks/gpu_checks.sh) need a GPU; `make gpu-rehearsal` runs the real
rehearsal over the built folder (it needs `make gpu-wheels`, which needs the package index).
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gw = load("gpu_wheels")


def run_checks(tmp_path: Path, path_dirs: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PATH": os.pathsep.join(path_dirs),
           "PYTHON": sys.executable}
    return subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_checks.sh")], env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("fake_nvidia_smi", [False, True])
def test_gpu_checks_without_a_gpu_stop_in_one_line_before_installing(tmp_path, fake_nvidia_smi):
    """No nvidia-smi: one line, exit 2. With an nvidia-smi but no CUDA device for torch (or no
    wheels folder): also one line and exit 2. Nothing is installed and $OUT is not created."""
    site = Path("/tmp/clipkit-gpu-site")
    before = site.stat().st_mtime if site.exists() else None
    dirs = [d for d in os.environ["PATH"].split(os.pathsep) if not (Path(d) / "nvidia-smi").exists()]
    if fake_nvidia_smi:
        fake = tmp_path / "bin"
        fake.mkdir()
        (fake / "nvidia-smi").write_text("#!/bin/sh\necho fake\n")
        (fake / "nvidia-smi").chmod(0o755)
        dirs = [str(fake), *dirs]
    elif shutil.which("nvidia-smi") and not any((Path(d) / "bash").exists() for d in dirs):
        pytest.skip("nvidia-smi shares a folder with bash here")
    proc = run_checks(tmp_path, dirs)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("gpu_checks: "), proc.stdout + proc.stderr
    assert ("no nvidia-smi" in lines[0]) != fake_nvidia_smi
    assert not (tmp_path / "out").exists()
    assert (site.stat().st_mtime if site.exists() else None) == before


def test_rehearsal_requirements_are_pyprojects_less_the_left_out():
    """Every clipkit dependency is rehearsed or left out with a reason; nothing carried is the image's."""
    Requirement = gw._packaging()
    deps = {gw.canonical(Requirement(d).name) for d in gw.pyproject_dependencies()}
    rehearsed = {gw.canonical(Requirement(d).name) for d in gw.rehearsal_requirements()}
    assert deps == (rehearsed & deps) | set(gw.LEFT_OUT)
    assert not rehearsed & set(gw.LEFT_OUT) and set(gw.LEFT_OUT) <= deps
    assert set(gw.CHECK_EXTRAS) <= rehearsed
    carried = set(gw.MAIN_PINS) | set(gw.SIDE_PINS)
    assert not carried & set(gw.IMAGE_PACKAGES)
    assert not any(n in ("torch", "triton") or n.startswith("nvidia") for n in carried)
    # clipkit's own requirement on each carried package holds for the pinned version.
    for d in map(Requirement, gw.pyproject_dependencies()):
        name = gw.canonical(d.name)
        if name in gw.MAIN_PINS:
            assert d.specifier.contains(gw.MAIN_PINS[name]), (d, gw.MAIN_PINS[name])


def test_pin_drift_names_each_package_whose_version_differs_here(monkeypatch):
    """The rehearsal warns when the pins and this environment differ (a fresh environment may
    resolve newer releases, so this is a warning, not a test of today's versions)."""
    monkeypatch.setitem(gw.MAIN_PINS, "pytest", "0.0.1")
    drift = gw.pin_drift()
    assert f"pytest 0.0.1 (pinned) vs {md.version('pytest')} (here)" in drift


def test_wheels_folder_is_ignored_by_git():
    assert subprocess.run(["git", "check-ignore", "-q", "benchmarks/wheels/x-1.0-py3-none-any.whl"],
                          cwd=REPO).returncode == 0


def test_resolve_over_folder_and_image_stubs(tmp_path):
    """pip's resolver, offline, over a folder and image stubs: what the folder lacks fails, and a
    complete set says where each package comes from."""
    folder, stubs = tmp_path / "wheels", tmp_path / "image"
    folder.mkdir()
    stubs.mkdir()
    gw.write_stub_wheel(stubs, "torch", "2.11.0")
    gw.write_stub_wheel(folder, "clipkit-fake-app", "1.0", ("torch>=2.4", "clipkit-fake-dep>=2"))
    with pytest.raises(SystemExit, match="pip install exited"):
        gw.resolve(["clipkit-fake-app"], folder, stubs, tmp_path / "r1.json")
    gw.write_stub_wheel(folder, "clipkit-fake-dep", "2.1")
    picked = gw.resolve(["clipkit-fake-app"], folder, stubs, tmp_path / "r2.json")
    assert picked == {"clipkit-fake-app": ("1.0", "folder"), "clipkit-fake-dep": ("2.1", "folder"),
                      "torch": ("2.11.0", "image")}
    gw.write_stub_wheel(folder, "clipkit-fake-app2", "1.0", ("torch>=2.12",))   # above the image's torch
    with pytest.raises(SystemExit):
        gw.resolve(["clipkit-fake-app2"], folder, stubs, tmp_path / "r3.json")


def test_verify_names_each_unmet_requirement(tmp_path, capsys):
    info = tmp_path / "site" / "clipkit_fake-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: clipkit-fake\nVersion: 1.0\n"
                                   "Requires-Dist: torch>=1.0\nRequires-Dist: clipkit-surely-absent>=1\n"
                                   "Requires-Dist: clipkit-absent-extra; extra == \"x\"\n"
                                   "Requires-Dist: numpy<1.0\n")
    assert gw.verify([tmp_path / "site"]) == 2
    out = capsys.readouterr().out
    assert "requires clipkit-surely-absent>=1, this Python has nothing" in out
    assert f"requires numpy<1.0, this Python has {md.version('numpy')}" in out
    assert "absent-extra" not in out and "requires torch" not in out


def test_triton_parity_passes_and_catches_a_wrong_kernel(tmp_path, monkeypatch, capsys):
    """The parity script under the interpreter: all rows pass; a gradient 0.1% off fails its rows."""
    from clipkit.kernels import triton_contrastive

    parity = load("triton_parity_gpu")
    args = ["--interpret", "--sizes", "1x8", "40x16", "--dtypes", "float64", "float32"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert parity.main([*args, "--out", str(tmp_path / "triton_parity_gpu.json")]) == 0
    rows = json.loads((tmp_path / "triton_parity_gpu.json").read_text())["rows"]
    assert len(rows) == 2 * (6 + 6 + 3) and all(r["pass"] for r in rows)
    assert max(r["triton_err"] for r in rows if r["dtype"] == "float64") < 1e-12

    summary = load("gpu_summary")
    summary.main([str(tmp_path), "parity: ok (3s)"])
    out = capsys.readouterr().out
    assert "30/30 rows pass" in out and "loss bench: no result" in out and "train bench: no result" in out

    grads = triton_contrastive.infonce_block_grads

    def off(*a, **k):
        dq, dk = grads(*a, **k)
        return (dq * 1.001 if dq is not None else None), dk

    monkeypatch.setattr(triton_contrastive, "infonce_block_grads", off)
    assert parity.main([*args, "--out", str(tmp_path / "bad.json")]) == 1
    bad = json.loads((tmp_path / "bad.json").read_text())["rows"]
    failed = {r["case"].split()[0] for r in bad if not r["pass"]}
    assert failed == {"clip", "infonce"}
