"""Fast backends against the dense reference: outputs, dq, dk, dv and the gate's selection.

On the CPU the Triton kernels run in Triton's interpreter. The interpreter is chosen when kernels are defined
and it must stay switched on while they run, so the cases run in one child process with TRITON_INTERPRET=1
(this file is its script): the rest of the test session never sees the variable. With a GPU present these
cases are skipped; tests/gpu/ covers the backends there at real sizes.
"""

import contextlib
import json

import pytest
import torch
import triton
import triton.language as tl
from conftest import packed, run_interpreted

from moba_train.ops.fused.state import load_rows_sum, store_rows_sum

# (doc lengths, Hq, Hkv, head_dim, block_size, top_k): packed docs with short last blocks, GQA groups 1..4,
# top_k from 1 (own block only) to >= blocks (full causal attention); the first seven make the gate choose
CASES = [
    ((70, 45, 33), 2, 1, 16, 16, 3),
    ((100, 64), 4, 2, 32, 32, 2),
    ((150,), 4, 4, 16, 16, 5),
    ((37, 90), 8, 2, 16, 16, 4),
    ((81, 20, 49), 1, 1, 32, 32, 2),
    ((256,), 4, 1, 16, 64, 2),
    ((60, 81), 2, 1, 16, 24, 2),
    ((64, 60), 2, 2, 16, 16, 1),
    ((47, 75), 2, 2, 16, 16, 12),
    ((90, 40), 2, 1, 16, 16, 64),  # the largest top_k the issue asks for
    ((30, 50, 20), 2, 1, 16, 64, 3),  # every document within one block: no past block anywhere
    ((0, 36, 0), 2, 1, 16, 16, 2),  # empty documents (as many blocks as documents, yet block 2 has a past)
    ((200,), 2, 1, 16, 64, 4),  # the tiled past passes (blocks > 32 here) resuming over three slots
    ((90, 41), 2, 1, 24, 16, 3),  # head_dim 24: the kernels run it zero-padded to 32
]
FP32_TOL = 2e-5  # interpreter fp32 vs float64 reference, relative to the reference's largest entry


def run_case(lengths, hq, hkv, dim, block_size, top_k, seed):
    from moba_train.ops import moba_attn
    from moba_train.ops.fused import moba_select  # the fused gate itself (moba_train.ops picks it only on CUDA)
    from moba_train.ops.gate import moba_select as reference_select

    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v = (torch.randn(total, h, dim, generator=gen) for h in (hq, hkv, hkv))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    weight = torch.randn(total, hq, dim, generator=gen)
    result = {"select_equal": bool(torch.equal(moba_select(q, k, cu, max(lengths), block_size, top_k),
                                               reference_select(q, k, cu, max(lengths), block_size, top_k)))}
    outs = {}
    for backend, dtype in (("triton", torch.float32), ("naive", torch.float64)):
        leaves = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        out = moba_attn(*leaves, cu, max(lengths), block_size, top_k, backend=backend)
        outs[backend] = [out, *torch.autograd.grad(out, leaves, weight.to(dtype))]
    for name, got, ref in zip(("out", "dq", "dk", "dv"), outs["triton"], outs["naive"]):
        result[name] = float((got.double() - ref).abs().max() / ref.abs().max())
    return result


def zero_rows_case():
    """Context parallel's allgather mode runs the op over the global stream with zeros in the query rows of other
    ranks and keeps the local rows (parallel/offset_attn.py): those rows' outputs and all gradients must match
    the reference. The zero rows score every block 0 (all ties) and get no upstream gradient."""
    from moba_train.ops import moba_attn

    gen = torch.Generator().manual_seed(11)
    lengths, hq, hkv, dim, block_size, top_k = (100, 92), 4, 2, 16, 16, 3
    total = sum(lengths)
    q, k, v = (torch.randn(total, h, dim, generator=gen) for h in (hq, hkv, hkv))
    local = torch.cat([torch.arange(0, 48), torch.arange(144, total)])  # a zigzag shard: first and last chunks
    q_all = torch.zeros_like(q).index_copy(0, local, q[local])
    cu = torch.tensor([0, lengths[0], total], dtype=torch.int32)
    weight = torch.randn(len(local), hq, dim, generator=gen)
    got = {}
    for backend, dtype in (("triton", torch.float32), ("naive", torch.float64)):
        leaves = [x.to(dtype).requires_grad_() for x in (q_all, k, v)]
        out = moba_attn(*leaves, cu, max(lengths), block_size, top_k, backend=backend)[local]
        got[backend] = [out, *torch.autograd.grad(out, leaves, weight.to(dtype))]
    return {name: float((a.double() - b).abs().max() / b.abs().max())
            for name, a, b in zip(("out", "dq", "dk", "dv"), got["triton"], got["naive"])}


def fp16_state() -> dict:
    """The per-row sums between slot launches in fp16 with a row scale (the default for bf16/fp16 inputs: the
    forward's running acc and dQ's past part) on fp32 inputs, so the reference is tight: per block size (16: the
    whole-block past passes, 64: the tiled ones, each resuming over several slots) and scale of V (1e6 would
    overflow fp16 without the row scale; a zero KV head gives all-zero rows), the error of out and dq relative
    to their largest entry, with fp32 sums' for comparison."""
    from moba_train.ops import moba_attn
    from moba_train.ops.fused.autograd import selection
    from moba_train.ops.fused.bwd import backward
    from moba_train.ops.fused.fwd import forward
    from moba_train.ops.fused.routing import build_routes
    from moba_train.ops.fused.tiles import tiles

    result = {}
    for lengths, hq, block_size in (((96, 70), 4, 16), ((200,), 2, 64)):
        gen = torch.Generator().manual_seed(5)
        hkv, dim, top_k = 2, 16, 5
        cu = torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32)
        q, k, v, do = (torch.randn(sum(lengths), h, dim, generator=gen) for h in (hq, hkv, hkv, hq))
        v[:, 1] = 0.0
        layout, idx = selection(q, k, cu, block_size, top_k)
        routes = build_routes(idx, layout, hkv, tiles(block_size, dim, 4, interpret=True)["past_rows"])
        for v_scale in (1.0, 1e6):
            leaves = [x.double().requires_grad_() for x in (q, k, v * v_scale)]
            ref = moba_attn(*leaves, cu, max(lengths), block_size, top_k, backend="naive")
            ref_dq, = torch.autograd.grad(ref, leaves[0], do.double())
            for state in (torch.float32, torch.float16):
                out, lse = forward(q, k, v * v_scale, layout, routes, dim ** -0.5, True, acc_dtype=state)
                dq = backward(do, q, k, v * v_scale, out, lse, layout, routes, dim ** -0.5, True, sum_dtype=state)[0]
                for name, got, want in (("out", out, ref.detach()), ("dq", dq, ref_dq)):
                    err = (got.double() - want).abs().max() / want.abs().max()
                    result[f"{name} {v_scale:g} {str(state)[6:]} {block_size}"] = float(err)
    return result


def routes_case() -> dict:
    """`build_routes` against a reference written with numpy's lexsort, on random canonical selections of packed
    documents (an empty one included), with 16-bit and, past 32767 segments, 32-bit sort keys: the rows sorted
    by (kv head, block, slot) then row id, the segment starts, and each slot's entries covering exactly that
    slot's segments, none longer than an entry."""
    import numpy as np

    from moba_train.ops.fused.layout import build_layout
    from moba_train.ops.fused.routing import build_routes

    gen = torch.Generator().manual_seed(4)
    result = {}
    # (doc lengths, Hq, Hkv, block, top_k, rows per entry): 8 KV heads x 128 blocks x 33 slots > 32767 segments
    # the third: every query's best past block is block 0 (a sink), so one segment per slot holds most rows
    for lengths, hq, hkv, block, top_k, tile_m, sink in (((90, 0, 300, 47), 6, 2, 16, 4, 16, False),
                                                        ((2048,), 8, 8, 16, 34, 32, False),
                                                        ((1500,), 4, 2, 16, 3, 16, True)):
        cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
        layout = build_layout(cu, block, 16, torch.device("cpu"))
        sel, keys = [], []
        first = 0
        for length in lengths:
            own = torch.arange(length) // block
            n_blk = -(-length // block)
            score = torch.rand(length, hq, max(n_blk, 1), generator=gen)
            score[..., 0] += sink
            score = score.masked_fill(torch.arange(max(n_blk, 1)) >= own[:, None, None], -1.0)
            val, ix = score.topk(min(top_k - 1, max(n_blk, 1)), dim=-1)
            past = torch.where(val >= 0, ix, 1 << 20).sort(-1).values
            n_past = (past < 1 << 20).sum(-1)
            doc_sel = torch.full((length, hq, top_k), -1, dtype=torch.int32)
            doc_sel[..., :past.shape[-1]] = torch.where(past < 1 << 20, past, -1).int()
            doc_sel.scatter_(2, n_past[..., None], own[:, None, None].expand(length, hq, 1).int())
            sel.append(doc_sel)
            t, h, slot = np.nonzero((torch.arange(top_k - 1) < n_past[..., None]).numpy())
            row = (cu[len(sel) - 1].item() + t) * hq + h
            keys.append(np.stack([h // (hq // hkv), first + past[t, h, slot].numpy(), slot, row]))
            first += n_blk
        idx = torch.cat(sel).contiguous()
        hk, blk, slot, row = np.concatenate(keys, 1)
        order = np.lexsort((row, slot, blk, hk))
        seg = (hk * layout.n_blocks + blk) * (top_k - 1) + slot
        n_seg = hkv * layout.n_blocks * (top_k - 1)
        starts = np.searchsorted(np.sort(seg), np.arange(n_seg + 1))
        routes = build_routes(idx, layout, hkv, tile_m)
        n_rows = int(routes.seg_start[-1])
        covered = True
        for r in range(routes.n_slots):
            tile0, n_tiles = routes.slot(r)
            spans = {}  # per (kv head, block) pair: its entries in order, joined where they meet
            for a, c, pair in routes.tiles[tile0:tile0 + n_tiles].tolist():
                if c > 0:
                    covered &= c <= tile_m
                    last = spans.setdefault(pair, [(a, a)])[-1]
                    spans[pair][-1:] = [(last[0], a + c)] if last[1] == a else [last, (a, a + c)]
            bounds = routes.seg_start.tolist()
            want = {p: [(bounds[p * (top_k - 1) + r], bounds[p * (top_k - 1) + r + 1])]
                    for p in range(hkv * layout.n_blocks) if bounds[p * (top_k - 1) + r + 1] > bounds[p * (top_k - 1) + r]}
            covered &= spans == want
        result[f"{n_seg}"] = {"rows": routes.rows[:n_rows].tolist() == row[order].tolist(),
                              "seg_start": routes.seg_start.tolist() == starts.tolist(), "entries": covered}
    return result


@triton.jit
def _sums_roundtrip(X, Sums, Scale, Y, N: tl.constexpr, D: tl.constexpr):
    rows = tl.arange(0, N)
    ptrs = rows[:, None] * D + tl.arange(0, D)[None, :]
    store_rows_sum(Sums, Scale, rows, rows < N, tl.load(X + ptrs), D, True, 1)
    # other threads of the program read back what these wrote: without the barrier a GPU run may read the buffers
    # before the writes land (one failure in the twelfth session; the interpreter runs threads in order)
    tl.debug_barrier()
    tl.store(Y + ptrs, load_rows_sum(Sums, Scale, rows, rows < N, D, True, 1))


def state_range(device: str = "cpu") -> dict:
    """The fp16 row sums' round trip (store with a row scale, load back) across fp32's range, the last binade
    (|entry| >= 2^127, where the next power of two is not an fp32; its inverse is an fp32 subnormal, which a GPU
    that flushed it to zero would turn into zero rows) and zero rows included: per row, finite and the error
    relative to the row's largest entry."""
    peaks = [0.0, 1e-30, 1.0, 1e6, 2.0 ** 126 * 1.9, 2.0 ** 127 * 1.5, 3.4e38]
    x = torch.rand(8, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2 - 1
    x[:len(peaks)] *= torch.tensor(peaks, dtype=torch.float64)[:, None] / x[:len(peaks)].abs().amax(1, keepdim=True)
    x = x.float().to(device)  # each row's largest |entry| is its peak (3.4e38 stays below fp32's max)
    sums, scale = torch.empty(8, 16, dtype=torch.float16, device=device), torch.empty(8, device=device)
    y = torch.empty_like(x)
    _sums_roundtrip[(1,)](x, sums, scale, y, N=8, D=16)
    x, y = x.cpu().double(), y.cpu()
    err = (y.double() - x).abs().amax(1) / x.abs().amax(1).clamp_min(1e-300)
    return {f"{peak:g}": [bool(y[i].isfinite().all()), float(err[i])] for i, peak in enumerate(peaks)}


def gpu_tiles() -> dict:
    """The GPU's tile configs at blocks <= 128 (the whole-block forward with entries of up to 512 rows walked
    64 at a time, dQ's 64-row past tiles, 64-key chunks; head_dim 64's one tile of 64 rows per program) run in
    the interpreter, which otherwise takes its own
    16-row tiles, with every `torch.empty` poisoned with NaN so that a read of a row the kernels never wrote
    shows; fp32 and fp16 row sums, errors relative to the float64 reference."""
    from moba_train.ops import moba_attn
    from moba_train.ops.fused.autograd import selection
    from moba_train.ops.fused.bwd import backward
    from moba_train.ops.fused.fwd import forward
    from moba_train.ops.fused.routing import build_routes
    from moba_train.ops.fused.tiles import tiles

    empty = torch.empty

    def poisoned(*args, **kwargs):
        x = empty(*args, **kwargs)
        return x.fill_(float("nan")) if x.dtype.is_floating_point else x

    result = {}
    # the configs of head_dim 128 (bf16) at blocks 64 and 96 (whole-block passes with keys past the block's end
    # inside their chunks, masked), of head_dim 64 at block 128 (64-row past tiles, 32-row dK/dV tiles)
    cases = (((200, 70, 0, 150), 4, 2, 16, 64, 4, 128), ((130, 70), 2, 2, 16, 128, 3, 64),
             ((250, 100), 2, 1, 16, 96, 3, 128))
    for seed, (lengths, hq, hkv, dim, block_size, top_k, cfg_dim) in enumerate(cases):
        q, k, v, cu, _ = packed(lengths, hq, hkv, dim, torch.float32, seed, requires_grad=False)
        do = torch.randn_like(q)
        leaves = [x.double().requires_grad_() for x in (q, k, v)]
        ref = moba_attn(*leaves, cu, max(lengths), block_size, top_k, backend="naive")
        refs = [ref.detach(), *torch.autograd.grad(ref, leaves, do.double())]
        cfg = {name: {key: value for key, value in launch.items() if key not in ("num_warps", "num_stages")}
               if isinstance(launch, dict) else launch for name, launch in tiles(block_size, cfg_dim, 2).items()}
        layout, idx = selection(q, k, cu, block_size, top_k)
        routes = build_routes(idx, layout, hkv, cfg["past_rows"])
        torch.empty = poisoned
        try:
            for state in (torch.float32, torch.float16):
                out, lse = forward(q, k, v, layout, routes, dim ** -0.5, True, cfg, acc_dtype=state)
                grads = backward(do, q, k, v, out, lse, layout, routes, dim ** -0.5, True, cfg, sum_dtype=state)
                errors = torch.stack([(got.double() - want).abs().max() / want.abs().max()
                                      for got, want in zip((out, *grads), refs)])
                result[f"{block_size} {str(state)[6:]}"] = float(errors.max())  # NaN wins
        finally:
            torch.empty = empty
    return result


def double_backward_refused() -> str:
    """The backward is not differentiable again: asking for it must raise, naming once_differentiable (a silent
    zero, or an unrelated error about tensors without grad, would be the defect)."""
    from moba_train.ops import moba_attn

    q = torch.randn(40, 2, 16, requires_grad=True)
    out = moba_attn(q, q[:, :1], q[:, :1], torch.tensor([0, 40]), 40, 16, 2, "triton")
    weight = torch.randn_like(out, requires_grad=True)  # a graph through dO: a second-order term would exist
    dq, = torch.autograd.grad(out, q, weight, create_graph=True)
    try:
        dq.sum().backward()
    except RuntimeError as err:
        return str(err)
    return ""


def int_like_args() -> dict:
    """numpy ints and 0-dim tensors for block_size, top_k and softmax_scale (the checks accept them) reach the
    kernels as plain numbers: they crashed the triton backend (a numpy int's missing bit_length, a tensor top_k as
    a compile-time constant, a tensor scale as a pointer), and the layout memo, which hashes np.int64(16) like 16,
    kept the numpy int, so later plain calls on the same offsets crashed too. bf16 is refused here: the
    interpreter's bf16 products are wrong."""
    import numpy as np

    from moba_train.ops import moba_attn

    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(70, h, 16, generator=gen) for h in (2, 1, 1))
    cu = torch.tensor([0, 70])
    plain = moba_attn(q, k, v, cu, 70, 16, 2, "triton", softmax_scale=0.3)
    odd = moba_attn(q, k, v, cu.clone(), 70, np.int64(16), torch.tensor(2), "triton", softmax_scale=torch.tensor(0.3))
    again = moba_attn(q, k, v, cu.clone(), 70, 16, 2, "triton", softmax_scale=0.3)  # same offsets: memo hit
    try:
        moba_attn(q.bfloat16(), k.bfloat16(), v.bfloat16(), cu, 70, 16, 2, "triton")
        refusal = ""
    except ValueError as err:
        refusal = str(err)
    return {"equal": torch.equal(plain, odd) and torch.equal(plain, again), "bf16": refusal}


def tie_picks():
    """Fused selections of block 3's rows when blocks 1 and 2 hold the same keys and block 0 their negation:
    scores tie exactly (small integers, so every summation order gives the same fp32 value) and beat block 0.
    The gate keeps the lower block when only one fits, both when two do."""
    from moba_train.ops.fused import moba_select

    gen = torch.Generator().manual_seed(0)
    k = torch.randint(-3, 4, (64, 2, 16), generator=gen).float()
    k[32:48] = k[16:32]
    k[0:16] = -k[16:32]
    sums = k[16:32].sum(0, keepdim=True).repeat_interleave(2, 1)  # 16 x block 1's mean, per query head
    q = sums + torch.randint(-1, 2, (64, 4, 16), generator=gen).float()
    cu = torch.tensor([0, 64], dtype=torch.int32)
    return {str(top_k): moba_select(q, k, cu, 64, 16, top_k)[48:].unique(dim=0).tolist() for top_k in (2, 3)}


def tied_then_better():
    """Blocks 0 and 1 tie and fill the two past slots; block 33, in a later chunk of means, beats both. The block
    that goes is the higher of the tied pair: (fused, reference) selections of the last row."""
    from moba_train.ops.fused import moba_select
    from moba_train.ops.gate import moba_select as reference_select

    k = torch.ones(40 * 16, 1, 16)
    k[:32] = 5.0
    k[33 * 16:34 * 16] = 9.0
    q = torch.zeros(40 * 16, 1, 16)
    q[:, :, 0] = 1.0
    cu = torch.tensor([0, 40 * 16], dtype=torch.int32)
    return [select(q, k, cu, 40 * 16, 16, 3)[-1, 0].tolist() for select in (moba_select, reference_select)]


@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted(__file__, timeout=600)


@pytest.mark.parametrize("case", range(len(CASES)), ids=[str(c) for c in CASES])
def test_triton_matches_naive(interpreted, case):
    res = interpreted["cases"][case]
    assert res["select_equal"], "fused gate selected different blocks from the reference"
    for name in ("out", "dq", "dk", "dv"):
        assert res[name] < FP32_TOL, (name, res)


@pytest.mark.parametrize("merge", ["rounds", "lanes"])
def test_fused_gate_breaks_ties_to_the_lower_block(interpreted, merge):
    ties = interpreted["ties"] if merge == "rounds" else interpreted["lanes"]["ties"]
    assert ties == {"2": [[[1, 3]] * 4], "3": [[[1, 2, 3]] * 4]}


@pytest.mark.parametrize("merge", ["rounds", "lanes"])
def test_fused_gate_evicts_the_higher_of_tied_blocks(interpreted, merge):
    fused, reference = (interpreted if merge == "rounds" else interpreted["lanes"])["tied_then_better"]
    assert fused == reference == [0, 33, 39]


def test_lane_gate_matches_the_reference(interpreted):
    assert interpreted["lane_selections"] == [True] * 5


def test_layout_counts_the_longest_documents_blocks():
    from moba_train.ops.fused.layout import build_layout

    layout = build_layout(torch.tensor([0, 90, 90, 390, 400], dtype=torch.int32), 64, 16, "cpu")
    assert (layout.max_doc_blocks, layout.n_blocks) == (5, 8)


def test_triton_refuses_double_backward(interpreted):
    assert "once_differentiable" in interpreted["double_backward_refused"]


def test_triton_takes_int_like_arguments_and_refuses_interpreted_bf16(interpreted):
    assert interpreted["int_like"]["equal"]
    assert "interpreter cannot run the triton MoBA backend in bf16" in interpreted["int_like"]["bf16"]


def test_triton_on_context_parallel_zero_rows(interpreted):
    res = interpreted["zero_rows"]
    assert all(res[name] < FP32_TOL for name in ("out", "dq", "dk", "dv")), res


def test_routes_match_a_lexsort_reference(interpreted):
    res = interpreted["routes"]
    assert len(res) == 3 and max(map(int, res)) > 32767, res  # both key widths and the sink case ran
    assert all(all(checks.values()) for checks in res.values()), res


def test_layout_memo_follows_the_offsets_values():
    """Tables are memoised by cu_seqlens' values: a tensor rewritten in place must not hit a stale entry."""
    from moba_train.ops.fused.layout import build_layout

    cu = torch.tensor([0, 100, 164], dtype=torch.int32)
    first = build_layout(cu, 32, 16, torch.device("cpu"))
    assert first.blk_start.tolist() == [0, 32, 64, 96, 100, 132] and first.blk_len.tolist() == [32, 32, 32, 4, 32, 32]
    assert build_layout(cu.clone(), 32, 16, torch.device("cpu")) is first  # equal values: one build per step
    cu.copy_(torch.tensor([0, 90, 164]))
    second = build_layout(cu, 32, 16, torch.device("cpu"))
    assert second.blk_start.tolist() == [0, 32, 64, 90, 122, 154]
    assert second.blk_len.tolist() == [32, 32, 26, 32, 32, 10]
    assert second.blk_local.tolist() == [0, 1, 2, 0, 1, 2]


def test_host_offsets_read_once_per_tensor_and_version(monkeypatch):
    """Every layer passes the same cu_seqlens: only its first use reads the values (on a GPU, a sync); an
    in-place rewrite bumps the version and is read again; distinct tensors never share an entry."""
    from moba_train.ops.offsets import host_offsets

    reads = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(1) or original(self))
    cu = torch.tensor([0, 5, 9], dtype=torch.int32)
    assert host_offsets(cu) == (0, 5, 9) and host_offsets(cu) == (0, 5, 9) and len(reads) == 1
    cu[1] = 7
    assert host_offsets(cu) == (0, 7, 9) and len(reads) == 2
    others = [torch.tensor([0, i], dtype=torch.int32) for i in range(20)]  # more than the cache holds
    assert [host_offsets(x) for x in others] == [(0, i) for i in range(20)]
    assert host_offsets(cu) == (0, 7, 9)


def test_bf16_parts_of_the_means_add_up_exactly(interpreted):
    """The bf16 gate's three products are exact only if the parts add back to the fp32 mean: over magnitudes
    from 1e-6 to 1e6, every element's parts sum (in float64) to it exactly, and the third part is needed."""
    assert interpreted["means_parts"] == {"exact": True, "third_needed": True}


def test_fp16_row_sums_round_at_fp16_precision(interpreted):
    """Up to four past slots, each rounding the sum to fp16 under a power-of-two row scale: at most ~4 x 2^-11 of the
    largest entry, at V x 1 and V x 1e6 alike (finite, so the scale did its job), while fp32 sums stay at fp32
    precision (the fp16 ones must be measurably rounding: they are what the kernels used)."""
    res = interpreted["fp16_state"]
    for name in ("out", "dq"):
        for v_scale in ("1", "1e+06"):
            for block_size in (16, 64):
                assert res[f"{name} {v_scale} float32 {block_size}"] < FP32_TOL, res
                assert FP32_TOL < res[f"{name} {v_scale} float16 {block_size}"] < 4 * 2.0 ** -11, res


def test_fp16_row_sums_cover_fp32s_range(interpreted):
    """Every finite row survives the fp16 round trip within 2^-11 of its largest entry: zero rows, tiny ones and
    those in fp32's last binade, whose next power of two (2^128) is no fp32 (the scale stops at 2^127)."""
    check_state_range(interpreted["state_range"])


@pytest.mark.gpu
def test_fp16_row_sums_cover_fp32s_range_on_gpu():
    check_state_range(state_range("cuda"))


def check_state_range(res: dict):
    assert res["0"] == [True, 0.0], res
    for peak, (finite, err) in res.items():
        assert finite and err <= 2.0 ** -11, (peak, res)


def test_gpu_tile_configs_in_the_interpreter(interpreted):
    """The GPU's configs of blocks <= 128 run in CI too; NaN-poisoned buffers would show unwritten reads."""
    res = interpreted["gpu_tiles"]
    assert set(res) == {f"{block} {dtype}" for block in (64, 128, 96) for dtype in ("float32", "float16")}, res
    for key, err in res.items():
        assert err < (FP32_TOL if key.endswith("float32") else 4 * 2.0 ** -11), res


def test_varlen_needs_cuda():
    from moba_train.ops import moba_attn

    q = torch.randn(8, 1, 16)
    with pytest.raises(RuntimeError, match="CUDA"):
        moba_attn(q, q, q, torch.tensor([0, 8], dtype=torch.int32), 8, 4, 2, backend="varlen")


@contextlib.contextmanager
def lanes(block_b=4):
    """The gate's lane-wise top-k (top_k <= 3) at any size, in chunks of block_b means (many chunks per row)."""
    from moba_train.ops.fused import gate

    picked = gate.gate_config
    gate.gate_config = lambda top_k, blocks, dim: ({"BLOCK_B": block_b, "num_warps": 4, "DEPTH": top_k - 1}
                                                   if top_k <= 3 else picked(top_k, blocks, dim))
    try:
        yield
    finally:
        gate.gate_config = picked


def lane_selections() -> list:
    """Lane-wise fused selections equal to the reference gate's: packed documents, short last blocks, GQA,
    top_k 2 and 3 (and 1, no lanes), random scores and small integers (exact ties across lanes and chunks)."""
    from moba_train.ops.fused import moba_select
    from moba_train.ops.gate import moba_select as reference_select

    equal = []
    for seed, (lengths, hq, hkv, block_size, top_k, ties) in enumerate([
            ((150, 97), 2, 1, 4, 3, False), ((181,), 4, 2, 8, 2, False), ((130, 45), 2, 2, 4, 3, True),
            ((160,), 2, 1, 4, 2, True), ((40, 70), 2, 1, 4, 1, False)]):
        gen = torch.Generator().manual_seed(seed)
        q, k = torch.randn(sum(lengths), hq, 16, generator=gen), torch.randn(sum(lengths), hkv, 16, generator=gen)
        if ties:
            q, k = q.round(), (k / 2).round()
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        with lanes():
            got = moba_select(q, k, cu, max(lengths), block_size, top_k)
        equal.append(bool(torch.equal(got, reference_select(q, k, cu, max(lengths), block_size, top_k))))
    return equal


def means_parts() -> dict:
    from moba_train.ops.fused.layout import build_layout
    from moba_train.ops.fused.means import block_means

    k = torch.randn(200, 2, 16, generator=torch.Generator().manual_seed(3)) * torch.logspace(-6, 6, 16)
    layout = build_layout(torch.tensor([0, 90, 200], dtype=torch.int32), 32, 16, k.device)  # short last blocks
    means, parts = block_means(k, layout).double(), block_means(k, layout, parts=True).double()
    return {"exact": torch.equal(parts.sum(0), means), "third_needed": not torch.equal(parts[:2].sum(0), means)}


if __name__ == "__main__":  # the child process: every result as one JSON object on the last line
    with lanes():
        lane_ties = {"ties": tie_picks(), "tied_then_better": tied_then_better()}
    print(json.dumps({"cases": [run_case(*case, seed=i) for i, case in enumerate(CASES)], "ties": tie_picks(),
                      "tied_then_better": tied_then_better(), "lanes": lane_ties, "lane_selections": lane_selections(), "means_parts": means_parts(), "fp16_state": fp16_state(),
                      "state_range": state_range(), "gpu_tiles": gpu_tiles(), "zero_rows": zero_rows_case(),
                      "double_backward_refused": double_backward_refused(), "routes": routes_case(),
                      "int_like": int_like_args()}))
