"""Prefill and decode timings in Hugging Face transformers: `sdpa` vs `moba` on a small random Llama (GPU).

    PYTHONPATH=$PWD python scripts/bench_hf.py --out $OUT/hf.json

Model: random Llama, 8 layers, 32 query / 8 KV heads, head_dim 128 (hidden 4096), bf16, batch 1. For each prompt
length: one prefill (timed on the second of two runs) with a DynamicCache, then greedy decode steps (MoBA: gated,
then the same cache decoded with full attention, the reference code's behaviour, then on CUDA gated again without
the fused decode kernel, "torch-dec"). MoBA rows also check the first gated decode step against a MoBA prefill of
the same tokens ("dec-vs-pre": max |logit difference|, bf16). Prints a table; writes JSON.
"""

import argparse
import datetime
import json
import os
import time
from functools import partial

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

import moba_train.hf.decode as hf_decode  # noqa: E402
from moba_train.hf import register_moba  # noqa: E402
from moba_train.ops import resolve_backend  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--moba", nargs="+", default=["4096:12", "1024:8"], help="MoBA settings as block_size:top_k")
    p.add_argument("--backend", default="auto", help="MoBA prefill backend")
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--ffn", type=int, default=14336)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--budget-s", type=float, default=150.0, help="skip the remaining runs after this long")
    p.add_argument("--out", default=None, help="JSON results file")
    p.add_argument("--device", default="cuda", help="cpu only for a smoke test of the script with tiny sizes, e.g. "
                   "--lengths 512 --layers 1 --heads 4 --kv-heads 2 --head-dim 16 --ffn 64 --vocab 100 "
                   "--decode-steps 2 --moba 128:2")
    return p.parse_args()


def build_model(args: argparse.Namespace) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.heads * args.head_dim, intermediate_size=args.ffn,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
                      max_position_embeddings=max(args.lengths) + 1024,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM(cfg)
    return model.to(torch.bfloat16).eval()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


@torch.no_grad()
def run(model: LlamaForCausalLM, attn: str, length: int, steps: int, moba: tuple[int, int] | None,
        backend: str) -> dict:
    model.config._attn_implementation = attn
    if moba is not None:
        register_moba(block_size=moba[0], top_k=moba[1], backend=backend)
    ids = torch.randint(0, model.config.vocab_size, (1, length), device=model.device)
    cuda = model.device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):  # the first run compiles / autotunes kernels for this shape
        cache = DynamicCache(config=model.config)
        out, prefill_s = timed(partial(model, ids, past_key_values=cache, use_cache=True, logits_to_keep=1))
        logits = out.logits
    prefill_peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")

    def decode(n: int):
        nonlocal logits
        for _ in range(n):
            token = logits[:, -1:].argmax(-1)
            logits = model(token, past_key_values=cache, use_cache=True).logits

    first_token = logits[:, -1:].argmax(-1)
    _, first_s = timed(lambda: decode(1))  # MoBA: builds the block means of the cache here
    first_logits = logits[0, -1].float()
    decode(2)
    _, decode_s = timed(lambda: decode(steps))
    row = dict(attn=attn, length=length, prefill_s=prefill_s, prefill_tok_s=length / prefill_s,
               first_decode_ms=1e3 * first_s, decode_ms=1e3 * decode_s / steps, prefill_peak_gib=prefill_peak)
    if moba is not None:
        row.update(block_size=moba[0], top_k=moba[1], backend=backend)
        # the gated decode step must agree with a MoBA prefill over the same tokens (up to bf16 rounding)
        want = model(torch.cat([ids, first_token], dim=1), logits_to_keep=1).logits[0, -1].float()
        row["decode_vs_prefill_maxdiff"] = float((first_logits - want).abs().max())
        row["logit_std"] = float(want.std())
        register_moba(block_size=moba[0], top_k=moba[1], backend=backend, full_decode=True)
        decode(2)
        _, full_s = timed(lambda: decode(steps))
        row["full_decode_ms"] = 1e3 * full_s / steps
        register_moba(block_size=moba[0], top_k=moba[1], backend=backend)
        if cuda:  # gated decode without the fused kernel (gather or masked pass in torch), same cache
            hf_decode.DECODE_KERNEL = False
            try:
                decode(2)
                _, torch_s = timed(lambda: decode(steps))
            finally:
                hf_decode.DECODE_KERNEL = True
            row["torch_decode_ms"] = 1e3 * torch_s / steps
    return row


def table(rows: list[dict]) -> str:
    head = (f"{'attn':<18} {'length':>7} {'prefill s':>9} {'tok/s':>8} {'peak GiB':>8} {'decode ms':>9} "
            f"{'1st dec ms':>10} {'full-dec ms':>11} {'torch-dec ms':>12} {'dec-vs-pre':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['attn']:<18} {r['length']:>7} skipped: {r['skipped']}")
            continue
        name = r["attn"] if "block_size" not in r else f"moba {r['block_size']}/{r['top_k']}"
        full = f"{r['full_decode_ms']:>11.2f}" if "full_decode_ms" in r else f"{'':>11}"
        gated_torch = f"{r['torch_decode_ms']:>12.2f}" if "torch_decode_ms" in r else f"{'':>12}"
        check = f"{r['decode_vs_prefill_maxdiff']:>10.2e}" if "decode_vs_prefill_maxdiff" in r else ""
        lines.append(f"{name:<18} {r['length']:>7} {r['prefill_s']:>9.3f} {r['prefill_tok_s']:>8.0f} "
                     f"{r['prefill_peak_gib']:>8.1f} {r['decode_ms']:>9.2f} {r['first_decode_ms']:>10.1f} "
                     f"{full} {gated_torch} {check}")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_hf: needs a CUDA GPU (or --device cpu with tiny sizes for a smoke test)")
    start = time.perf_counter()
    probe = torch.empty(1, args.heads, args.head_dim, device=args.device, dtype=torch.bfloat16)  # the queries' kind
    backend = resolve_backend(args.backend, probe)
    model = build_model(args)
    configs = [tuple(int(x) for x in spec.split(":")) for spec in args.moba]
    # warm-up (kernels, allocator) at the shortest measured length: shorter prompts can take other paths (a
    # decode over at most top_k blocks is plain full attention) and leave the gated path cold for the first row
    for attn, moba in [("sdpa", None)] + [("moba", c) for c in configs]:
        run(model, attn, min(args.lengths), 2, moba, backend)
    rows = []
    for length in args.lengths:
        for attn, moba in [("sdpa", None)] + [("moba", c) for c in configs]:
            base = dict(attn=attn if moba is None else f"moba {moba[0]}/{moba[1]}", length=length)
            if time.perf_counter() - start > args.budget_s:
                rows.append(dict(base, skipped=f"time budget of {args.budget_s:.0f} s spent"))
            elif moba is not None and backend == "naive" and length > 16384:
                rows.append(dict(base, skipped="only the naive (dense, O(L^2) memory) MoBA backend is available"))
            else:
                rows.append(run(model, attn, length, args.decode_steps, moba, backend))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=torch.cuda.get_device_name() if args.device == "cuda" else args.device,
                torch=torch.__version__, transformers=transformers.__version__,
                moba_backend=backend, batch=1, dtype="bfloat16", decode_steps=args.decode_steps,
                model=dict(layers=args.layers, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                           ffn=args.ffn, vocab=args.vocab), wall_s=time.perf_counter() - start)
    print(f"\n{meta['device']} | torch {meta['torch']} | transformers {meta['transformers']} | MoBA prefill "
          f"backend {backend} | bf16, batch 1, {args.layers} layers, {args.heads}/{args.kv_heads} heads, head_dim "
          f"{args.head_dim}\n" + table(rows))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
