#!/usr/bin/env bash
# The GPU checks in one command, for one lent H100/H200 with no network (about 6-8 minutes):
#
#   make gpu-wheels && make gpu-rehearsal     # first, on a machine with network: benchmarks/wheels/ (9 MB)
#   bash benchmarks/gpu_checks.sh             # on the GPU machine, from the tree with benchmarks/wheels/
#
#   0. installs benchmarks/wheels/ with `pip install --no-index --no-deps --target` into /tmp (the
#      image's Python is not a venv; nothing of it is changed) and checks every requirement is met;
#   1. benchmarks/triton_parity_gpu.py: the Triton kernels against chunked float64 truth (float64,
#      float32, bf16; loss and every gradient; B x D from 1x8 to 16384x512);
#   2. benchmarks/loss_bench_gpu.py: CLIP and SigLIP, bf16, D 512, B 16k/65k/256k; Triton, chunked and
#      open_clip; fwd+bwd time, peak memory, x the 4U floor at datasheet and measured bf16 rate;
#   3. benchmarks/train_bench.py: ViT-B-32, bf16, batch 256, 64 steps, 8 workers, clipkit against
#      open_clip_train (webdataset 0.2.86 from a side --target folder), alternating; samples/s, GPU peak.
#
# Each part has a time cap (and the whole run GPU_CHECKS_BUDGET_S, default 480 s): a part that
# overruns is stopped, recorded as a timeout, and the next one runs. Writes at most 6 files to
# $OUT (else benchmarks/results/gpu_checks/): summary.txt, gpu_checks.log and the parts' JSON.
# Python: $PYTHON, else python3 (it must have torch with CUDA). Without a GPU it says so in one line
# and exits 2 before installing anything.
set -u
cd "$(dirname "$0")/.."
REPO=$PWD
command -v nvidia-smi >/dev/null 2>&1 || { echo "gpu_checks: no nvidia-smi on this machine (no NVIDIA GPU): nothing to check"; exit 2; }
PY=${PYTHON:-$(command -v python3)}
[ -d benchmarks/wheels ] || { echo "gpu_checks: benchmarks/wheels/ is missing: run \`make gpu-wheels\` where there is network, and carry it"; exit 2; }
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
  || { echo "gpu_checks: $PY has no torch with a usable CUDA device: nothing to check"; exit 2; }

OUT_DIR=${OUT:-benchmarks/results/gpu_checks}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG=$OUT_DIR/gpu_checks.log
BUDGET=${GPU_CHECKS_BUDGET_S:-480}
SITE=/tmp/clipkit-gpu-site       # clipkit's dependencies
SIDE=/tmp/clipkit-gpu-side       # webdataset 0.2.86 for open_clip_train, ahead of SITE
WORK=/tmp/clipkit-gpu-work
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 DS_ACCELERATOR=cuda TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}
export PATH=$SITE/bin:$PATH      # ninja, should DeepSpeed JIT-build an op
START=$(date +%s)
STATUS=()
stamp() { echo "[gpu_checks +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
# part NAME CAP_S COMMAND...: runs under min(CAP_S, what the budget has left), output to the log.
part() {
  local name=$1 cap=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) - 10 ))
  (( cap > left )) && cap=$left
  if (( cap < 20 )); then STATUS+=("$name: skipped (budget spent)"); stamp "$name: skipped, budget spent"; return; fi
  stamp "$name (cap ${cap}s): $*"
  local t0=$(date +%s)
  timeout --kill-after=10 "$cap" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]} took=$(( $(date +%s) - t0 ))
  case $rc in
    0) STATUS+=("$name: ok (${took}s)") ;;
    124|137) STATUS+=("$name: TIMEOUT after ${took}s (cap ${cap}s)") ;;
    *) STATUS+=("$name: FAILED rc=$rc (${took}s)") ;;
  esac
  stamp "${STATUS[-1]}"
}

: > "$LOG"
stamp "python $PY; budget ${BUDGET}s; output $OUT_DIR"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee -a "$LOG"
# The image's own packages, before anything is installed: what benchmarks/gpu_wheels.py's IMAGE_PACKAGES assumed.
PYTHONPATH= "$PY" -m pip list --format=freeze --disable-pip-version-check >> "$LOG" 2>&1

part install 90 "$PY" benchmarks/gpu_wheels.py install --target "$SITE" --side-target "$SIDE"
part verify 30 "$PY" benchmarks/gpu_wheels.py verify "$SITE" "$SIDE"
part parity 100 "$PY" benchmarks/triton_parity_gpu.py --out "$OUT_DIR/triton_parity_gpu.json"
part loss_bench 160 "$PY" benchmarks/loss_bench_gpu.py --batch 16384 65536 262144 --dim 512 --dtype bf16 \
  --impls triton chunked open_clip --reps 3 --warmup 1 --out "$OUT_DIR/loss_bench_gpu.json"
# The ViT-B-32 comparison: 2 alternations when the budget allows, else 1.
REPEATS=2
(( BUDGET - ($(date +%s) - START) < 200 )) && REPEATS=1
part train_bench 260 "$PY" benchmarks/train_bench.py --device cuda --precision bf16 --cases vitb32 --batch 256 \
  --steps 64 --skip 10 --workers 8 --repeats "$REPEATS" --trainers clipkit,open_clip --side-path "$SIDE" --keep-going \
  --workdir "$WORK" --out "$OUT_DIR/train_bench_gpu.json"

stamp "done"
"$PY" benchmarks/gpu_summary.py "$OUT_DIR" "${STATUS[@]}" | tee "$OUT_DIR/summary.txt"
[[ " ${STATUS[*]} " != *FAILED* && " ${STATUS[*]} " != *TIMEOUT* ]]
