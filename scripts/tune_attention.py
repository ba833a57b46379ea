"""Tuning experiments for the fused kernels: gate variants and exactness, backward kernels one by one."""

import sys

import torch

from moba_train.ops.fused import bwd, bwd_kv, bwd_q, fwd, gate
from moba_train.ops.fused.autograd import selection
from moba_train.ops.fused.means import block_means
from moba_train.ops.fused.routing import build_routes
from moba_train.ops.gate import moba_select as reference_select

sys.path.insert(0, "scripts")
from bench_attention import SHAPES  # noqa: E402

LOG2E = 1.4426950408889634


def ms(fn, reps=5):
    fn()
    torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    ev[0].record()
    for _ in range(reps):
        fn()
    ev[1].record()
    torch.cuda.synchronize()
    return ev[0].elapsed_time(ev[1]) / reps


def compiled(fn):
    return [f"regs={k.n_regs} spills={k.n_spills} smem={k.metadata.shared}"
            for cache in fn.device_caches.values() for k in cache[0].values()]


GATE = [{"BLOCK_B": 32, "num_warps": 4}, {"BLOCK_B": 16, "num_warps": 4}]
KV = [{"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
      {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
      {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
      {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
      {"BLOCK_M": 32, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2}]
DQ = [{"BLOCK_N": 32, "num_warps": 4, "num_stages": 3}, {"BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
      {"BLOCK_N": 64, "num_warps": 8, "num_stages": 2}, {"BLOCK_N": 32, "num_warps": 8, "num_stages": 3}]
FWD = [{"BLOCK_N": 64, "num_warps": 8, "num_stages": 3}, {"BLOCK_N": 32, "num_warps": 4, "num_stages": 3},
       {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}, {"BLOCK_N": 32, "num_warps": 8, "num_stages": 3},
       {"BLOCK_N": 128, "num_warps": 8, "num_stages": 2}]

for name in sys.argv[1:]:
    tokens, block_size, top_k = SHAPES[name]
    hq, hkv, dim = 32, 8, 128
    q, k, v = (torch.randn(tokens, h, dim, device="cuda", dtype=torch.bfloat16) for h in (hq, hkv, hkv))
    do = torch.randn_like(q)
    cu = torch.tensor([0, tokens], device="cuda", dtype=torch.int32)
    scale = dim ** -0.5
    layout, idx = selection(q, k, cu, block_size, top_k)
    means = block_means(k, layout)
    ieee = gate.select(q.float(), means, layout, top_k)
    print(name, "gate ieee (fp32 q)", f"{ms(lambda: gate.select(q.float(), means, layout, top_k)):.2f} ms")
    if tokens <= 128 * 1024 and block_size < 4096:
        ref = reference_select(q, k, cu, tokens, block_size, top_k)
        print(name, "rows differing: ieee vs torch", int((ieee != ref).any(-1).sum()), "split vs torch",
              int((idx != ref).any(-1).sum()), "of", ref.shape[0] * ref.shape[1])
        del ref
    for cfg in GATE:
        t = ms(lambda: gate.select(q, means, layout, top_k, cfg))
        print(name, "gate split", cfg, f"{t:.2f} ms")
    routes = build_routes(idx, layout, hkv, 128)
    out, lse = fwd.forward(q, k, v, layout, routes, scale, False)
    delta = torch.empty(tokens, hq, device="cuda", dtype=torch.float32)
    bwd._delta_kernel[((tokens * hq + 63) // 64,)](out, do, delta, tokens * hq, D=dim, BLOCK=64)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    for cfg in KV:
        chunks = layout.key_chunks(cfg["BLOCK_N"])
        t = ms(lambda: bwd_kv.kv_kernel[(chunks.shape[0], hkv)](
            q, k, v, do, lse, delta, dk, dv, routes.rows, routes.seg_start, chunks, layout.blk_start,
            layout.blk_len, scale, layout.n_blocks, max(routes.n_slots, 1), HQ=hq, HKV=hkv, D=dim, PREC="tf32",
            **cfg))
        print(name, "bwd kv", cfg, f"{t:.2f} ms")
    dq_acc = torch.zeros(tokens, hq, dim, device="cuda", dtype=torch.float32)
    dq = torch.empty_like(q)
    for cfg in DQ:
        t1 = ms(lambda: bwd_q.dq_past_kernel[(routes.tiles.shape[0],)](
            q, k, v, do, lse, delta, dq_acc, routes.rows, routes.tiles, layout.blk_start, layout.blk_len,
            scale * LOG2E, layout.n_blocks, HKV=hkv, D=dim, PREC="tf32", BLOCK_M=128, **cfg))
        t2 = ms(lambda: bwd_q.dq_own_kernel[(layout.q_tiles.shape[0], hq)](
            q, k, v, do, lse, delta, dq_acc, dq, layout.q_tiles, layout.blk_start, layout.blk_len, scale, HQ=hq,
            HKV=hkv, D=dim, HAS_PAST=True, PREC="tf32", BLOCK_M=layout.tile_m, **cfg))
        print(name, "bwd dq past / own", cfg, f"{t1:.2f} / {t2:.2f} ms")
    for cfg in FWD:
        print(name, "fwd", cfg, f"{ms(lambda: fwd.forward(q, k, v, layout, routes, scale, False, cfg)):.2f} ms")
    print(name, "bwd total", f"{ms(lambda: bwd.backward(do, q, k, v, out, lse, layout, routes, scale, False)):.2f} ms")
    del q, k, v, do, out, lse, dq_acc, dq, routes
    torch.cuda.empty_cache()
for fn in (gate._gate_kernel, bwd_kv.kv_kernel, bwd_q.dq_past_kernel, bwd_q.dq_own_kernel, fwd._past_kernel):
    print(fn.fn.__name__, compiled(fn))
