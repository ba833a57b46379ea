"""Worker for the multi-process equivalence tests (tests/test_parallel.py): gloo on the CPU, or NCCL on GPUs.

One spawn runs many cases over one process group: every case builds its own DeviceMesh via init_parallel,
a plain model and a parallelized copy (CP + FSDP2), and checks loss and gradients against the plain model run
on the whole global batch in this same process. Run directly (torchrun) for the GPU bf16 check:

    torchrun --nproc_per_node=2 tests/dist_cp.py --device cuda --dtype bfloat16
"""

import argparse
import copy
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moba_train.config import Config  # noqa: E402
from moba_train.model import Llama  # noqa: E402
from moba_train.model.config import AttentionConfig, ModelConfig  # noqa: E402
from moba_train.parallel import init_parallel, parallelize, shard_micro_batch  # noqa: E402
from moba_train.parallel.config import ParallelConfig  # noqa: E402
from moba_train.parallel.fsdp import clip_grad_norm  # noqa: E402

# documents per row (sum = seq_len): boundaries fall inside shards and across shard boundaries
DOCS = {48: [5, 20, 1, 22], 64: [3, 30, 31], 4096: [1000, 2500, 596]}


def make_batch(rows: int, seq: int, vocab: int, device, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (rows, seq), generator=gen)
    labels = torch.randint(0, vocab, (rows, seq), generator=gen)
    labels[:, ::7] = -100  # some unmasked-out tokens
    lengths = torch.tensor(DOCS[seq] * rows)
    cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
    return {"input_ids": input_ids.to(device), "labels": labels.to(device), "cu_seqlens": cu.to(device)}


def rows_of(batch: dict, first: int, count: int, seq: int) -> dict:
    """Rows [first, first + count) of a batch, cu_seqlens re-based (documents never cross rows)."""
    cu = batch["cu_seqlens"]
    lo, hi = first * seq, (first + count) * seq
    keep = cu[(cu >= lo) & (cu <= hi)] - lo
    return {"input_ids": batch["input_ids"][first:first + count], "labels": batch["labels"][first:first + count],
            "cu_seqlens": keep.to(torch.int32)}


def build(kinds: list[str], device, backend: str, block_size: int, top_k: int, dim: int, seed: int = 0) -> Llama:
    mcfg = ModelConfig(vocab_size=64, dim=dim, n_layers=len(kinds), n_heads=8, n_kv_heads=4, ffn_dim=2 * dim,
                       max_seq_len=8192)
    acfg = AttentionConfig(block_size=block_size, top_k=top_k, backend=backend, layers=list(kinds))
    torch.manual_seed(seed)
    with torch.device(device):
        return Llama(mcfg, acfg)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def single(model: Llama, batch: dict, dtype, naive: bool = False):
    """Loss, gradients and gradient norm of one process on the whole batch."""
    ref = copy.deepcopy(model).to(dtype)
    if naive:  # the exact reference: dense masked MoBA
        for module in ref.modules():
            if hasattr(module, "backend"):
                module.backend = "naive"
    loss_sum, n = ref(batch["input_ids"], cu_seqlens=batch["cu_seqlens"], labels=batch["labels"])
    loss = loss_sum / n
    loss.backward()
    grads = {name: p.grad for name, p in ref.named_parameters()}
    return loss.detach().float(), grads, torch.nn.utils.get_total_norm(list(grads.values()))


def parallel(model: Llama, batch: dict, dtype, dp: int, cp: int, mode: str, seq: int, ac: str, replicate: int = 1):
    """The same through init_parallel + parallelize (CP + FSDP2) + shard_micro_batch, as the trainer does."""
    cfg = Config()
    cfg.train.activation_checkpointing = ac
    pcfg = ParallelConfig(dp_shard=dp // replicate, dp_replicate=replicate, cp=cp, cp_mode=mode)
    dims = init_parallel(pcfg, batch["input_ids"].device)
    par = parallelize(copy.deepcopy(model).to(dtype), cfg, dims)
    local = shard_micro_batch(rows_of(batch, dims.dp_rank, 1, seq), dims)
    loss_sum, n = par(local["input_ids"], local.get("positions"), local["cu_seqlens"], labels=local["labels"])
    total = n.float()
    dist.all_reduce(total)
    (loss_sum * dims.grad_scale / total).backward()
    loss = loss_sum.detach().float()
    dist.all_reduce(loss)
    grads = {name: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
             for name, p in par.named_parameters()}
    norm = clip_grad_norm(par.parameters(), 1e30)
    return loss / total, grads, norm


def compare(got, want) -> dict:
    return {"loss": rel(got[0], want[0]), "grad": max(rel(got[1][k], want[1][k]) for k in want[1]),
            "grad_norm": rel(got[2], want[2])}


def run_case(dp: int, cp: int, mode: str, kinds: list[str], device, dtype, seq: int, backend: str,
             block_size: int, top_k: int, dim: int, ac: str = "none", replicate: int = 1) -> tuple[dict, dict]:
    """Relative errors of dp x cp against one process on the same global batch, and the allowed ones.

    fp32: against one process in fp32. Lower precision: both the one-process and the dp x cp run in `dtype`
    are compared with an exact fp32 reference; dp x cp may err at most 3x (+1e-3) what one process errs
    (bf16 gate near-ties flip a few selections differently in each run).
    """
    model = build(kinds, device, backend, block_size, top_k, dim)
    batch = make_batch(dp, seq, model.cfg.vocab_size, device)
    got = parallel(model, batch, dtype, dp, cp, mode, seq, ac, replicate)
    if dtype == torch.float32:
        return compare(got, single(model, batch, dtype)), {}
    exact = single(model, batch, torch.float32, naive=True)
    base = compare(single(model, batch, dtype), exact)
    return compare(got, exact), {k: 3 * v + 1e-3 for k, v in base.items()}


def run_cases(cases: list[dict], device, dtype, tol: float) -> list[str]:
    failures = []
    for case in cases:
        errors, allowed = run_case(device=device, dtype=dtype, **case)
        allowed = allowed or {k: tol for k in errors}
        line = f"{case} -> " + ", ".join(f"{k} rel err {v:.2e} (allowed {allowed[k]:.2e})"
                                         for k, v in errors.items())
        if dist.get_rank() == 0:
            print(line, flush=True)
        if any(v > allowed[k] for k, v in errors.items()):
            failures.append(line)
    return failures


def spawn_main(rank: int, world: int, port: int, cases: list[dict], tol: float) -> None:
    """Entry of torch.multiprocessing.spawn (CPU, gloo)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        failures = run_cases(cases, torch.device("cpu"), torch.float32, tol)
        if failures:
            raise AssertionError("CP/FSDP result differs from one process:\n" + "\n".join(failures))
    finally:
        dist.destroy_process_group()


def main() -> None:
    """torchrun entry: the same equivalence on GPUs (bf16 by default) at a longer sequence."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--tol", type=float, default=1e-5, help="fp32 only; lower precision: 3x one process")
    args = parser.parse_args()
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(args.device, local_rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    dtype = getattr(torch, args.dtype)
    cases = [dict(dp=1, cp=world, mode=mode, kinds=kinds, seq=args.seq, backend=args.backend, block_size=256,
                  top_k=3, dim=512)
             for mode in ("allgather", "ulysses") for kinds in (["moba", "full"], ["moba", "moba"])]
    failures = run_cases(cases, device, dtype, args.tol)
    dist.destroy_process_group()
    if failures:
        print("FAILED:\n" + "\n".join(failures), flush=True)
        sys.exit(1)
    if int(os.environ.get("RANK", "0")) == 0:
        print("all cases within tolerance", flush=True)


if __name__ == "__main__":
    main()
