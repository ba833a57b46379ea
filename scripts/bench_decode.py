"""One MoBA decode step of one attention layer: the torch gated path, the fused Triton kernels, dense attention.

    PYTHONPATH=$PWD python scripts/bench_decode.py            # one GPU, < 1 min

Batch 1, one new query over a KV cache of random bf16 keys; the step is `moba_train.hf.decode.gated_step` (gate +
attention, block means already built) with the fused kernels off ("torch") and on ("fused"); "dense" is our
attention over the whole cache (`hf.attend`, what full decode runs). Back-to-back calls, ms per call (host time
included: at batch 1 the host's launches are much of a step). Also checks the two paths against each other:
the same selections, max |out difference|.
"""

import argparse
import time

import torch

import moba_train.hf.decode as hf_decode
from moba_train.hf.attend import attend
from moba_train.hf.routing import score_blocks
from moba_train.ops.fused.decode import decode_gate
from moba_train.ops.gate import pick_blocks


def per_call_ms(fn, calls: int) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[131072, 1048576])
    p.add_argument("--moba", nargs="+", default=["4096:12", "1024:8"], help="block_size:top_k")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--calls", type=int, default=200)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_decode: needs a CUDA GPU")
    head = (f"{'cache':>8} {'moba':>8} {'torch ms':>9} {'fused ms':>9} {'dense ms':>9} {'same picks':>10} "
            f"{'max diff':>9}")
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | bf16, batch 1, {args.heads}/{args.kv_heads} "
          f"heads, head_dim {args.head_dim}, one layer\n{head}\n" + "-" * len(head), flush=True)
    scale = args.head_dim ** -0.5
    for length in args.lengths:
        gen = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(1, args.heads, 1, args.head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
        key, value = (torch.randn(1, args.kv_heads, length, args.head_dim, device="cuda", dtype=torch.bfloat16,
                                  generator=gen) for _ in range(2))
        dense = per_call_ms(lambda: attend(q, key, value, None, scale), args.calls)
        for spec in args.moba:
            block_size, top_k = (int(x) for x in spec.split(":"))
            state = hf_decode.LayerMeans([0], key, block_size)

            def step(fused: bool):
                hf_decode.DECODE_KERNEL = fused
                return hf_decode.gated_step(q, key, value, state, block_size, top_k, scale)

            try:
                diff = (step(False).float() - step(True).float()).abs().max().item()  # builds the means, too
                times = [per_call_ms(lambda: step(fused), args.calls) for fused in (False, True)]
            finally:
                hf_decode.DECODE_KERNEL = True
            own = (length - 1) // block_size
            picks = pick_blocks(score_blocks(q, state.means[:, :, :own]), torch.tensor(own, device="cuda"), top_k)
            fused_picks = decode_gate(q, state.means, state.starts_t, length, block_size, top_k, own)
            same = torch.equal(picks[:, :, 0].sort(-1).values, fused_picks.long().sort(-1).values)
            print(f"{length:>8} {spec:>8} {times[0]:>9.3f} {times[1]:>9.3f} {dense:>9.3f} {str(same):>10} "
                  f"{diff:>9.2e}", flush=True)


if __name__ == "__main__":
    main()
