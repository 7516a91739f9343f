#!/usr/bin/env bash
# The first GPU run (#22, #18): every cell of benchmarks/gpu_check.py on one GPU, at most 8 minutes, no downloads.
# Writes $OUT/gpu_check.json and $OUT/gpu_check.md (OUT defaults to ./gpu_check_out). Extra arguments go to the
# driver, e.g. `--skip compile` or `--dry-run` (CPU, tiny sizes).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_check_out}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 480 python benchmarks/gpu_check.py --out "$out" "$@"
