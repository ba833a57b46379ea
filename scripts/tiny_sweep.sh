#!/usr/bin/env bash
# Learning check of +exp=tiny variants, each pinned to 2 CPU cores (the CI machine's size), run side by side on
# a many-core host. Usage: OUT=dir scripts/tiny_sweep.sh [steps]
set -uo pipefail
steps=${1:-300}
out=${OUT:-/tmp/tiny_sweep}
mkdir -p "$out"
run() {  # name cores overrides...
  local name=$1 cores=$2; shift 2
  OMP_NUM_THREADS=2 timeout "${BUDGET_S:-520}" taskset -c "$cores" python3 launch/pretrain.py +exp=tiny train.device=cpu train.steps="$steps" \
    train.log_every=10 train.out_dir="$out/$name" checkpoint.interval=0 "$@" > "$out/$name.log" 2>&1 &
}
run s2048_k4 0,1
run s2048_k1 2,3 attention.top_k=1
run s1024_b8 4,5 data.seq_len=1024 data.batch_size=8 attention.block_size=64 attention.top_k=3
run s2048_n32 6,7 data.num_needles=32 data.needle_values=6
run s2048_lr1e2 8,9 train.lr=1e-2
run s2048_b2 10,11 data.batch_size=2
run s1024_k1 12,13 data.seq_len=1024 data.batch_size=8 attention.block_size=64 attention.top_k=1
run s2048_blk256 14,15 attention.block_size=256 attention.top_k=3
wait
for f in "$out"/*/metrics.jsonl; do
  printf '%-14s' "$(basename "$(dirname "$f")")"
  python3 -c "
import json,sys
rs=[json.loads(l) for l in open('$f')] or [{'loss': float('nan'), 'tokens_per_s': 0}]
print(' '.join(f\"{r['loss']:.2f}\" for r in rs[::3]), '| final', f\"{rs[-1]['loss']:.3f}\", 'tok/s', f\"{rs[-1]['tokens_per_s']:.0f}\")"
done
