#!/usr/bin/env bash
# One GPU call for the foundation / HF checks: +exp=tiny on CUDA, a +exp=moba_128k smoke run at 32K tokens
# with a small model (full attention, then MoBA on the fused kernels), the continued-training run
# (scripts/gpu_continue.sh) and the transformers benchmark + GPU tests. Logs under $OUT.
#   bash scripts/gpu_smoke.sh   (after installing the carried wheels, PYTHONPATH=/tmp/site:$PWD)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu_smoke}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
quiet() { tr '\r' '\n' | grep -Ev "^train: .*(it/s|s/it)\]?$" | tail -n "${1:-4}"; }
last() { tail -n 2 "$1/metrics.jsonl"; }

echo "== tiny on cuda"
python3 launch/pretrain.py +exp=tiny train.device=cuda checkpoint.resume=none train.out_dir=/tmp/r/tiny 2>&1 | quiet
last /tmp/r/tiny

small="model.n_layers=4 model.dim=1024 model.n_heads=16 model.n_kv_heads=8 model.ffn_dim=4096 data.name=synthetic
  data.seq_len=32768 data.batch_size=1 train.steps=8 train.log_every=1 train.warmup_steps=2 checkpoint.resume=none"
for kind in full moba; do
  echo "== moba_128k smoke, 32K tokens, attention.kind=$kind"
  python3 launch/pretrain.py +exp=moba_128k $small attention.kind=$kind train.out_dir=/tmp/r/smoke_$kind 2>&1 | quiet
  last /tmp/r/smoke_$kind
done

echo "== continued training (issue 6)"
timeout 200 bash scripts/gpu_continue.sh 2>&1 | tail -n 12

echo "== transformers integration (issue 7)"
timeout 200 python3 scripts/bench_hf.py --out "$out/hf.json" 2>&1 | tail -n 20
timeout 120 python3 -m pytest -q tests/test_hf_attention.py -m gpu 2>&1 | tail -n 3
