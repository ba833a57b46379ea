"""Attention benchmark: MoBA backends (triton, varlen) against dense causal SDPA (cuDNN, flash).

Prints one markdown table per run: per shape and backend, forward and forward+backward ms, TFLOP/s counted
on the live (attended) query-key pairs, and peak memory; then the triton stage breakdown (gate, routing,
attention, backward). All backends run in one process on the same inputs.

    PYTHONPATH=. python scripts/bench_attention.py                # the issue-3 grid
    PYTHONPATH=. python scripts/bench_attention.py --shapes c:8K a:32K --backends triton varlen
"""

import argparse
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from moba_train.ops import moba_attn
from moba_train.ops.fused import bwd
from moba_train.ops.fused.autograd import pad, selection
from moba_train.ops.fused.fwd import forward
from moba_train.ops.fused.gate import select
from moba_train.ops.fused.layout import build_layout, query_tile
from moba_train.ops.fused.routing import build_routes
from moba_train.ops.fused.state import state_dtype
from moba_train.ops.fused.tiles import tiles

K = 1024
# name -> (tokens, block_size, top_k)
SHAPES = {
    "a:32K": (32 * K, 4096, 12), "a:128K": (128 * K, 4096, 12), "a:512K": (512 * K, 4096, 12),
    "a:1M": (1024 * K, 4096, 12),
    "b:128K": (128 * K, 128, 8), "b:512K": (512 * K, 128, 8),
    "c:8K": (8 * K, 512, 3), "c:32K": (32 * K, 512, 3), "c:128K": (128 * K, 512, 3),
    "d:128K": (128 * K, 2048, 3),
}
BACKENDS = ("triton", "varlen", "cudnn", "flash")


def dense(kind):
    backend = SDPBackend.CUDNN_ATTENTION if kind == "cudnn" else SDPBackend.FLASH_ATTENTION

    def fn(q, k, v, cu, max_len, block_size, top_k):
        with sdpa_kernel(backend):
            qd, kd, vd = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
            out = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True)
        return out.squeeze(0).transpose(0, 1)
    return fn


def moba(backend):
    def fn(q, k, v, cu, max_len, block_size, top_k):
        return moba_attn(q, k, v, cu, max_len, block_size, top_k, backend=backend)
    return fn


def live_pairs(q, k, cu, block_size, top_k):
    """Attended (query, key) pairs summed over query heads, from the fused selection."""
    layout, idx = selection(q, k, cu, block_size, top_k)
    tokens = q.shape[0]
    tok_blk = torch.repeat_interleave(torch.arange(layout.n_blocks, device=q.device), layout.blk_len.long(),
                                      output_size=tokens)
    first = tok_blk - layout.blk_local[tok_blk]
    own_part = torch.arange(tokens, device=q.device) - layout.blk_start[tok_blk] + 1  # causal own block
    past = idx[:, :, : top_k - 1].long()
    valid = (past >= 0) & (past < layout.blk_local[tok_blk][:, None, None])
    glob = torch.where(valid, first[:, None, None] + past, 0)
    lens = torch.where(valid, layout.blk_len[glob], 0)
    return int(own_part.sum()) * q.shape[1] + int(lens.sum())


def time_iters(fn, args, do, budget_s=2.0):
    """Median forward ms, forward+backward ms, and peak GiB allocated during a full-size step.

    The warm-up (compilation, handles) runs on a 16K-token prefix and then on one full-size step, whose time
    is kept only when it took over 20 s (dense attention at 1M tokens, which has nothing to compile).
    """
    def step(inputs, grad):
        leaves = [x.detach().requires_grad_() for x in inputs[:3]]
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        ev[0].record()
        out = fn(*leaves, *inputs[3:])
        ev[1].record()
        torch.autograd.grad(out, leaves, grad)
        ev[2].record()
        torch.cuda.synchronize()
        return ev[0].elapsed_time(ev[1]), ev[0].elapsed_time(ev[2])

    n = min(args[0].shape[0], 16 * K)
    cu = torch.tensor([0, n], device="cuda", dtype=torch.int32)
    step((*(x[:n] for x in args[:3]), cu, n, *args[5:]), do[:n])
    torch.cuda.reset_peak_memory_stats()
    first = step(args, do)  # a warm-up too: kernels specialised on this shape's integers compile here
    peak = torch.cuda.max_memory_allocated() / 2**30
    reps = max(1, min(10, int(budget_s * 1e3 / max(first[1], 1e-3))))
    times = [step(args, do) for _ in range(reps)] if first[1] < 20e3 else [first]
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times), peak


def cuda_ms(fn, reps=5):
    """(mean ms of `reps` calls after one warm-up call, the last call's result), timed with CUDA events."""
    fn()
    torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    ev[0].record()
    for _ in range(reps):
        res = fn()
    ev[1].record()
    torch.cuda.synchronize()
    return ev[0].elapsed_time(ev[1]) / reps, res


def stages(q, k, v, do, cu, block_size, top_k, scale):
    """Triton stage times (ms). Forward: layout tables (host), gate (block means + scores + top-k), routing, the
    own-block pass alone, and the rest of the forward (past-block passes with the running-state traffic).
    Backward: the per-row records (lse, delta), dK/dV, dQ's past slots, dQ's own block (adds the past sum)."""
    layout_ms, layout = cuda_ms(lambda: build_layout(cu, block_size, query_tile(block_size, False), q.device))
    gate_ms, idx = cuda_ms(lambda: select(q, k, layout, top_k))
    cfg = tiles(block_size, q.shape[-1], q.element_size())
    route_ms, routes = cuda_ms(lambda: build_routes(idx, layout, k.shape[1], cfg["past_rows"]))
    no_past = routes.own_only()
    own_ms, _ = cuda_ms(lambda: forward(q, k, v, layout, no_past, scale, False))
    attn_ms, (out, lse) = cuda_ms(lambda: forward(q, k, v, layout, routes, scale, False))
    rec_ms, record = cuda_ms(lambda: bwd.row_records(out, do, lse))
    sums = state_dtype(q.dtype)
    kv_ms, _ = cuda_ms(lambda: bwd.dkv(do, q, k, v, record, layout, routes, scale, "tf32", cfg))
    dq_past_ms, dq_sum = cuda_ms(lambda: bwd.dq_past(do, q, k, v, record, layout, routes, scale, "tf32", cfg, sums))
    dq_own_ms, _ = cuda_ms(lambda: bwd.dq_own(do, q, k, v, record, dq_sum, layout, routes, scale, "tf32", cfg, sums))
    return {"layout": layout_ms, "gate": gate_ms, "routing": route_ms, "own": own_ms, "past": attn_ms - own_ms,
            "records": rec_ms, "dkv": kv_ms, "dq_past": dq_past_ms, "dq_own": dq_own_ms}


STAGES = ("layout", "gate", "routing", "own", "past", "records", "dkv", "dq_past", "dq_own")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES))
    parser.add_argument("--backends", nargs="*", default=list(BACKENDS))
    parser.add_argument("--heads", type=int, nargs=2, default=(32, 8))
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--no-stages", action="store_true")
    args = parser.parse_args()
    hq, hkv = args.heads
    dim = args.dim
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, Hq={hq} Hkv={hkv} D={dim} bf16")
    rows, stage_rows = [], []
    for name in args.shapes:
        tokens, block_size, top_k = SHAPES[name]
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(tokens, h, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
                   for h in (hq, hkv, hkv))
        do = torch.randn_like(q)
        cu = torch.tensor([0, tokens], device="cuda", dtype=torch.int32)
        inputs = (q, k, v, cu, tokens, block_size, top_k)
        # the fused internals take the kernels' head size (other sizes zero-padded, as the op does)
        pairs = {"moba": live_pairs(pad(q), pad(k), cu, block_size, top_k), "dense": hq * tokens * (tokens + 1) // 2}
        for backend in args.backends:
            fn = moba(backend) if backend in ("triton", "varlen") else dense(backend)
            flops = 4 * dim * pairs["moba" if backend in ("triton", "varlen") else "dense"]
            try:
                fwd_ms, total_ms, mem = time_iters(fn, inputs, do)
                rows.append((name, block_size, top_k, backend, f"{fwd_ms:.2f}", f"{total_ms:.2f}",
                             f"{flops / fwd_ms / 1e9:.0f}", f"{3.5 * flops / total_ms / 1e9:.0f}", f"{mem:.2f}"))
            except torch.OutOfMemoryError:
                rows.append((name, block_size, top_k, backend, "OOM", "OOM", "-", "-", "-"))
            except RuntimeError as err:  # e.g. no kernel for this shape
                rows.append((name, block_size, top_k, backend, "n/a", "n/a", "-", "-", str(err)[:40]))
            torch.cuda.empty_cache()
            print(" | ".join(map(str, rows[-1])), flush=True)
        if "triton" in args.backends and not args.no_stages:
            st = stages(pad(q), pad(k), pad(v), pad(do), cu, block_size, top_k, dim ** -0.5)
            total = next((float(r[5]) for r in rows if r[0] == name and r[3] == "triton" and r[5] != "OOM"), None)
            share = f"{100 * st['gate'] / total:.1f}%" if total else "-"
            stage_rows.append((name, *(f"{st[s]:.2f}" for s in STAGES), share))
        del q, k, v, do
        torch.cuda.empty_cache()

    print("\n| shape | block | top_k | backend | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(map(str, r)) + " |")
    if stage_rows:
        print("\ntriton stages (ms)\n\n| shape | layout (host) | gate | routing | own block | past blocks + state "
              "| bwd records | dK/dV | dQ past | dQ own | gate / triton fwd+bwd |")
        print("|---" * 11 + "|")
        for r in stage_rows:
            print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
