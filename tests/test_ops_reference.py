"""The MoBA reference (gate + naive backend) against independent dense math and the contract's equivalences
(README.md, "The MoBA op")."""

import math

import re

import numpy as np
import pytest
import torch

from conftest import packed
from moba_train.ops import full_attn, moba_attn, moba_select
from moba_train.ops.gate import attended_share, pick_blocks
from moba_train.ops.naive import allowed_keys


def grads(fn, q, k, v, seed=1):
    out = fn(q, k, v)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    dq, dk, dv = torch.autograd.grad((out * weight).sum(), (q, k, v))
    return out.detach(), dq, dk, dv


def assert_same(a, b, tol=1e-9):
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=tol, rtol=tol), (x - y).abs().max()


def brute_select(q, k, cu, block_size, top_k):
    """Per token and head, by explicit loops (float64): own block + best top_k-1 strictly-past blocks."""
    out = torch.full((q.shape[0], q.shape[1], top_k), -1, dtype=torch.int32)
    group = q.shape[1] // k.shape[1]
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        n_blocks = math.ceil((e - s) / block_size)
        means = [k[s + j * block_size:min(e, s + (j + 1) * block_size)].double().mean(0) for j in range(n_blocks)]
        for t in range(e - s):
            own = t // block_size
            for h in range(q.shape[1]):
                scores = [(float(q[s + t, h].double() @ means[j][h // group]), j) for j in range(own)]
                picked = sorted(j for _, j in sorted(scores, reverse=True)[:top_k - 1]) + [own]
                out[s + t, h, :len(picked)] = torch.tensor(picked, dtype=torch.int32)
    return out


def brute_attn(q, k, v, cu, block_size, sel, scale):
    """Softmax attention of each (token, head) over exactly its selected causal keys, one row at a time."""
    rows = []
    group = q.shape[1] // k.shape[1]
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        for t in range(e - s):
            heads = []
            for h in range(q.shape[1]):
                blocks = {int(b) for b in sel[s + t, h] if b >= 0}
                keys = [s + j for j in range(t + 1) if j // block_size in blocks]
                kk, vv = k[keys, h // group], v[keys, h // group]
                heads.append(torch.softmax(kk @ q[s + t, h] * scale, 0) @ vv)
            rows.append(torch.stack(heads))
    return torch.stack(rows)


@pytest.mark.parametrize("lengths,hq,hkv,block,top_k", [
    ([37, 20], 4, 2, 8, 3),      # packed, short last blocks, GQA
    ([50], 2, 2, 16, 2),
    ([9, 33, 16], 4, 1, 8, 8),   # MQA; top_k >= blocks in the short documents
])
def test_select_matches_brute_force(lengths, hq, hkv, block, top_k):
    q, k, _, cu, max_len = packed(lengths, hq, hkv, 8, requires_grad=False, seed=sum(lengths))
    got = moba_select(q, k, cu, max_len, block, top_k)
    assert got.dtype == torch.int32 and got.shape == (sum(lengths), hq, top_k)
    assert torch.equal(got, brute_select(q, k, cu, block, top_k))


def test_ties_go_to_the_lower_block():
    """Equal scores at the cut keep the lower block, as the fused gates do (torch.topk leaves tie order open):
    against sorting by (-score, block) on small integer scores full of ties, -0.0 and +0.0 as one value."""
    from moba_train.ops.gate import pick_blocks

    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(-3, 3, (400, 9), generator=gen).float()
    scores[scores == 0] = torch.where(torch.rand(int((scores == 0).sum()), generator=gen) < 0.5, -0.0, 0.0)
    own = torch.randint(0, 10, (400,), generator=gen)
    idx = pick_blocks(scores, own, 4)
    for row, o in enumerate(own.tolist()):
        ranked = sorted(range(o), key=lambda j: (-scores[row, j].item(), j))[:3]
        assert sorted(x for x in idx[row, :3].tolist() if x >= 0) == sorted(ranked) and idx[row, 3] == o


def test_select_invariants():
    q, k, _, cu, max_len = packed([200, 77], 4, 2, 16, requires_grad=False, seed=3)
    idx = moba_select(q, k, cu, max_len, 16, 5)
    local = torch.cat([torch.arange(200), torch.arange(77)])
    own = (local // 16)[:, None]
    assert ((idx == own[..., None]).sum(-1) == 1).all(), "own block always selected exactly once"
    assert (idx <= own[..., None]).all(), "no future block"
    valid = idx >= 0
    assert (valid.sum(-1) == torch.clamp(own + 1, max=5)).all(), "top_k blocks when that many exist"
    ordered = torch.where(valid, idx, 10**6)
    assert ((ordered[..., 1:] > ordered[..., :-1]) | (ordered[..., 1:] == 10**6)).all(), "ascending, -1 last"


@pytest.mark.parametrize("lengths,hq,hkv,block,top_k", [([37, 20], 4, 2, 8, 3), ([45], 2, 1, 16, 2)])
def test_naive_matches_brute_force(lengths, hq, hkv, block, top_k):
    q, k, v, cu, max_len = packed(lengths, hq, hkv, 8, seed=7)
    scale = 8 ** -0.5
    sel = brute_select(q.detach(), k.detach(), cu, block, top_k)
    ours = grads(lambda q, k, v: moba_attn(q, k, v, cu, max_len, block, top_k, "naive"), q, k, v)
    ref = grads(lambda q, k, v: brute_attn(q, k, v, cu, block, sel, scale), q, k, v)
    assert_same(ours, ref)


@pytest.mark.parametrize("block,top_k", [(8, 16), (16, 4), (128, 1)])
def test_enough_blocks_is_full_attention(block, top_k):
    """top_k >= number of blocks, or block_size >= sequence length: exactly full causal attention."""
    q, k, v, cu, max_len = packed([64, 29, 41], 4, 2, 16, seed=block)
    ours = grads(lambda q, k, v: moba_attn(q, k, v, cu, max_len, block, top_k, "naive"), q, k, v)
    ref = grads(lambda q, k, v: full_attn(q, k, v, cu, max_len), q, k, v)
    assert_same(ours, ref)


def test_top1_is_block_diagonal():
    """top_k == 1: each block attends causally to itself only: full attention with every block a document."""
    lengths, block = [40, 19, 64], 16
    q, k, v, cu, max_len = packed(lengths, 4, 2, 16, seed=11)
    pieces = []
    for n in lengths:
        pieces += [min(block, n - s) for s in range(0, n, block)]
    cu_blocks = torch.tensor([0] + list(torch.tensor(pieces).cumsum(0)), dtype=torch.int32)
    ours = grads(lambda q, k, v: moba_attn(q, k, v, cu, max_len, block, 1, "naive"), q, k, v)
    ref = grads(lambda q, k, v: full_attn(q, k, v, cu_blocks, block), q, k, v)
    assert_same(ours, ref)


def test_moba_is_sparse_not_full():
    """With fewer selected blocks than exist, MoBA must differ from full attention (the test above can fail)."""
    q, k, v, cu, max_len = packed([128], 2, 2, 16, seed=5, requires_grad=False)
    diff = moba_attn(q, k, v, cu, max_len, 16, 2, "naive") - full_attn(q, k, v, cu, max_len)
    assert diff[:32].abs().max() < 1e-12 and diff[32:].abs().max() > 1e-3


def test_gate_has_no_gradient():
    """Gradients equal those of attention under the (constant) selection mask."""
    q, k, v, cu, max_len = packed([48], 2, 2, 8, seed=2)
    sel = brute_select(q.detach(), k.detach(), cu, 16, 2)
    ours = grads(lambda q, k, v: moba_attn(q, k, v, cu, max_len, 16, 2, "naive", softmax_scale=0.3), q, k, v)
    ref = grads(lambda q, k, v: brute_attn(q, k, v, cu, 16, sel, 0.3), q, k, v)
    assert_same(ours, ref)


def test_bad_inputs_raise_clear_errors():
    q, k, v, cu, max_len = packed([32], 4, 3, 8, requires_grad=False)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        moba_attn(q, k, v, cu, max_len, 16, 2, "naive")
    q, k, v, cu, max_len = packed([32], 4, 2, 8, requires_grad=False)
    with pytest.raises(ValueError, match="top_k"):
        moba_attn(q, k, v, cu, max_len, 16, 0, "naive")
    with pytest.raises(ValueError, match="backend"):
        moba_attn(q, k, v, cu, max_len, 16, 2, "fast")
    with pytest.raises(ValueError, match="cu_seqlens"):
        moba_attn(q, k, v, torch.tensor([0, 31], dtype=torch.int32), max_len, 16, 2, "naive")


def test_inputs_the_kernels_would_mishandle_raise_clear_errors():
    q, k, v, cu, max_len = packed([32], 4, 2, 8, requires_grad=False)
    for bad in (torch.tensor([0.0, 32.0]), torch.tensor([0, 40, 32])):
        with pytest.raises(ValueError, match="cu_seqlens"):
            moba_attn(q, k, v, bad, max_len, 16, 2, "naive")
        with pytest.raises(ValueError, match="cu_seqlens"):
            full_attn(q, k, v, bad, max_len)
    with pytest.raises(ValueError, match="dtype"):
        moba_attn(q, k, v.float(), cu, max_len, 16, 2, "naive")


@pytest.mark.parametrize("backend", ["naive", "auto"])
def test_meaningless_arguments_raise_clear_errors(backend):
    """Inputs that ran (integer tensors gave integer 'attention', a negative scale NaNs through the full-attention
    path) or died inside torch (zero heads, a float block size, offsets as a list) name the bad argument."""
    q, k, v, cu, max_len = packed([32], 4, 2, 8, requires_grad=False)
    cases = [
        ((q.long(), k.long(), v.long(), cu, max_len, 16, 2), {}, "floating point"),
        ((q, k, v, cu, max_len, 16, 2), {"softmax_scale": -1.0}, "softmax_scale=-1.0 must be a finite number > 0"),
        ((q, k, v, cu, max_len, 16, 2), {"softmax_scale": math.inf}, "softmax_scale=inf must be"),  # NaNs before
        ((q, k, v, cu, max_len, 16, 2), {"softmax_scale": True}, "softmax_scale=True must be"),
        ((q, k, v, cu.to("meta"), max_len, 16, 2), {}, "cu_seqlens must hold values"),
        ((q[:, :0], k[:, :0], v[:, :0], cu, max_len, 16, 2), {}, "heads and head_dim must be >= 1"),
        ((q, k, v, cu, max_len, 2.5, 2), {}, "block_size=2.5 must be an integer"),
        ((q, k, v, cu, max_len, 16, True), {}, "top_k=True must be an integer"),
        ((q, k, v, [0, 32], max_len, 16, 2), {}, "must be tensors"),
    ]
    for args, kwargs, match in cases:
        with pytest.raises(ValueError, match=re.escape(match)):
            moba_attn(*args, backend=backend, **kwargs)
    # integer types that are not int stay accepted
    out = moba_attn(q, k, v, cu, max_len, torch.tensor(16), np.int64(2), backend=backend, softmax_scale=1)
    assert torch.equal(out, moba_attn(q, k, v, cu, max_len, 16, 2, backend=backend, softmax_scale=1.0))
    with pytest.raises(ValueError, match="softmax_scale"):
        full_attn(q, k, v, cu, max_len, -1.0)


def test_triton_backend_refuses_float64():
    """The fused kernels accumulate in fp32: float64 (gradcheck's dtype) failed to compile on CUDA, and `auto`
    chose them for it (tests/gpu: `auto` now takes the reference there)."""
    from moba_train.ops.fused import check_supported

    with pytest.raises(ValueError, match="triton MoBA backend takes fp16, bf16 or fp32, got torch.float64"):
        check_supported(torch.zeros(8, 2, 16, dtype=torch.float64))


def test_empty_documents_and_empty_batches():
    """Zero-length documents (allowed by the varlen layout) change nothing; an empty batch gives empty outputs."""
    q, k, v, _, max_len = packed([37, 20], 4, 2, 8, seed=4)
    plain, padded = torch.tensor([0, 37, 57]), torch.tensor([0, 0, 37, 37, 57, 57])
    assert torch.equal(moba_select(q, k, plain, max_len, 8, 3), moba_select(q, k, padded, max_len, 8, 3))
    for fn in (lambda cu: moba_attn(q, k, v, cu, max_len, 8, 3, "naive"), lambda cu: full_attn(q, k, v, cu, max_len)):
        assert_same(grads(lambda *_: fn(plain), q, k, v), grads(lambda *_: fn(padded), q, k, v), tol=0)
    q0, k0, v0 = (x[:0].detach().requires_grad_() for x in (q, k, v))
    for cu in (torch.tensor([0]), torch.tensor([0, 0])):
        for out in (moba_attn(q0, k0, v0, cu, 0, 8, 3, "naive"), full_attn(q0, k0, v0, cu, 0)):
            assert out.shape == (0, 4, 8)
            # gradients for all three (zero-sized), so a training step over an empty shard still reaches k and v
            assert [g.shape for g in torch.autograd.grad(out.sum(), (q0, k0, v0))] == [(0, 4, 8), (0, 2, 8), (0, 2, 8)]
        assert moba_select(q0, k0, cu, 0, 8, 3).shape == (0, 4, 3)


def test_top_k_beyond_the_blocks_costs_nothing_more():
    """top_k past the longest document's blocks selects the same blocks: the op clamps it rather than allocating
    [T, Hq, top_k] tables (a top_k of 10**9 failed to allocate); moba_select pads its columns with -1."""
    q, k, v, cu, max_len = packed([70, 45], 4, 2, 8, seed=6)  # 5 blocks of 16 at most
    ref = moba_attn(q, k, v, cu, max_len, 16, 5, "naive")
    assert torch.equal(moba_attn(q, k, v, cu, max_len, 16, 10**9, "naive"), ref)
    wide = moba_select(q, k, cu, max_len, 16, 40)
    assert torch.equal(wide[..., :5], moba_select(q, k, cu, max_len, 16, 5)) and (wide[..., 5:] == -1).all()
    scores = torch.randn(3, 7)
    assert pick_blocks(scores, torch.tensor([6, 0, 3]), 10**9).shape == (3, 8)



def test_block_far_longer_than_the_documents_is_full_attention():
    """A block longer than every document means full causal attention (DESIGN.md); the reference's block means
    padded each document to a whole block first, so 2**40 failed to allocate (and 2**24 took 8.6 GB)."""
    q, k, v, cu, max_len = packed([10, 7], 2, 2, 16, seed=8)
    ref = moba_attn(q, k, v, cu, max_len, 16, 1, "naive")  # one block per document
    assert torch.equal(moba_attn(q, k, v, cu, max_len, 2**40, 1, "naive"), ref)
    assert torch.equal(moba_select(q, k, cu, max_len, 2**40, 1), moba_select(q, k, cu, max_len, 16, 1))

def test_reference_stays_fp32_under_autocast():
    """The trainer runs the model under bf16 autocast: the reference gate's scores and naive attention's
    products must not drop to bf16 there (they would select other blocks than the fused gate)."""
    q, k, v, cu, max_len = packed([512], 4, 2, 16, requires_grad=False, seed=9)
    q, k, v = q.float(), k.float(), v.float()
    want = moba_select(q, k, cu, max_len, 16, 4), moba_attn(q, k, v, cu, max_len, 16, 4, "naive")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = moba_select(q, k, cu, max_len, 16, 4), moba_attn(q, k, v, cu, max_len, 16, 4, "naive")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_auto_backend_on_cpu_and_the_check_it_uses_on_cuda():
    """auto: naive on a CPU; on CUDA it asks the fused backend whether it takes the shape (GPU test: the picks):
    any head_dim whose padded power of two fits the kernels' rows."""
    from moba_train.ops import resolve_backend
    from moba_train.ops.fused import check_supported

    q = torch.empty(4, 2, 80)
    assert resolve_backend("auto", q) == "naive"
    with pytest.raises(RuntimeError, match="CUDA"):  # head_dim 80 runs padded to 128: only the device is refused
        check_supported(q)
    for wide in (torch.empty(4, 2, 300, dtype=torch.bfloat16), torch.empty(4, 2, 136)):  # over 256; fp32 over 128
        with pytest.raises(ValueError, match="up to head_dim"):
            check_supported(wide)


def test_auto_runs_full_attention_where_every_block_is_selected(monkeypatch):
    """Documents of at most top_k blocks: `auto` takes full attention (same values as the MoBA reference); one
    more block and it runs MoBA."""
    import moba_train.ops as ops

    q, k, v, cu, max_len = packed([64, 29, 41], 4, 2, 16, seed=6)
    calls = []
    monkeypatch.setattr(ops, "full_attn", lambda *a: calls.append(1) or full_attn(*a))
    ref = grads(lambda q, k, v: moba_attn(q, k, v, cu, max_len, 16, 4, "naive"), q, k, v)
    assert_same(grads(lambda q, k, v: moba_attn(q, k, v, cu, max_len, 16, 4, "auto"), q, k, v), ref)
    assert calls == [1]
    moba_attn(q, k, v, cu, max_len, 16, 3, "auto")  # 64 tokens = 4 blocks > top_k 3
    assert calls == [1]


def test_full_attention_over_equal_documents_is_one_batched_call():
    """Rows of one length go to SDPA as a batch: the same as one call per document (and as MoBA covering all)."""
    from moba_train.ops.full import per_doc_sdpa

    q, k, v, cu, max_len = packed([32, 32, 32], 4, 2, 8, seed=12)
    spans = [(0, 32), (32, 64), (64, 96)]
    assert_same(grads(lambda q, k, v: full_attn(q, k, v, cu, max_len), q, k, v),
                grads(lambda q, k, v: per_doc_sdpa(q, k, v, spans, None), q, k, v))
    assert_same(grads(lambda q, k, v: full_attn(q, k, v, cu, max_len), q, k, v),
                grads(lambda q, k, v: moba_attn(q, k, v, cu, max_len, 8, 4, "naive"), q, k, v))


def test_flash_groups_stay_under_the_index_limit(monkeypatch):
    """Packed full attention splits documents into calls within FA2's 32-bit index; every document once, in order."""
    from moba_train.ops import full

    monkeypatch.setattr(full, "CHUNK_ROWS", 4000)
    spans, start = [], 0
    for n in (300, 50, 900, 10, 2000, 120, 40):
        spans.append((start, start + n))
        start += n
    groups = full.flash_groups(spans, heads=2)
    assert [s for g in groups for s in g] == spans
    for g in groups:
        assert len(g) == 1 or (g[-1][1] - g[0][0] + full.SEG_ROWS * len(g)) * 2 <= 4000
    assert [len(g) for g in groups] == [4, 1, 2]  # 2000 tokens + 128 > 4000 / 2: alone (SDPA takes it)


def test_equal_documents_split_into_calls_within_the_index_limit(monkeypatch):
    from moba_train.ops import full

    q, k, v, cu, max_len = packed([16] * 6, 4, 2, 8, seed=13)
    want = grads(lambda q, k, v: full.equal_docs_sdpa(q, k, v, 16, None), q, k, v)
    monkeypatch.setattr(full, "CHUNK_ROWS", 2 * 16 * 4)  # two documents per call
    assert_same(grads(lambda q, k, v: full.equal_docs_sdpa(q, k, v, 16, None), q, k, v), want)


@pytest.mark.parametrize("length, block, top_k", [(300, 32, 3), (256, 64, 8), (200, 64, 2), (97, 16, 1), (130, 64, 3)])
def test_attended_share_counts_the_mask(length, block, top_k):
    """`attended_share` (a formula) against the pairs the reference's mask lets through on a real selection."""
    q, k, _, cu, max_len = packed([length], 2, 1, 8, seed=3, requires_grad=False)
    idx = moba_select(q, k, cu, max_len, block, top_k)
    seen = int(allowed_keys(idx, block, 0, length).sum())
    assert attended_share(length, block, top_k) == seen / (2 * length * (length + 1) // 2)
