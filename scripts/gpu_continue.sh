#!/usr/bin/env bash
# Continue a small random HF Llama (made here with transformers) for a few steps at 32K tokens with MoBA
# (attention.backend=auto: the Triton kernels on a GPU) in all but the last 3 layers, full attention there.
# Prints the trainer's loss and tokens/s lines. One H100: ~2 minutes.
#   PYTHONPATH=$PWD bash scripts/gpu_continue.sh [extra hydra overrides ...]
# Knobs (env): STEPS=12 SEQ=32768 DIM=1024 LAYERS=8 DEVICE=cuda; a CPU smoke run:
#   STEPS=2 SEQ=1024 DIM=64 LAYERS=4 DEVICE=cpu bash scripts/gpu_continue.sh attention.block_size=256
set -euo pipefail
cd "$(dirname "$0")/.."
work=${WORK:-/tmp/gpu_continue}  # model + checkpoint (GBs): kept out of $OUT; metrics are copied there
rm -rf "$work" && mkdir -p "$work"
STEPS=${STEPS:-12}; SEQ=${SEQ:-32768}; DIM=${DIM:-1024}; LAYERS=${LAYERS:-8}; DEVICE=${DEVICE:-cuda}
export DIM LAYERS
python - "$work/hf" <<'PY'
import os, sys, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
t = time.time()
torch.manual_seed(0)
dim, layers = int(os.environ["DIM"]), int(os.environ["LAYERS"])
cfg = LlamaConfig(vocab_size=32000, hidden_size=dim, intermediate_size=dim * 11 // 4, num_hidden_layers=layers,
                  num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=16384, rope_theta=500000.0,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                  tie_word_embeddings=False, torch_dtype="bfloat16")
model = LlamaForCausalLM(cfg).to(torch.bfloat16)
model.save_pretrained(sys.argv[1])
n = sum(p.numel() for p in model.parameters())
print(f"made HF Llama: {n / 1e6:.0f}M params, {layers} layers, GQA 16/4, llama3 rope -> {sys.argv[1]} "
      f"({time.time() - t:.1f}s)")
PY
python -c "import torch; print('device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
torchrun --standalone --nproc_per_node=1 launch/pretrain.py +exp=continue_llama \
  model.init_from="$work/hf" model.max_seq_len="$SEQ" \
  data=synthetic data.seq_len="$SEQ" data.batch_size=1 'data.seq_len_schedule=[]' \
  attention.kind=moba attention.block_size=4096 attention.top_k=3 attention.backend=auto \
  attention.full_attn_last_k=3 'attention.schedule=[]' \
  train.device="$DEVICE" train.steps="$STEPS" train.log_every=2 train.warmup_steps=2 train.lr=1e-4 \
  train.out_dir="$work/run" "$@" 2>&1 | tr '\r' '\n' | grep -Ev "^train: .*(it/s|s/it)\]$"
echo "--- metrics ($work/run/metrics.jsonl)"
cat "$work/run/metrics.jsonl" 2>/dev/null || true
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT/gpu_continue" && cp "$work/run/metrics.jsonl" "$OUT/gpu_continue/"; fi
