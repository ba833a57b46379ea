#!/usr/bin/env bash
# One GPU call: environment, the attention benchmark, then kernel correctness at real sizes (tests/gpu).
#   scripts/gpu_kernels.sh [test|bench|all] [bench args...]   (logs under $OUT when set)
set -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
out=${OUT:-/tmp/gpu_kernels}
mkdir -p "$out"
mode=${1:-all}
shift || true
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$out/env.txt"
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" | tee -a "$out/env.txt"
if [[ $mode == bench || $mode == all ]]; then
  python3 scripts/bench_attention.py "$@" 2>&1 | tee "$out/bench.txt"
fi
if [[ $mode == test || $mode == all ]]; then
  python3 -m pytest -q --maxfail=6 tests/gpu 2>&1 | tee "$out/tests.txt"
fi
