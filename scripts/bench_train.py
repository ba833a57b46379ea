"""Training throughput with context parallelism: tokens/s per GPU, peak memory, share of step time in CP comm.

Runs under torchrun on N GPUs and measures full training steps (forward, backward, clip, AdamW) of a ~1B
Llama (configs/model/llama_1b.yaml shape, MoBA in every layer, FSDP2 bf16/fp32, activation checkpointing) at
two layouts over the same N GPUs:
  - cp=1 at --seq-cp1 tokens per sequence (each GPU its own sequence, FSDP over N);
  - cp=N at --seq-cp tokens (one sequence split over the N GPUs, FSDP over N).
Scaling efficiency = (tokens/s per GPU with cp=N) / (tokens/s per GPU with cp=1): 100% means splitting an
N-times longer sequence costs nothing beyond the single-GPU work per token.

CP communication time is the time the compute stream waits on the CP collectives (CUDA events around each
all-gather / reduce-scatter / all-to-all, see moba_train/parallel/comm.py), summed over the step.

    torchrun --standalone --nproc_per_node=2 scripts/bench_train.py --out $OUT/bench_train.json
    torchrun --standalone --nproc_per_node=2 scripts/bench_train.py --small   # a quick smoke run
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moba_train.config import Config  # noqa: E402
from moba_train.model import Llama  # noqa: E402
from moba_train.model.config import AttentionConfig, ModelConfig  # noqa: E402
from moba_train.parallel import clip_grad_norm, init_parallel, parallelize, shard_micro_batch  # noqa: E402
from moba_train.parallel.comm import TIMER  # noqa: E402
from moba_train.parallel.config import ParallelConfig  # noqa: E402

LLAMA_1B = dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, ffn_dim=8192,
                norm_eps=1e-5, rope_theta=500000.0, tie_embeddings=True)
SMALL = dict(vocab_size=4096, dim=512, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=64, ffn_dim=1536,
             tie_embeddings=True)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-cp1", type=int, default=131072, help="sequence length of the cp=1 layout")
    p.add_argument("--seq-cp", type=int, default=262144, help="sequence length of the cp=N layout")
    p.add_argument("--cp-mode", default="ulysses", choices=("ulysses", "allgather"))
    p.add_argument("--kind", default="moba", choices=("moba", "full"))
    p.add_argument("--block-size", type=int, default=4096)
    p.add_argument("--top-k", type=int, default=12)
    p.add_argument("--backend", default="auto")
    p.add_argument("--ac", default="full", choices=("none", "full", "selective"))
    p.add_argument("--compile", action="store_true", help="torch.compile each block's norms and MLP (train.compile)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--small", action="store_true", help="a small model at 16K/32K: smoke test")
    p.add_argument("--out", default=None, help="write the results as JSON here (rank 0)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: gloo smoke run of this script")
    return p.parse_args()


def log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(args, model_cfg: ModelConfig, cp: int, seq: int, device: torch.device) -> dict:
    world = dist.get_world_size()
    dims = init_parallel(ParallelConfig(cp=cp, cp_mode=args.cp_mode), device)
    cfg = Config()
    cfg.train.activation_checkpointing = args.ac
    cfg.train.compile = args.compile
    attn = AttentionConfig(kind=args.kind, block_size=args.block_size, top_k=args.top_k, backend=args.backend)
    torch.manual_seed(0)
    with torch.device(device):
        model = Llama(model_cfg, attn)
    model = parallelize(model, cfg, dims)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(dims.dp_rank)
    batch = {"input_ids": torch.randint(0, model_cfg.vocab_size, (1, seq), device=device, generator=gen)}
    batch["labels"] = torch.roll(batch["input_ids"], -1, 1)
    local = shard_micro_batch(batch, dims)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, comm = [], []
    for step in range(args.warmup + args.steps):
        TIMER.reset()
        TIMER.enabled = step >= args.warmup
        dist.barrier()
        sync(device)
        tick = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, n = model(local["input_ids"], local.get("positions"), local.get("cu_seqlens"),
                            labels=local["labels"])
        total = n.float()
        dist.all_reduce(total)
        (loss * dims.grad_scale / total).backward()
        clip_grad_norm(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        elapsed = time.perf_counter() - tick
        if step >= args.warmup:
            times.append(elapsed)
            comm.append(TIMER.seconds() if cp > 1 and device.type == "cuda" else 0.0)
        log(f"  cp={cp} seq={seq} step {step}: {elapsed:.2f}s" + (" (warmup)" if step < args.warmup else ""))
    TIMER.enabled = False
    step_s = sum(times) / len(times)
    comm_s = sum(comm) / len(comm)
    peak = torch.tensor(torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0,
                        device=device)
    stats = torch.tensor([step_s, comm_s], device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    step_s, comm_s = stats.tolist()
    tokens_per_step = seq * dims.dp  # all GPUs together
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"cp": cp, "cp_mode": args.cp_mode if cp > 1 else None, "seq_len": seq, "gpus": world,
            "step_s": step_s, "tokens_per_s_per_gpu": tokens_per_step / step_s / world,
            "peak_mem_gib": float(peak), "cp_comm_s": comm_s, "cp_comm_share": comm_s / step_s}


def main() -> None:
    args = parse()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    world = dist.get_world_size()
    shape = SMALL if args.small else LLAMA_1B
    if args.small and (args.seq_cp1, args.seq_cp) == (131072, 262144):  # default lengths -> 16K (CPU: 2K) x 1, N
        base = 2048 if device.type == "cpu" else 16384
        args.seq_cp1, args.seq_cp = base, base * world
        args.block_size = min(args.block_size, base // 8)
    model_cfg = ModelConfig(**shape, max_seq_len=max(args.seq_cp1, args.seq_cp))
    with torch.device("meta"):
        n_params = sum(p.numel() for p in Llama(model_cfg, AttentionConfig()).parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    log(f"bench_train: {name} x {world}, torch {torch.__version__}, "
        f"model {n_params / 1e9:.2f}B params, {args.kind} block {args.block_size} top_k {args.top_k} "
        f"backend {args.backend}, AC {args.ac}, compile {args.compile}, CP mode {args.cp_mode}")
    results = [bench(args, model_cfg, 1, args.seq_cp1, device), bench(args, model_cfg, world, args.seq_cp, device)]
    base, split = results
    efficiency = split["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"]
    log("")
    log("| layout | seq len | step (s) | tokens/s per GPU | peak mem/GPU (GiB) | CP comm (s) | CP comm share |")
    log("|---|---|---|---|---|---|---|")
    for r in results:
        layout = f"cp={r['cp']}" + (f" ({r['cp_mode']})" if r["cp_mode"] else "") + f", {r['gpus']} GPUs"
        log(f"| {layout} | {r['seq_len']} | {r['step_s']:.2f} | {r['tokens_per_s_per_gpu']:.0f} | "
            f"{r['peak_mem_gib']:.1f} | {r['cp_comm_s']:.3f} | {100 * r['cp_comm_share']:.1f}% |")
    log(f"scaling efficiency (cp={world} at {args.seq_cp} vs cp=1 at {args.seq_cp1}, tokens/s per GPU): "
        f"{100 * efficiency:.1f}%")
    if args.out and dist.get_rank() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"device": name, "torch": torch.__version__,
                       "params": n_params, "args": vars(args), "results": results, "efficiency": efficiency},
                      f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
