"""The wheels that the GPU checks need and the GPU image lacks: built here, rehearsed here, installed there.

    python benchmarks/gpu_wheels.py build            # `make gpu-wheels`: download/build into benchmarks/wheels/
    python benchmarks/gpu_wheels.py rehearse         # `make gpu-rehearsal`: prove the folder is complete, on CPU
    python benchmarks/gpu_wheels.py install --target DIR --side-target DIR   # on the GPU machine (gpu_checks.sh)
    python benchmarks/gpu_wheels.py verify DIR...    # there: every requirement of DIR's packages is met

The GPU machine has no network and its Python (3.12) is not a virtual environment; it has torch,
triton and the packages in IMAGE_PACKAGES. The folder holds the rest as CPython 3.12 manylinux
x86_64 or pure-Python wheels (28 wheels, 39 MiB; it travels with the working tree, 64 MiB in all).

Install layout there: `pip install --no-index --no-deps --target MAIN` of MAIN_PINS and
`--target SIDE` of SIDE_PINS, then PYTHONPATH=MAIN (clipkit, from the tree) or SIDE:MAIN
(open_clip_train, whose pipeline needs webdataset <= 0.2.86 where clipkit needs >= 1.0).
--no-deps because pip's resolver under --target ignores the packages already installed, so it
would ask the folder for torch. What --no-deps gives up is checked twice instead:
  * here, `rehearse` runs pip's own resolver (`pip install --dry-run --no-index`) for CPython
    3.12 on manylinux x86_64 over the folder plus one metadata-only stub wheel per image
    package (IMAGE_PACKAGES at the versions assumed there), for clipkit's requirements and for
    open_clip_train's; it must pick every folder wheel and nothing that is neither in the
    folder nor in the image. It then runs the GPU's install command into a scratch target;
  * there, `verify` reads the installed metadata and fails, naming each one, if a requirement
    of an installed package is not met by what that Python actually sees (so a wrong
    assumption about the image's versions is found before the benchmarks start).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / "benchmarks" / "wheels"

# What the GPU image holds (issue 22), at the versions the rehearsal assumes; `verify` checks the
# real ones there. torchvision: timm requires it, so an image with timm has it. packaging,
# fsspec and filelock come with pytest and huggingface-hub; python-dateutil, six and tzdata with
# pandas. Never carried: torch, triton and the nvidia-* CUDA libraries are the image's (GBs).
IMAGE_PACKAGES = {
    "torch": "2.11.0", "torchvision": "0.26.0", "triton": "3.6.0", "numpy": "2.3.5", "pandas": "2.3.3",
    "pytest": "9.0.2", "pillow": "12.1.0", "scipy": "1.16.3", "scikit-learn": "1.8.0", "safetensors": "0.7.0",
    "huggingface-hub": "1.2.3", "regex": "2025.11.3", "tqdm": "4.67.1", "pyyaml": "6.0.3", "timm": "1.0.24",
    "packaging": "25.0", "fsspec": "2025.12.0", "filelock": "3.20.0", "python-dateutil": "2.9.0.post0",
    "six": "1.17.0", "tzdata": "2025.2",
}

# The versions this CPU machine's .venv ran the tests with when the folder was built (`rehearse` warns on drift).
MAIN_PINS = {
    "open-clip-torch": "3.3.0", "ftfy": "6.3.1", "wcwidth": "0.9.5",            # the model library
    "deepspeed": "0.19.8", "hjson": "3.1.0", "msgpack": "1.2.4", "ninja": "1.13.2", "psutil": "7.2.2",
    "py-cpuinfo": "9.0.0", "einops": "0.8.2", "pydantic": "2.14.4", "pydantic-core": "2.50.5",
    "annotated-types": "0.8.0", "typing-inspection": "0.4.5",
    # pydantic 2.14 needs >= 4.16; the image's copy is of unknown age, and 4.16 serves torch as well.
    "typing-extensions": "4.16.0",
    "hydra-core": "1.3.8", "omegaconf": "2.3.1", "antlr4-python3-runtime": "4.9.3",
    "webdataset": "1.0.2", "braceexpand": "0.1.7",
    # Not used by the checks, but imported by any training run: clipkit.recipe imports clipkit.eval,
    # whose search module imports faiss at the top (19 MB), and every run ends by plotting its
    # curves with matplotlib (15 MB with its dependencies). Lazy imports there would drop both.
    "faiss-cpu": "1.15.1",
    "matplotlib": "3.11.2", "contourpy": "1.3.3", "cycler": "0.12.1", "fonttools": "4.69.1", "kiwisolver": "1.5.1",
    "pyparsing": "3.3.3",
}
# open_clip_train's data pipeline breaks with webdataset 1.x (KeyError: 'fname'); it gets this one first.
SIDE_PINS = {"webdataset": "0.2.86"}
# No wheel on the package index (sdist only): built here with `pip wheel --no-deps`.
SOURCE_ONLY = ("deepspeed", "antlr4-python3-runtime")
# Its pure-Python wheel (1.3 MB) instead of the compiled one (6.7 MB): the C parts only speed up font work.
PURE_PREFERRED = ("fonttools",)

# clipkit's dependencies (pyproject.toml) that the GPU checks never import, left out for size.
LEFT_OUT = {
    "wandb": "the checks log to metrics.jsonl (logger=jsonl, the default; timm imports it only if present); "
             "about 20 MB",
    "pycocoevalcap": "CoCa's caption metrics only; about 100 MB (Java jars)",
    "pyarrow": "`clipkit-shards parquet` only; about 40 MB",
}
# Imported by the checks but not clipkit requirements: open_clip_train (pandas, fsspec, braceexpand
# and webdataset <= 0.2.86) and train_bench.py's process monitor (psutil).
CHECK_EXTRAS = ("pandas", "fsspec", "braceexpand", "psutil")

PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_12_x86_64",
             "manylinux2010_x86_64", "manylinux_2_5_x86_64", "manylinux1_x86_64")
TARGET_FLAGS = ["--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "abi3",
                "--abi", "none", *[x for p in PLATFORMS for x in ("--platform", p)], "--only-binary=:all:"]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name_version(path: Path) -> tuple[str, str]:
    """('open-clip-torch', '3.3.0') from open_clip_torch-3.3.0-py3-none-any.whl."""
    name, version = path.name.split("-")[:2]
    return canonical(name), version


def _packaging():
    """packaging's Requirement and default marker environment: the image has it (pytest needs it);
    pip's vendored copy otherwise."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        from pip._vendor.packaging.requirements import Requirement
    return Requirement


def pyproject_dependencies() -> list[str]:
    """[project].dependencies of pyproject.toml, as written."""
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]


def rehearsal_requirements() -> list[str]:
    """clipkit's requirements less LEFT_OUT, and what the checks import besides: the list the
    rehearsal resolves (every pyproject dependency is in it or in LEFT_OUT)."""
    Requirement = _packaging()
    deps = [d for d in pyproject_dependencies() if canonical(Requirement(d).name) not in LEFT_OUT]
    return deps + [x for x in CHECK_EXTRAS if x not in deps]


def clean_pip_env() -> dict[str, str]:
    """This machine's pip settings (extra indexes, find-links, a torch cap) left out: only the
    folder and the stubs may serve the rehearsal."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def pip(*args: str, env: dict[str, str] | None = None, capture: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", *args]
    print("$ " + " ".join(cmd), flush=True)
    done = subprocess.run(cmd, env=env, text=True, capture_output=capture)
    if done.returncode:
        raise SystemExit(f"FAILED: pip {args[0]} exited with {done.returncode} (its error is above)")
    return done


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# -- build -------------------------------------------------------------------------------------------

def build(dest: Path) -> None:
    """Downloads MAIN_PINS and SIDE_PINS (builds SOURCE_ONLY) into a fresh `dest`."""
    scratch = Path(tempfile.mkdtemp(prefix="gpu-wheels-", dir=dest.parent))
    try:
        binary = [f"{n}=={v}" for n, v in MAIN_PINS.items() if n not in SOURCE_ONLY + PURE_PREFERRED]
        # Separate calls: the two webdataset pins conflict for one resolver run.
        pip("download", "--no-deps", *TARGET_FLAGS, "-d", str(scratch), *binary)
        pip("download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "py",
            "--abi", "none", "--platform", "any", "-d", str(scratch), *[f"{n}=={MAIN_PINS[n]}" for n in PURE_PREFERRED])
        pip("download", "--no-deps", *TARGET_FLAGS, "-d", str(scratch), *[f"{n}=={v}" for n, v in SIDE_PINS.items()])
        # DS_BUILD_OPS=0: no compiled ops in the wheel (DeepSpeed JIT-builds any it needs on the GPU);
        # no build isolation, so the sdists build against this environment's torch and setuptools.
        source = [f"{n}=={MAIN_PINS[n]}" for n in SOURCE_ONLY]
        pip("wheel", "--no-cache-dir", "--no-deps", "--no-build-isolation", "--no-binary", ",".join(SOURCE_ONLY),
            "-w", str(scratch), *source, env={**os.environ, "DS_BUILD_OPS": "0"})
        for whl in scratch.glob("*.whl"):
            _, abi, platform = whl.name[:-len(".whl")].split("-")[-3:]
            if abi not in ("none", "abi3", "cp312") or not (platform == "any" or all(
                    p.startswith("manylinux") and p.endswith("_x86_64") for p in platform.split("."))):
                raise SystemExit(f"{whl.name} is not for CPython 3.12 on x86_64 Linux")
        shutil.rmtree(dest, ignore_errors=True)
        scratch.rename(dest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    check_folder(dest)
    print(f"{dest}: {len(list(dest.glob('*.whl')))} wheels, {folder_size(dest) / 2**20:.1f} MiB")


def select(folder: Path, pins: dict[str, str]) -> list[Path]:
    """The wheel of each pin in `folder`; fails naming any that is missing."""
    found = {wheel_name_version(p): p for p in folder.glob("*.whl")}
    missing = [f"{n}=={v}" for n, v in pins.items() if (n, v) not in found]
    if missing:
        raise SystemExit(f"{folder} lacks {', '.join(missing)}: run `make gpu-wheels`")
    return [found[(n, v)] for n, v in pins.items()]


def check_folder(folder: Path) -> None:
    """Every pin has its wheel and the folder holds nothing else."""
    wanted = set(select(folder, MAIN_PINS)) | set(select(folder, SIDE_PINS))
    extra = sorted(p.name for p in folder.iterdir() if p not in wanted)
    if extra:
        raise SystemExit(f"{folder} holds files no pin asks for: {', '.join(extra)}")


# -- rehearse ----------------------------------------------------------------------------------------

def write_stub_wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    """A wheel with metadata only: the image's package as pip's resolver will see it. The image's
    own requirements are left out (`requires`, for tests): the image is taken as consistent."""
    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n"
                                                                                 for r in requires)
    files = {f"{dist}.dist-info/METADATA": meta,
             f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: clipkit-gpu-wheels\nRoot-Is-Purelib: true\n"
                                         "Tag: py3-none-any\n"}
    files[f"{dist}.dist-info/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{dist}.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)
    return path


def resolve(requirements: list[str], folder: Path, stubs: Path, report: Path) -> dict[str, tuple[str, str]]:
    """pip's resolver for CPython 3.12 manylinux over `folder` + `stubs` only.
    -> {name: (version, 'folder' | 'image')} of every package it would install."""
    pip("install", "--dry-run", "--ignore-installed", "--no-index", "--find-links", str(folder), "--find-links",
        str(stubs), *TARGET_FLAGS, "--quiet", "--report", str(report), *requirements, env=clean_pip_env())
    picked = {}
    for item in json.loads(report.read_text())["install"]:
        meta = item["metadata"]
        url = item["download_info"]["url"]
        where = "image" if url.startswith(stubs.resolve().as_uri()) else "folder"
        picked[canonical(meta["name"])] = (meta["version"], where)
    return picked


def pin_drift() -> list[str]:
    """MAIN_PINS that differ from what this Python runs the test suite with (a fresh environment
    may resolve newer releases): the GPU would then run other versions than the CPU tests."""
    from importlib import metadata

    drift = []
    for name, version in MAIN_PINS.items():
        try:
            here = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if here != version:
            drift.append(f"{name} {version} (pinned) vs {here} (here)")
    return drift


def rehearse(folder: Path) -> None:
    """The folder is complete for the GPU image: pip's resolver and the install command, for 3.12."""
    if not folder.is_dir():
        raise SystemExit(f"{folder} does not exist: run `make gpu-wheels` first")
    check_folder(folder)
    for line in pin_drift():
        print(f"warning: {line}; update MAIN_PINS in {Path(__file__).name} and rebuild", flush=True)
    Requirement = _packaging()
    with tempfile.TemporaryDirectory(prefix="gpu-rehearsal-") as tmp:
        stubs = Path(tmp, "image")
        stubs.mkdir()
        for name, version in IMAGE_PACKAGES.items():
            write_stub_wheel(stubs, name, version)
        failures = []
        # 1. clipkit's requirements, with the webdataset that clipkit needs.
        main_reqs = rehearsal_requirements()
        main = resolve(main_reqs, folder, stubs, Path(tmp, "main.json"))
        # 2. open_clip_train's environment: the side folder's webdataset shadows the main one.
        side_reqs = [f"open_clip_torch=={MAIN_PINS['open-clip-torch']}", "webdataset<=0.2.86,>=0.2.5", "pandas",
                     "fsspec", "braceexpand", "psutil"]
        side = resolve(side_reqs, folder, stubs, Path(tmp, "side.json"))
        for label, picked, pins in (("clipkit", main, MAIN_PINS), ("open_clip_train", side, {**MAIN_PINS, **SIDE_PINS})):
            for name, (version, where) in sorted(picked.items()):
                expected = IMAGE_PACKAGES.get(name) if where == "image" else pins.get(name)
                if version != expected:
                    failures.append(f"{label}: pip picked {name} {version} from the {where}, expected {expected}")
        used = {(n, v) for picked in (main, side) for n, (v, w) in picked.items() if w == "folder"}
        unused = sorted(p.name for p in folder.glob("*.whl") if wheel_name_version(p) not in used)
        if unused:
            failures.append(f"wheels no resolution picked (dead weight): {', '.join(unused)}")
        print(f"\nclipkit's requirements resolved ({len(main_reqs)}): {' '.join(main_reqs)}")
        print(f"  from the folder: {' '.join(f'{n}=={v}' for n, (v, w) in sorted(main.items()) if w == 'folder')}")
        print(f"  from the image:  {' '.join(f'{n}=={v}' for n, (v, w) in sorted(main.items()) if w == 'image')}")
        print(f"open_clip_train resolved: {' '.join(f'{n}=={v}' for n, (v, w) in sorted(side.items()))}")
        print("left out of clipkit's requirements: " + "; ".join(f"{n} ({why})" for n, why in LEFT_OUT.items()))
        # What the image must satisfy: every requirement of a folder wheel that lands on an image package.
        on_image = sorted({f"{wheel_name_version(w)[0]} needs {r}" for w in folder.glob("*.whl")
                           for r in map(Requirement, requires_dist(w))
                           if canonical(r.name) in IMAGE_PACKAGES and r.specifier and _applies(r)})
        print("version floors on the image's packages: " + ("; ".join(on_image) or "none"))
        # 3. The install command gpu_checks.sh runs, into scratch targets, for 3.12 manylinux.
        for label, pins in (("main", MAIN_PINS), ("side", SIDE_PINS)):
            target = Path(tmp, label)
            pip("install", "--no-index", "--no-deps", *TARGET_FLAGS, "--quiet", "--target", str(target),
                *map(str, select(folder, pins)), env=clean_pip_env())
            print(f"  {label} target: {folder_size(target) / 2**20:.1f} MiB installed")
    size = folder_size(folder)
    print(f"\n{folder}: {len(list(folder.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB")
    if failures:
        raise SystemExit("rehearsal FAILED:\n  " + "\n  ".join(failures))
    print("rehearsal passed")


def requires_dist(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        text = z.read(meta).decode()
    return [line.split(":", 1)[1].strip() for line in text.split("\n\n", 1)[0].splitlines()
            if line.startswith("Requires-Dist:")]


def _applies(req, extras: tuple[str, ...] = ("",)) -> bool:
    """Whether `req` applies on CPython 3.12 Linux x86_64 without extras."""
    if req.marker is None:
        return True
    env = {"python_version": "3.12", "python_full_version": "3.12.0", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
           "platform_machine": "x86_64", "os_name": "posix"}
    return any(req.marker.evaluate({**env, "extra": e}) for e in extras)


# -- install and verify (on the GPU machine) ---------------------------------------------------------

def install(folder: Path, target: Path, side_target: Path) -> None:
    """MAIN_PINS into `target`, SIDE_PINS into `side_target`, from `folder` only."""
    for pins, dest in ((MAIN_PINS, target), (SIDE_PINS, side_target)):
        wheels = select(folder, pins)
        shutil.rmtree(dest, ignore_errors=True)
        if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0:
            pip("install", "--no-index", "--no-deps", "--quiet", "--no-warn-script-location", "--target", str(dest),
                *map(str, wheels), env=clean_pip_env())
        else:  # a Python without pip: a wheel is a zip of its site-packages files
            print(f"no pip for {sys.executable}: unpacking {len(wheels)} wheels into {dest}")
            for whl in wheels:
                unpack(whl, dest)
    print(f"installed {len(MAIN_PINS)} packages into {target} ({folder_size(target) / 2**20:.1f} MiB), "
          f"{len(SIDE_PINS)} into {side_target}")


def unpack(wheel: Path, dest: Path) -> None:
    """Extracts a wheel as pip would for its libraries: <name>.data/{purelib,platlib} at the top."""
    with zipfile.ZipFile(wheel) as z:
        for member in z.infolist():
            parts = member.filename.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue  # scripts and headers: not needed by `python -m`
                parts = parts[2:]
            out = dest.joinpath(*parts)
            if member.is_dir():
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(z.read(member))
            if member.external_attr >> 16 & 0o111:
                out.chmod(0o755)


def verify(targets: list[Path]) -> int:
    """For each distribution installed in `targets`: every requirement (no extras, this
    platform) is met by a distribution visible on sys.path (the first one found, as import
    finds it). Prints one line per unmet requirement; returns their count."""
    import importlib.metadata as md

    Requirement = _packaging()
    seen: dict[str, str] = {}
    for dist in md.distributions():  # sys.path order: the first of a name is what imports
        seen.setdefault(canonical(dist.metadata["Name"]), dist.version)
    problems = 0
    for target in targets:
        if not any(md.distributions(path=[str(target)])):
            problems += 1
            print(f"unmet: {target} holds no installed package (did the install run?)")
        for dist in md.distributions(path=[str(target)]):
            for line in dist.requires or []:
                req = Requirement(line)
                if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                    continue
                have = seen.get(canonical(req.name))
                if have is None or (req.specifier and not req.specifier.contains(have, prereleases=True)):
                    problems += 1
                    print(f"unmet: {dist.metadata['Name']} {dist.version} requires {req}, "
                          f"this Python has {have or 'nothing'}")
    print(f"verify: {problems} unmet requirement(s); torch {seen.get('torch')}, triton {seen.get('triton')}, "
          f"numpy {seen.get('numpy')}, typing-extensions {seen.get('typing-extensions')}")
    return problems


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("build", "rehearse"):
        s = sub.add_parser(name)
        s.add_argument("--dest", type=Path, default=WHEELS)
    s = sub.add_parser("install")
    s.add_argument("--wheels", type=Path, default=WHEELS)
    s.add_argument("--target", type=Path, required=True)
    s.add_argument("--side-target", type=Path, required=True)
    s = sub.add_parser("verify")
    s.add_argument("targets", type=Path, nargs="+")
    args = p.parse_args(argv)
    if args.cmd == "build":
        build(args.dest.resolve())
    elif args.cmd == "rehearse":
        rehearse(args.dest.resolve())
    elif args.cmd == "install":
        install(args.wheels, args.target, args.side_target)
    else:
        sys.exit(1 if verify(args.targets) else 0)


if __name__ == "__main__":
    main()
