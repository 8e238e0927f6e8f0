#!/usr/bin/env bash
# The GPU checks, in one run of a few minutes on one lent H100/H200 (no network there):
#   1. benchmarks/train_bench.py: ViT-B-32, bf16, batch 256 per GPU, 64 steps, 8 data workers,
#      clipkit vs open_clip_train (--precision amp_bf16), on synthetic 256 px JPEG shards, 2 alternations;
#   2. benchmarks/loss_bench_gpu.py on a reduced grid (CLIP and SigLIP, bf16, D 512, B 16k..256k).
#
#   bash benchmarks/gpu_checks.sh            # JSON and logs to $OUT if set, else benchmarks/results/
#
# Python: $PYTHON, else .venv/bin/python, else python3; it needs torch with CUDA and clipkit's
# dependencies. open_clip_train's side venv (webdataset 0.2.86 + pandas) is built in /tmp with
# `train_bench.py --make-venv`, from benchmarks/wheels/ when that folder exists (carry it:
# `pip download -d benchmarks/wheels 'webdataset<=0.2.86' pandas`), else from the package
# index; when neither works the open_clip_train side is skipped and the reason printed.
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-benchmarks/results}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-}
[ -z "$PY" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
[ -z "$PY" ] && PY=$(command -v python3)
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
START=$(date +%s)
stamp() { echo "[gpu_checks +$(( $(date +%s) - START ))s] $*"; }

stamp "python: $PY"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  stamp "no CUDA device visible to $PY: nothing to check"; exit 1
fi
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
if ! "$PY" -c "import open_clip, deepspeed, hydra, omegaconf" 2>/dev/null; then
  stamp "clipkit's dependencies (open_clip_torch, deepspeed, hydra-core) are not importable by $PY; trying benchmarks/wheels"
  [ -d benchmarks/wheels ] && "$PY" -m pip install --quiet --no-index --find-links benchmarks/wheels -e . \
    || { stamp "cannot install clipkit here: skipping the training comparison"; SKIP_TRAIN=1; }
fi

TRAINERS=clipkit,open_clip
SIDE=/tmp/clipkit-bench-venv
WHEELS=()
[ -d benchmarks/wheels ] && WHEELS=(--wheels benchmarks/wheels)
if [ -z "${SKIP_TRAIN:-}" ]; then
  if ! timeout 180 "$PY" benchmarks/train_bench.py --make-venv --venv "$SIDE" "${WHEELS[@]}" > "$OUT_DIR/bench_venv.log" 2>&1; then
    stamp "could not build open_clip_train's side venv (webdataset<=0.2.86, pandas; see $OUT_DIR/bench_venv.log):"
    stamp "running clipkit alone"
    tail -3 "$OUT_DIR/bench_venv.log"
    TRAINERS=clipkit
  fi
  stamp "train_bench: ViT-B-32 bf16 batch 256, $TRAINERS"
  timeout 420 "$PY" benchmarks/train_bench.py --device cuda --precision bf16 --cases vitb32 --batch 256 --steps 64 \
    --skip 10 --workers 8 --repeats 2 --trainers "$TRAINERS" --venv "$SIDE" --workdir /tmp/clipkit-train-bench \
    --out "$OUT_DIR/train_bench_gpu.json" 2>&1 | tee "$OUT_DIR/train_bench_gpu.txt"
fi

stamp "loss_bench_gpu (reduced grid)"
timeout 240 "$PY" benchmarks/loss_bench_gpu.py --batch 16384 65536 262144 --dim 512 --dtype bf16 --reps 3 \
  --compiled-max-batch 16384 --out "$OUT_DIR/loss_bench_gpu.json" 2>&1 | tee "$OUT_DIR/loss_bench_gpu.txt"
stamp "done"
