"""Full causal attention over packed documents: per-document SDPA (cuDNN) against one packed flash varlen call.

Prints a markdown table of forward+backward ms for equal-length documents; `moba_train/ops/full.py` takes the
packed call for documents up to PACKED_MAX_DOC tokens, chosen from this table.

    PYTHONPATH=. python scripts/bench_full_attn.py
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_attention import cuda_ms  # noqa: E402
from moba_train.ops.full import PackedCausal, per_doc_sdpa  # noqa: E402

K = 1024
HQ, HKV, DIM = 32, 8, 128
LAYOUTS = [(32 * K, 256), (32 * K, 1 * K), (32 * K, 4 * K), (32 * K, 8 * K), (128 * K, 2 * K), (128 * K, 8 * K),
           (128 * K, 16 * K), (128 * K, 32 * K)]  # (tokens, document length)


def fwd_bwd(fn, q, k, v, grad):
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    return (out.detach(), *torch.autograd.grad(out, leaves, grad))


def main():
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, Hq={HQ} Hkv={HKV} D={DIM} bf16")
    print("| tokens | doc length | docs | per-doc SDPA ms | packed flash ms | packed / per-doc | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for tokens, doc in LAYOUTS:
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(tokens, h, DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
                   for h in (HQ, HKV, HKV))
        grad = torch.randn_like(q)
        spans = [(s, s + doc) for s in range(0, tokens, doc)]
        cu = torch.arange(0, tokens + 1, doc, device="cuda", dtype=torch.int32)
        loop = lambda q, k, v: per_doc_sdpa(q, k, v, spans, None)  # noqa: E731
        packed = lambda q, k, v: PackedCausal.apply(q, k, v, cu, doc, DIM ** -0.5)  # noqa: E731
        loop_ms, want = cuda_ms(lambda: fwd_bwd(loop, q, k, v, grad))
        packed_ms, got = cuda_ms(lambda: fwd_bwd(packed, q, k, v, grad))
        diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(got, want))
        print(f"| {tokens // K}K | {doc} | {len(spans)} | {loop_ms:.2f} | {packed_ms:.2f} | {packed_ms / loop_ms:.2f} "
              f"| {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
