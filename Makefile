# `make demo` and `make test` each set up .venv on first use (Python >= 3.10 as python3).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.clipkit-installed
export HF_HUB_OFFLINE := 1

.PHONY: setup slurm-packages demo test test-slow clean-demo bench-venv gpu-wheels gpu-rehearsal

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@# PYTHONWARNINGS: setuptools warns on every editable install that a local clipkit/ folder shadows imports.
	PYTHONWARNINGS=ignore $(BIN)/pip install --quiet -e '.[dev]'
	@# CLIP_benchmark's metric code, for the parity tests. --no-deps: its requirements (transformers,
	@# pycocoevalcap with Java jars) serve its CLI; the metric modules need only torch, tqdm, sklearn.
	$(BIN)/pip install --quiet --no-deps clip-benchmark==1.6.2
	@# DeepSpeed JIT-compiles its CPU shared-memory comm op on first use (~1 min); do it once here.
	$(BIN)/python -c "from deepspeed.accelerator import get_accelerator as a; b = a().create_op_builder('ShareMemCommBuilder'); b.load() if b is not None and b.is_compatible() else None"
	touch $(STAMP)

setup: $(STAMP)

# Shards sklearn's bundled digits, trains a tiny CLIP under DeepSpeed, prints zero-shot + retrieval.
# A second `make demo` resumes the finished run and only re-evaluates (`make clean-demo` to retrain).
demo: setup
	test -f data/digits/test/nshards.txt || $(BIN)/clipkit-shards digits data/digits
	$(BIN)/clipkit-train experiment=demo_digits trainer.resume=auto

# tests/e2e/test_slurm_launch.py starts a real 2-node SLURM cluster on this machine: it needs
# Debian's slurm-wlm and munge, installed here where we are root with apt-get (7-25 s);
# elsewhere those tests are skipped and say why.
slurm-packages:
	@test -x /usr/sbin/slurmctld || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null) || \
	  echo "could not install slurm-wlm and munge: the SLURM launch tests will be skipped"

# Lint (ruff: pyflakes, pycodestyle, import order, bugbear, pyupgrade; pyproject.toml) fails the run first.
test: setup slurm-packages
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

test-slow: setup
	$(BIN)/python -m pytest -m slow

clean-demo:
	rm -rf outputs/demo_digits-clip outputs/demo_digits-siglip

# open_clip_train's side environment for benchmarks/train_bench.py: webdataset 0.2.86 + pandas in
# .bench-venv/, torch and open_clip read from .venv (the project's environment is not changed).
bench-venv: setup
	$(BIN)/python benchmarks/train_bench.py --make-venv

# The GPU checks' wheels (benchmarks/gpu_checks.sh; no network there): what clipkit, open_clip_train and the
# checks need and the GPU image (Python 3.12, torch, triton, numpy, pandas...) lacks, for CPython 3.12 on
# manylinux x86_64, into the ignored benchmarks/wheels/ (28 wheels, 39 MiB; it travels with the tree). Needs the
# package index; deepspeed and antlr4-python3-runtime (sdists only) are built here.
gpu-wheels: setup
	$(BIN)/python benchmarks/gpu_wheels.py build

# The install, rehearsed on CPU against the GPU image's package list: pip's resolver over the folder and
# metadata-only stubs of the image's packages must pick every wheel and need nothing else.
gpu-rehearsal: setup
	$(BIN)/python benchmarks/gpu_wheels.py rehearse
