"""Tile sweeps for the fused MoBA kernels, one stage at a time, on the bench shapes (GPU).

    PYTHONPATH=. python scripts/tune_attention.py --shapes d:128K c:128K a:128K --routing a:512K a:1M
    PYTHONPATH=. python scripts/tune_attention.py --dim 64 --shapes d:128K c:128K

Per shape it times every candidate config of the gate, the forward (past and own-block passes), dK/dV and the
two dQ passes, checks each candidate's result against the default config's (max abs difference), and prints
the compiled register and spill counts (a candidate that fails to compile, e.g. over the shared memory, is
reported and skipped). `--routing` times the routing alone at large shapes.
"""

import argparse
import sys

import torch

from moba_train.ops.fused import bwd, bwd_kv, bwd_q, fwd, gate
from moba_train.ops.fused.autograd import selection
from moba_train.ops.fused.routing import build_routes
from moba_train.ops.fused.tiles import tiles

sys.path.insert(0, "scripts")
from bench_attention import SHAPES, cuda_ms  # noqa: E402

LOG2E = 1.4426950408889634
HQ, HKV, DIM = 32, 8, 128

GATE = [{"BLOCK_B": 32, "num_warps": 4}, {"BLOCK_B": 16, "num_warps": 4}, {"BLOCK_B": 64, "num_warps": 4},
        {"BLOCK_B": 64, "num_warps": 8}]  # the round-by-round top-k (DEPTH 0)
LANES = [{"BLOCK_B": 32, "num_warps": 8}, {"BLOCK_B": 16, "num_warps": 4}, {"BLOCK_B": 16, "num_warps": 8}]  # top_k <= 3
PAST = [{"BLOCK_N": 128, "num_warps": 8, "num_stages": 3}, {"BLOCK_N": 64, "num_warps": 8, "num_stages": 4},
        {"BLOCK_N": 128, "num_warps": 8, "num_stages": 2}, {"BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
        {"BLOCK_N": 128, "num_warps": 4, "num_stages": 3}]
OWN = [{"BLOCK_N": 64, "num_warps": 8, "num_stages": 3}, {"BLOCK_N": 64, "num_warps": 8, "num_stages": 4},
       {"BLOCK_N": 128, "num_warps": 8, "num_stages": 3}, {"BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
       {"BLOCK_N": 32, "num_warps": 4, "num_stages": 3}, {"BLOCK_N": 128, "num_warps": 4, "num_stages": 3}]
KV = [{"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3},
      {"BLOCK_M": 32, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2},
      {"BLOCK_M": 32, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
      {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
      {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
      {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 8, "num_stages": 4},
      {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
      {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
      {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}]
DQ = [{"BLOCK_N": 32, "num_warps": 4, "num_stages": 3}, {"BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
      {"BLOCK_N": 64, "num_warps": 8, "num_stages": 4}, {"BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
      {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}, {"BLOCK_N": 128, "num_warps": 8, "num_stages": 3}]


def ms(fn, reps=5):
    return cuda_ms(fn, reps)[0]


def compiled(kernel):
    """Registers, spills and shared memory of each specialisation that loaded (one that did not fit the shared
    memory stays in the cache without them)."""
    return [f"regs={k.n_regs} spills={k.n_spills} smem={k.metadata.shared}"
            for cache in kernel.device_caches.values() for k in cache[0].values() if hasattr(k, "n_regs")]


def diff(a, b):
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b))


def attempt(name, stage, cfg, run):
    """Time one candidate; a config that fails to compile or launch is reported and skipped."""
    try:
        run()
    except Exception as err:  # noqa: BLE001 (triton raises several types for resources it cannot fit)
        print(name, stage, cfg, "FAILED:", str(err).splitlines()[0][:100], flush=True)


def tune(name):
    tokens, block_size, top_k = SHAPES[name]
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(tokens, h, DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
                   for h in (HQ, HKV, HKV, HQ))
    cu = torch.tensor([0, tokens], device="cuda", dtype=torch.int32)
    scale = DIM ** -0.5
    layout, idx = selection(q, k, cu, block_size, top_k)
    lanes = [{**cfg, "DEPTH": top_k - 1} for cfg in LANES] if top_k <= 3 else []
    for cfg in [{**cfg, "DEPTH": 0} for cfg in GATE] + lanes:
        same = torch.equal(gate.select(q, k, layout, top_k, cfg), idx)
        print(name, "gate", cfg, f"{ms(lambda: gate.select(q, k, layout, top_k, cfg)):.2f} ms", "same" if same
              else "DIFFERENT", flush=True)
    default = tiles(block_size, DIM, 2)
    rows = default["past_rows"]
    print(name, "routing", f"{ms(lambda: build_routes(idx, layout, HKV, rows)):.2f} ms", flush=True)
    if default["whole_block"]:
        whole_block(name, q, k, v, do, layout, idx, scale, default)
    # the sweeps below: tiled past passes, one tile of 128 rows per program
    tiled = {**default, "whole_block": False, "past_rows": 128}
    routes = build_routes(idx, layout, HKV, 128)
    ref = fwd.forward(q, k, v, layout, routes, scale, False, {**tiled, "past": PAST[0]})
    no_past = routes.own_only()
    for cfg in OWN:
        def run_own(cfg=cfg):
            both = {**tiled, "past": PAST[0], "own": cfg}
            own_ms = ms(lambda: fwd.forward(q, k, v, layout, no_past, scale, False, both))
            err = diff(fwd.forward(q, k, v, layout, routes, scale, False, both), ref)
            print(name, "fwd own", cfg, f"{own_ms:.2f} ms", f"diff {err:.1e}", flush=True)
        attempt(name, "fwd own", cfg, run_own)
    for cfg in PAST:
        def run_past(cfg=cfg):
            both = {**tiled, "past": cfg}
            err = diff(fwd.forward(q, k, v, layout, routes, scale, False, both), ref)
            t = ms(lambda: fwd.forward(q, k, v, layout, routes, scale, False, both))
            print(name, "fwd own+past", cfg, f"{t:.2f} ms", f"diff {err:.1e}", flush=True)
        attempt(name, "fwd own+past", cfg, run_past)
    out, lse = ref
    record = bwd.row_records(out, do, lse)
    base = []
    for cfg in KV:
        def run_kv(cfg=cfg):
            t, grads = cuda_ms(lambda: bwd.dkv(do, q, k, v, record, layout, routes, scale, "tf32", {**tiled, "kv": cfg}))
            base[:] = base or grads
            print(name, "bwd kv", cfg, f"{t:.2f} ms", f"diff {diff(grads, base):.1e}", flush=True)
        attempt(name, "bwd kv", cfg, run_kv)
    for cfg in DQ:
        def run_dq(cfg=cfg):
            both = {**tiled, "dq_past": cfg, "dq_own": cfg}
            t1, dq_sum = cuda_ms(lambda: bwd.dq_past(do, q, k, v, record, layout, routes, scale, "tf32", both,
                                                     torch.float16))
            t2 = ms(lambda: bwd.dq_own(do, q, k, v, record, dq_sum, layout, routes, scale, "tf32", both,
                                       torch.float16))
            print(name, "bwd dq past / own", cfg, f"{t1:.2f} / {t2:.2f} ms", flush=True)
        attempt(name, "bwd dq", cfg, run_dq)
    routes = build_routes(idx, layout, HKV, rows)
    t = ms(lambda: bwd.backward(do, q, k, v, out, lse, layout, routes, scale, False))
    print(name, "bwd total (defaults)", f"{t:.2f} ms")


# blocks <= 128: whole-block past passes, (rows per entry, forward launch, dQ launch), against the ninth
# session's tiled passes (64-row tiles, one per program) on the same inputs
TILED_FINE = (64, {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}, {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2})
WHOLE = [(512, {"BLOCK_M": 64, "num_warps": 4, "num_stages": 3}, {"BLOCK_M": 64, "num_warps": 4, "num_stages": 1}),
         (256, {"BLOCK_M": 64, "num_warps": 4, "num_stages": 3}, {"BLOCK_M": 64, "num_warps": 4, "num_stages": 1}),
         (1024, {"BLOCK_M": 64, "num_warps": 4, "num_stages": 3}, {"BLOCK_M": 64, "num_warps": 4, "num_stages": 1}),
         (512, {"BLOCK_M": 64, "num_warps": 4, "num_stages": 1}, {"BLOCK_M": 128, "num_warps": 8, "num_stages": 1})]


def whole_block(name, q, k, v, do, layout, idx, scale, default):
    rows, past, dq = TILED_FINE
    runs = [("tiled", rows, {**default, "whole_block": False, "past": past, "dq_past": dq})]
    for rows, past, dq in WHOLE:
        runs.append(("whole", rows, {**default, "past": {**default["past"], **past},
                                     "dq_past": {**default["dq_past"], **dq}}))
    ref = None
    for kind, rows, cfg in runs:
        routes = build_routes(idx, layout, HKV, rows)
        t_fwd, (out, lse) = cuda_ms(lambda: fwd.forward(q, k, v, layout, routes, scale, False, cfg))
        record = bwd.row_records(out, do, lse)
        t_dq, dq_sum = cuda_ms(lambda: bwd.dq_past(do, q, k, v, record, layout, routes, scale, "tf32", cfg,
                                                  torch.float16))
        past_rows = routes.rows[:routes.seg_start[-1]].long()  # (token, head) rows with a past block, t * Hq + h
        dq = (dq_sum.float() * record[..., 2:3]).view(-1, DIM)[past_rows]
        ref = ref or (out, lse, dq)
        print(name, f"{kind} rows={rows}", cfg["past"], cfg["dq_past"], f"fwd own+past {t_fwd:.2f} ms,",
              f"dq past {t_dq:.2f} ms, diff out {diff([out], ref[:1]):.1e} lse {diff([lse], ref[1:2]):.1e}",
              f"dq {diff([dq], ref[2:]):.1e}", flush=True)


def routing_only(name):
    tokens, block_size, top_k = SHAPES[name]
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k = (torch.randn(tokens, h, DIM, device="cuda", dtype=torch.bfloat16, generator=gen) for h in (HQ, HKV))
    cu = torch.tensor([0, tokens], device="cuda", dtype=torch.int32)
    layout, idx = selection(q, k, cu, block_size, top_k)
    del q, k
    rows = tiles(block_size, DIM, 2)["past_rows"]
    print(name, "routing", f"{ms(lambda: build_routes(idx, layout, HKV, rows), reps=3):.1f} ms", flush=True)


def main():
    global DIM
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="*", default=["d:128K", "c:128K", "a:128K"])
    parser.add_argument("--routing", nargs="*", default=[])
    parser.add_argument("--dim", type=int, default=DIM)
    args = parser.parse_args()
    DIM = args.dim
    print(torch.cuda.get_device_name())
    for name in args.routing:
        routing_only(name)
        torch.cuda.empty_cache()
    for name in args.shapes:
        tune(name)
        torch.cuda.empty_cache()
    for kernel in (gate._gate_kernel, fwd._past_kernel, fwd._past_block_kernel, fwd._own_kernel, bwd_kv.kv_kernel,
                   bwd_q.dq_past_kernel, bwd_q.dq_past_block_kernel, bwd_q.dq_own_kernel):
        print(kernel.fn.__name__, compiled(kernel))


if __name__ == "__main__":
    main()
