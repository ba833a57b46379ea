"""The fused decode kernels (`moba_train/ops/fused/decode.py`): the gate against the torch rule, the attention
against dense float64 attention over the same keys.

On the CPU the kernel runs in Triton's interpreter, in a child process with TRITON_INTERPRET=1 (this file is its
script), as in test_ops_backends.py. On a GPU, tests/test_hf_attention.py runs it inside gated decode.
"""

import json

import pytest
import torch
from conftest import compiled_variants, run_interpreted

# (batch, Hq, Hkv, head_dim, block_size, top_k, cache length): left padding, GQA, short own blocks, unused slots
CASES = [
    (2, 4, 2, 16, 16, 3, 70),
    (3, 2, 1, 32, 24, 4, 100),  # block size not a power of two: masked key chunks
    (1, 4, 4, 16, 16, 8, 40),  # fewer past blocks than slots: -1 entries
    (2, 2, 1, 16, 16, 5, 2200),  # more past blocks (137) than one gate chunk (64)
]


def dense_reference(q, k, v, idx, starts, block_size, scale):
    """Softmax over the keys of the selected blocks, written out per (row, head) in float64."""
    batch, hq, _, dim = q.shape
    hkv, length = k.shape[1], k.shape[2]
    out = torch.zeros(batch, hq, 1, dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(hq):
            slots = [s for blk in idx[b, h].tolist() if blk >= 0
                     for s in range(starts[b] + blk * block_size, min(starts[b] + (blk + 1) * block_size, length))]
            keys, vals = k[b, h // (hq // hkv), slots].double(), v[b, h // (hq // hkv), slots].double()
            out[b, h, 0] = (torch.softmax(keys @ q[b, h, 0].double() * scale, 0) @ vals).cpu()
    return out


def run_case(batch, hq, hkv, dim, block_size, top_k, length, seed, device="cpu", dtype=torch.float32):
    from moba_train.ops.fused.decode import decode_attn

    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, 1, dim, generator=gen).to(device, dtype)
    k, v = (torch.randn(batch, hkv, length, dim, generator=gen).to(device, dtype) for _ in range(2))
    starts = torch.randint(0, block_size + 5, (batch,), generator=gen)
    idx = torch.full((batch, hq, top_k), -1, dtype=torch.long)
    for b in range(batch):
        own = (length - 1 - int(starts[b])) // block_size
        for h in range(hq):
            past = torch.randperm(own, generator=gen)[: top_k - 1]
            idx[b, h, : len(past)] = past
            idx[b, h, -1] = own
    got = decode_attn(q, k, v, idx.to(device), starts.to(device), block_size, dim ** -0.5)
    ref = dense_reference(q, k, v, idx, starts.tolist(), block_size, dim ** -0.5)
    return {"err": float((got.double().cpu() - ref).abs().max() / ref.abs().max()),
            "unused_slots": int((idx < 0).sum()), "gate_equal": gate_equal(q, k, starts, block_size, top_k)}


def gate_equal(q, k, starts, block_size, top_k) -> bool:
    """decode_gate's selections (as sets) against the torch rule, `pick_blocks` over `score_blocks`, with each
    row's block means in a buffer wider than its complete blocks (the decode state grows by doubling)."""
    from moba_train.hf.routing import doc_block_means, score_blocks
    from moba_train.ops.fused.decode import decode_gate
    from moba_train.ops.gate import pick_blocks

    length = k.shape[2]
    own = [(length - 1 - int(s)) // block_size for s in starts]
    means = torch.zeros(k.shape[0], k.shape[1], 2 * max(own) + 3, k.shape[3], device=k.device)
    for b, (start, n) in enumerate(zip(starts.tolist(), own)):
        means[b, :, :n] = doc_block_means(k[b, :, start:], n, block_size)
    got = decode_gate(q, means, starts.to(k.device), length, block_size, top_k, max(own))
    own_t = torch.tensor(own, device=k.device)[:, None, None]
    want = pick_blocks(score_blocks(q, means[:, :, : max(own)]), own_t, top_k)[:, :, 0]
    want = torch.nn.functional.pad(want, (0, top_k - want.shape[-1]), value=-1)  # pick_blocks stops at N + 1
    return bool(torch.equal(got.long().sort(-1).values, want.sort(-1).values))


@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted(__file__, timeout=300)


@pytest.mark.parametrize("pieces", ["split", "uneven", "whole"])
@pytest.mark.parametrize("case", range(len(CASES)), ids=[str(c) for c in CASES])
def test_decode_kernel_matches_dense(interpreted, case, pieces):
    res = interpreted[pieces][case]
    assert res["err"] < 2e-5, res
    assert res["gate_equal"], "decode gate selected other blocks than the torch rule"


def test_decode_gate_breaks_ties_like_the_rule(interpreted):
    assert interpreted["ties"] == [True] * 4


def test_cases_cover_unused_slots(interpreted):
    assert interpreted["whole"][2]["unused_slots"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("block_size,top_k", [(4096, 12), (1024, 8), (64, 8)])
def test_gpu_decode_kernel_at_128k(block_size, top_k):
    """bf16 at a real size: 2 left-padded rows, 32/8 heads, head_dim 128, a 128K cache; error relative to the
    largest output entry (bf16 inputs and output, fp32 inside). With 64-blocks the gate has ~2K past blocks, more
    than it holds at once."""
    res = run_case(2, 32, 8, 128, block_size, top_k, 131072, seed=0, device="cuda", dtype=torch.bfloat16)
    assert res["err"] < 1e-2 and res["gate_equal"], res


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_decode_compiles_once_as_the_cache_grows():
    """A decode step per cache length, through lengths that are multiples of 16 and not, with block means in
    buffers of several widths (the decode state grows its buffer): no kernel is compiled after the first step (a
    compile is a stall of ~0.3 s in the middle of generation)."""
    from moba_train.ops.fused import decode

    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 8, 1, 128, generator=gen, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, 8100, 128, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    means = k[:, :, :31 * 256].float().unflatten(2, (31, 256)).mean(3)
    starts = torch.zeros(1, dtype=torch.int32, device="cuda")
    kernels = (decode._gate_kernel, decode._slot_kernel, decode._merge_kernel)
    counts = []
    for length in range(8001, 8040):  # own block 31 throughout; 8016 and 8032 are multiples of 16
        cache_k, cache_v = k[:, :, :length].contiguous(), v[:, :, :length].contiguous()
        buffer = means.new_zeros(1, 2, (31, 40, 64, 100)[length % 4], 128)
        buffer[:, :, :31] = means
        idx = decode.decode_gate(q, buffer, starts, length, 256, 4, 31)
        decode.decode_attn(q, cache_k, cache_v, idx, starts, 256, 128 ** -0.5)
        counts.append(compiled_variants(*kernels))
    assert counts == counts[:1] * len(counts), counts


def tie_case() -> bool:
    """Every past block holds the same keys: all scores tie, and the gate keeps the lowest blocks like the rule."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 1, 16, generator=gen)
    k = torch.randn(2, 2, 16, 16, generator=gen).repeat(1, 1, 8, 1)  # 8 equal blocks of 16
    return gate_equal(q, k, torch.tensor([0, 3]), 16, 4)


def split_and_whole():
    """Blocks split into pieces (PIECE 8: 2-3 per block), into pieces with a shorter last one (PIECE 10 of 16- and
    24-blocks) and whole (PIECE larger than the blocks); the gate's chunks of 4, 2 and 64 means (64: only the
    137-block case takes more than one)."""
    from moba_train.ops.fused import decode

    results = {}
    for name, piece, chunk in (("split", 8, 4), ("uneven", 10, 2), ("whole", 1024, 64)):
        decode.PIECE, decode.GATE_CHUNK = piece, chunk
        decode.MERGE_CHUNK = 4  # several merge chunks per row (up to 8 slots x 3 pieces)
        results[name] = [run_case(*case, seed=i) for i, case in enumerate(CASES)]
    return results


def tied_then_better() -> bool:
    """Blocks 0 and 1 tie for the two past slots, block 6 beats both: the gate keeps block 0 like the rule."""
    q = torch.zeros(1, 1, 1, 16)
    q[..., 0] = 1.0
    k = torch.ones(1, 1, 8 * 16 + 1, 16)
    k[:, :, :32] = 5.0
    k[:, :, 96:112] = 9.0
    return gate_equal(q, k, torch.tensor([0]), 16, 3)


def ties_both_ways() -> list[bool]:
    from moba_train.ops.fused import decode

    results = []
    for chunk in (64, 2):  # all scores in one chunk; in chunks of 2, so ties meet within and across chunks
        decode.GATE_CHUNK = chunk
        results += [tie_case(), tied_then_better()]
    return results


if __name__ == "__main__":  # the child process: every result as one JSON object on the last line
    print(json.dumps({**split_and_whole(), "ties": ties_both_ways()}))
