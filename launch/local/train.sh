#!/usr/bin/env bash
# Single-node launch: NPROC processes (default: 1 per GPU, else 2 on CPU) under torchrun.
#   launch/local/train.sh experiment=demo_digits trainer=zero2
set -euo pipefail
if command -v nvidia-smi >/dev/null 2>&1; then default=$(nvidia-smi -L | wc -l); else default=2; fi
exec torchrun --standalone --nproc_per_node="${NPROC:-$default}" -m clipkit.train "$@"
