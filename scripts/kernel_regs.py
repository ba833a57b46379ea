"""Registers, spills and shared memory of the fused kernels, compiled for Hopper (sm_90a) without a GPU.

Compiles each kernel at the tile configs `tiles()` picks and runs Triton's bundled ptxas on the result, so spills
and shared-memory overflows show up before any GPU time is spent. Match the GPU machine's Triton for the same
code generation (e.g. `pip install --target /tmp/t36 triton==3.6.0` and put /tmp/t36 first on PYTHONPATH).

    PYTHONPATH=. python scripts/kernel_regs.py --dtype bf16 --dim 128 --block-size 2048 [--sass DIR]
"""

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from moba_train.ops.fused import bwd, bwd_kv, bwd_q, fwd, gate
from moba_train.ops.fused.tiles import tiles

SMEM_LIMIT = 232448  # bytes of shared memory one H100 block may use
RECORD_FIELDS = {"L", "Scale", "Delta", "DQscale"}  # views of a per-row record at 4 or 8 bytes past 16-byte alignment


def report(kernel, types: dict, consts: dict, num_warps: int, num_stages: int,
           sass: str | None = None) -> tuple[int, int, int]:
    """-> (registers per thread, spill bytes, shared bytes) of one specialisation; `sass`: also write its SASS
    there (cuobjdump's listing, for counting a loop's instructions)."""
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        signature[name] = "constexpr" if name in consts else types[name]
        if signature[name].startswith("*") and name not in RECORD_FIELDS:
            attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(kernel, signature, consts, attrs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(compiled.asm["ptx"])
        done = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", src, "-o", os.path.join(tmp, "k.o")],
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"error: ptxas of triton {triton.__version__} failed: {done.stderr.strip()[:300]} (run "
                             "it with the GPU machine's Triton, e.g. triton==3.6.0 installed with pip --target "
                             "/tmp/t36, /tmp/t36 first on PYTHONPATH)")
        if sass:
            listing = subprocess.run([os.path.join(os.path.dirname(ptxas), "cuobjdump"), "-sass",
                                      os.path.join(tmp, "k.o")], capture_output=True, text=True, check=True)
            with open(sass, "w") as f:
                f.write(listing.stdout)
    log = done.stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", log).group(1))
    return regs, spills, compiled.metadata.shared


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=2048)
    parser.add_argument("--heads", type=int, nargs=2, default=(32, 8))
    parser.add_argument("--sass", metavar="DIR", help="also write each kernel's SASS listing into DIR")
    args = parser.parse_args()
    if args.sass:
        os.makedirs(args.sass, exist_ok=True)
    hq, hkv = args.heads
    elem = {"bf16": 2, "fp16": 2, "fp32": 4}[args.dtype]
    prec = "ieee" if elem == 4 else "tf32"
    cfg = tiles(args.block_size, args.dim, elem)
    types = {n: f"*{args.dtype}" for n in ("Q", "K", "V", "DO", "DK", "DV", "Out", "DQ")}
    types.update({n: "*fp32" for n in ("Lse", "Delta", "RLse", "RDelta", "M", "L", "Means", "Scale", "DQscale")})
    scaled = elem == 2  # 16-bit inputs keep the per-row sums in fp16 with a row scale (ops/fused/state.py)
    types.update({n: "*fp16" if scaled else "*fp32" for n in ("Acc", "DQsum")})
    types.update({n: "*i32" for n in ("Rows", "SegStart", "Chunks", "BlkStart", "BlkLen", "Tiles", "QTiles",
                                      "BlkLocal")})
    types.update(scale="fp32", scale_log2="fp32", NB="i32", N_SLOTS="i32", tile0="i32")
    heads = dict(HQ=hq, HKV=hkv, D=args.dim, PREC=prec)

    def with_desc(launch):  # K and V reach these kernels as TMA descriptors of one chunk
        return {**types, "Kd": f"tensordesc<{args.dtype}[{launch['BLOCK_N']}, {args.dim}]>",
                "Vd": f"tensordesc<{args.dtype}[{launch['BLOCK_N']}, {args.dim}]>"}

    tile_m = 128
    past = {"D": args.dim, "PREC": prec, "FIRST": False, "SCALED": scaled}
    state, records = {"REC": fwd.STATE_REC}, {"REC": bwd.ROW_REC}
    dq_past = ((bwd_q.dq_past_block_kernel, {**past, **records}) if cfg["whole_block"] else
               (bwd_q.dq_past_kernel, {**past, **records, "BLOCK_M": cfg["past_rows"]}))
    fwd_past = ((fwd._past_block_kernel, {**past, **state}) if cfg["whole_block"] else
                (fwd._past_kernel, {**past, **state, "BLOCK_M": cfg["past_rows"]}))
    cases = [
        ("forward past", *fwd_past, cfg["past"]),
        ("forward own", fwd._own_kernel, {**heads, **state, "BLOCK_M": tile_m, "HAS_PAST": True, "SCALED": scaled},
         cfg["own"]),
        ("dK/dV", bwd_kv.kv_kernel, {**heads, **records, "ROUTED": bwd.uses_routed_records(args.block_size, cfg)},
         cfg["kv"]),
        ("dQ past", *dq_past, cfg["dq_past"]),
        ("dQ own", bwd_q.dq_own_kernel, {**heads, **records, "BLOCK_M": tile_m, "HAS_PAST": True, "SCALED": scaled},
         cfg["dq_own"]),
    ]
    print(f"sm_90a, triton {triton.__version__}, {args.dtype}, D={args.dim}, block {args.block_size}, "
          f"Hq={hq} Hkv={hkv}")
    print("| kernel | config | registers | spill bytes | shared KiB | fits |\n|---|---|---|---|---|---|")
    for name, kernel, consts, launch in cases:
        launch = dict(launch)
        warps, stages = launch.pop("num_warps"), launch.pop("num_stages")
        sass = os.path.join(args.sass, name.replace(" ", "_").replace("/", "") + ".sass") if args.sass else None
        regs, spills, shared = report(kernel, with_desc(launch), {**consts, **launch}, warps, stages, sass)
        print(f"| {name} | {launch} w{warps} s{stages} | {regs} | {spills} | {shared / 1024:.0f} | "
              f"{'yes' if shared <= SMEM_LIMIT else 'NO'} |")
    if elem == 2:  # 16-bit queries read the means as bf16 parts (fp16 queries in two bf16 parts themselves)
        gate_types = {**types, "Out": "*i32", "Means": "*bf16", "part_stride": "i32"}  # Means: the bf16 parts
        for blocks, merge in ((128, "rounds"), (129, "lanes")):  # gate_config's two choices at top_k 3
            launch = gate.gate_config(3, blocks, args.dim)
            warps = launch.pop("num_warps")
            consts = dict(HQ=hq, HKV=hkv, D=args.dim, TOPK=3, KP=4, BLOCK_M=tile_m,
                          Q_PARTS=2 if args.dtype == "fp16" else 1, **launch)
            regs, spills, shared = report(gate._gate_kernel, gate_types, consts, warps, 3,
                                          os.path.join(args.sass, f"gate_{merge}.sass") if args.sass else None)
            print(f"| gate (top_k 3, {merge}) | BLOCK_B {launch['BLOCK_B']} w{warps} | {regs} | {spills} | "
                  f"{shared / 1024:.0f} | {'yes' if shared <= SMEM_LIMIT else 'NO'} |")

if __name__ == "__main__":
    main()
