"""Full causal attention over packed documents: the paths of `moba_train/ops/full.py`, timed fwd+bwd.

Table 1, documents of one length (shapes repeat from call to call): per-document SDPA, one batched SDPA call (what
full_attn takes for equal lengths) and one packed flash varlen call. Table 2, documents of random lengths drawn
anew for every call, as packed training data gives: per-document SDPA (cuDNN plans every new length) against the
packed call (what full_attn takes for unequal lengths).

    PYTHONPATH=. python scripts/bench_full_attn.py
"""

import argparse
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_attention import cuda_ms  # noqa: E402
from moba_train.ops.full import PackedCausal, equal_docs_sdpa, per_doc_sdpa  # noqa: E402

K = 1024
HQ, HKV, DIM = 32, 8, 128
EQUAL = [(32 * K, 256), (32 * K, 1 * K), (32 * K, 4 * K), (32 * K, 8 * K), (128 * K, 2 * K), (128 * K, 8 * K),
         (128 * K, 32 * K)]  # (tokens, document length)
RANDOM = [(128 * K, 1 * K, 4 * K), (128 * K, 4 * K, 16 * K), (128 * K, 16 * K, 64 * K)]  # (tokens, min, max length)


def fwd_bwd(fn, q, k, v, grad):
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    return (out.detach(), *torch.autograd.grad(out, leaves, grad))


def inputs(tokens):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(tokens, h, DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
               for h in (HQ, HKV, HKV))
    return q, k, v, torch.randn_like(q)


def packed(lengths):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    return lambda q, k, v: PackedCausal.apply(q, k, v, cu, max(lengths), DIM ** -0.5)


def per_doc(lengths):
    ends = torch.tensor(lengths).cumsum(0).tolist()
    spans = list(zip([0, *ends[:-1]], ends))
    return lambda q, k, v: per_doc_sdpa(q, k, v, spans, None)


def equal_lengths():
    print("| tokens | doc length | docs | per-doc SDPA ms | batched SDPA ms | packed flash ms |")
    print("|---|---|---|---|---|---|")
    for tokens, doc in EQUAL:
        q, k, v, grad = inputs(tokens)
        lengths = [doc] * (tokens // doc)
        batched = lambda q, k, v: equal_docs_sdpa(q, k, v, doc, None)  # noqa: E731
        ms = [cuda_ms(lambda: fwd_bwd(fn, q, k, v, grad))[0] for fn in (per_doc(lengths), batched, packed(lengths))]
        print(f"| {tokens // K}K | {doc} | {len(lengths)} | " + " | ".join(f"{x:.2f}" for x in ms) + " |", flush=True)


def random_lengths(calls=4):
    print("\n| tokens | doc lengths | per-doc SDPA ms per call | packed flash ms per call |")
    print("|---|---|---|---|")
    rng = random.Random(0)
    for tokens, low, high in RANDOM:
        q, k, v, grad = inputs(tokens)
        row = []
        for make in (per_doc, packed):
            spent = 0.0
            for _ in range(calls):
                lengths = []
                while sum(lengths) < tokens:
                    lengths.append(min(rng.randint(low, high), tokens - sum(lengths)))
                fn = make(lengths)
                torch.cuda.synchronize()
                start = time.perf_counter()
                fwd_bwd(fn, q, k, v, grad)
                torch.cuda.synchronize()
                spent += time.perf_counter() - start
            row.append(1e3 * spent / calls)
        print(f"| {tokens // K}K | {low // K}-{high // K}K | {row[0]:.1f} | {row[1]:.1f} |", flush=True)


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_full_attn: needs a CUDA GPU")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, Hq={HQ} Hkv={HKV} D={DIM} bf16")
    equal_lengths()
    random_lengths()
