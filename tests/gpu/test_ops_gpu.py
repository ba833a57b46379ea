"""Fast backends on the GPU at real sizes: triton and varlen against the dense reference (bf16).

The reference runs in fp32 on the same bf16 inputs. Tolerances as in the reference repo: allclose 2e-2, max abs
4e-2, mean abs 4e-4, absolute for tensors whose entries are at most 1, else relative to the largest entry
(gradients of dK, dV sum over many rows and grow with the sequence). The 128K-token case is too large for the
dense reference: there triton is checked against varlen (an independent implementation) and its output rows
against exact fp32 attention on sampled rows.
"""

import pytest
import torch

from conftest import compiled_variants

from moba_train.ops import moba_attn
from moba_train.ops.fused import moba_select  # the fused gate itself, never the dispatcher's fallback
from moba_train.ops.gate import moba_select as reference_select

pytestmark = pytest.mark.gpu
DEV = "cuda"


def packed(lengths, hq, hkv, dim, seed, dtype=torch.bfloat16):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    total = sum(lengths)
    q, k, v = (torch.randn(total, h, dim, generator=gen, device=DEV, dtype=dtype) for h in (hq, hkv, hkv))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    return q, k, v, cu


def upstream(q, seed=11):
    """The gradient fed back through the op: seeded, so a test's inputs do not depend on the tests before it."""
    return torch.randn(q.shape, generator=torch.Generator(device=DEV).manual_seed(seed), device=DEV, dtype=q.dtype)


def agreeing_rows(q, k, cu, max_len, block_size, top_k, ref_q=None, ref_k=None):
    """[T, Hq] rows whose fused selection equals the reference gate's. A near-tie may flip one selection under
    another fp32 summation order; such a row computes a different (equally valid) function, so its output is not
    compared and its upstream gradient is zeroed, which takes it out of dq, dk and dv on both sides."""
    same = (moba_select(q, k, cu, max_len, block_size, top_k)
            == reference_select(q if ref_q is None else ref_q, k if ref_k is None else ref_k, cu, max_len,
                                block_size, top_k)).all(-1)
    assert same.float().mean() > 0.999
    return same


def run(backend, q, k, v, cu, max_len, block_size, top_k, weight):
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out = moba_attn(*leaves, cu, max_len, block_size, top_k, backend=backend)
    return [out.detach(), *torch.autograd.grad(out, leaves, weight)]


def assert_close(name, got, ref, rows=None):
    scale = ref.abs().max().float().clamp_min(1.0)
    got, ref = got.float() / scale, ref.float() / scale
    if rows is not None:
        got, ref = got[rows], ref[rows]
    diff = (got - ref).abs()
    assert torch.isfinite(got).all(), name
    assert torch.allclose(got, ref, atol=2e-2, rtol=2e-2), (name, diff.max().item())
    assert diff.max() <= 4e-2, (name, diff.max().item())
    assert diff.mean() <= 4e-4, (name, diff.mean().item())


GRID = [  # (doc lengths, Hq, Hkv, head_dim, block_size, top_k)
    ((1000, 3000, 517), 8, 2, 128, 256, 3),
    ((4096,), 4, 4, 64, 64, 8),
    ((700, 1300, 2100), 8, 8, 128, 512, 2),
    ((2500, 1111), 4, 1, 64, 128, 5),
    ((3000,), 2, 2, 128, 512, 8),
    ((1500, 1500), 8, 4, 64, 192, 1),
    ((999, 2048), 1, 1, 128, 64, 4),
    ((4000,), 8, 2, 128, 128, 6),
    ((0, 1500, 0, 900, 0), 4, 2, 128, 256, 3),  # empty documents (the varlen layout allows them)
]


# fp16, top_k 64 over 128 blocks, 4096-token blocks, head_dim 96 (zero-padded to 128 by the fused op) and 256
EXTRA = [(((8192,), 4, 2, 64, 64, 64), torch.bfloat16), (((1500, 2600), 8, 2, 128, 256, 4), torch.float16),
         (((9000, 4100), 8, 2, 128, 4096, 3), torch.bfloat16),  # the tile configs of 4096-blocks
         (((1500, 2600), 8, 2, 96, 256, 4), torch.bfloat16),
         (((1500, 2600), 4, 2, 256, 256, 4), torch.bfloat16)]  # 512-byte rows: the widest tile configs


@pytest.mark.parametrize("case", [GRID[0]], ids=str)
def test_triton_fp32_matches_naive(case):
    """fp32 takes the `ieee` dots and the narrow tile configs (rows of 512 bytes at head_dim 128)."""
    lengths, hq, hkv, dim, block_size, top_k = case
    q, k, v, cu = packed(lengths, hq, hkv, dim, seed=3, dtype=torch.float32)
    same = agreeing_rows(q, k, cu, max(lengths), block_size, top_k, q.double(), k.double())
    weight = upstream(q) * same[..., None]
    ref = run("naive", q.double(), k.double(), v.double(), cu, max(lengths), block_size, top_k, weight.double())
    got = run("triton", q, k, v, cu, max(lengths), block_size, top_k, weight)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        rows = same if name == "out" else slice(None)
        err = ((a.double() - b)[rows].abs().max() / b.abs().max()).item()
        assert err < 1e-4, (name, err)


@pytest.mark.parametrize("backend", ["triton", "varlen"])
@pytest.mark.parametrize("case,dtype", [(c, torch.bfloat16) for c in GRID] + EXTRA, ids=str)
def test_backend_matches_naive(backend, case, dtype):
    lengths, hq, hkv, dim, block_size, top_k = case
    q, k, v, cu = packed(lengths, hq, hkv, dim, seed=hash(case) % 1000, dtype=dtype)
    same = agreeing_rows(q, k, cu, max(lengths), block_size, top_k)
    weight = upstream(q) * same[..., None]
    ref = run("naive", q.float(), k.float(), v.float(), cu, max(lengths), block_size, top_k, weight.float())
    got = run(backend, q, k, v, cu, max(lengths), block_size, top_k, weight)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert_close(f"{backend} {name}", a, b, same if name == "out" else None)


# bf16: the split-mean tensor-core path; fp16: the same with the queries split in two bf16 parts
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", GRID, ids=str)
def test_fused_select_is_exact(case, dtype):
    lengths, hq, hkv, dim, block_size, top_k = case
    q, k, _, cu = packed(lengths, hq, hkv, dim, seed=7, dtype=dtype)
    got = moba_select(q, k, cu, max(lengths), block_size, top_k)
    assert torch.equal(got, reference_select(q, k, cu, max(lengths), block_size, top_k))


@pytest.mark.parametrize("lengths,path", [((700, 1300, 0, 2100, 517), "packed"), ((1024, 1024, 0, 1024), "batched")])
def test_full_attention_in_one_call(lengths, path, monkeypatch):
    """Documents of different lengths take one flash varlen call, of one length one batched SDPA call: the same
    results as per-document SDPA in fp32."""
    from moba_train.ops import full, full_attn
    from moba_train.ops.full import per_doc_sdpa

    taken, packed_call, batched_call = [], full.PackedCausal.apply, full.equal_docs_sdpa
    monkeypatch.setattr(full.PackedCausal, "apply", lambda *a: taken.append("packed") or packed_call(*a))
    monkeypatch.setattr(full, "equal_docs_sdpa", lambda *a: taken.append("batched") or batched_call(*a))
    q, k, v, cu = packed(lengths, 8, 2, 128, seed=4)
    weight = upstream(q)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out = full_attn(*leaves, cu, max(lengths))
    assert taken == [path]
    got = [out.detach(), *torch.autograd.grad(out, leaves, weight)]
    spans = [(a, b) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()) if b > a]
    wide = [x.float().requires_grad_() for x in (q, k, v)]
    ref_out = per_doc_sdpa(*wide, spans, None)
    ref = [ref_out.detach(), *torch.autograd.grad(ref_out, wide, weight.float())]
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert_close(f"packed full {name}", a, b)


def test_auto_picks_triton_where_it_applies():
    from moba_train.ops import resolve_backend

    assert resolve_backend("auto", torch.empty(1, 1, 128, device=DEV, dtype=torch.bfloat16)) == "triton"
    # other head sizes run zero-padded to a power of two: 80 -> 128 (fp32 rows up to 512 bytes, so 128 at most)
    assert resolve_backend("auto", torch.empty(1, 1, 80, device=DEV, dtype=torch.bfloat16)) == "triton"
    assert resolve_backend("auto", torch.empty(1, 1, 80, device=DEV, dtype=torch.float32)) == "triton"
    assert resolve_backend("auto", torch.empty(1, 1, 160, device=DEV, dtype=torch.float32)) == "naive"
    assert resolve_backend("auto", torch.empty(1, 1, 128)) == "naive"
    # float64 (gradcheck's dtype): the reference, not kernels that accumulate in fp32 (it failed to compile)
    assert resolve_backend("auto", torch.empty(1, 1, 16, device=DEV, dtype=torch.float64)) == "naive"


def test_varlen_in_small_chunks(monkeypatch):
    """The past pass in chunks far below FA2's index limit: several segments per call, and block 0's segments
    cut into pieces over the same keys (their dK/dV add up); results as in one call."""
    from moba_train.ops import varlen

    lengths, hq, hkv, dim, block_size, top_k = (4000,), 8, 2, 128, 256, 3
    q, k, v, cu = packed(lengths, hq, hkv, dim, seed=9)
    weight = upstream(q)
    whole = run("varlen", q, k, v, cu, max(lengths), block_size, top_k, weight)
    monkeypatch.setattr(varlen, "CHUNK_ROWS", 3000)
    _, rows, cu_q, cu_k, chunks = varlen._plan(q, k, cu, max(lengths), block_size, top_k)
    assert len(chunks) > 4 and max(r1 - r0 for (r0, r1), *_ in chunks) < max(cu_q.diff().tolist())
    for name, a, b in zip(("out", "dq", "dk", "dv"), run("varlen", q, k, v, cu, max(lengths), block_size, top_k,
                                                          weight), whole):
        assert_close(f"chunked {name}", a, b)


def test_fused_op_queues_without_syncs():
    """After a step's first layer has read cu_seqlens, forward and backward never wait for the GPU: the host
    keeps queueing kernels (any synchronising call raises in this mode)."""
    lengths, hq, hkv, dim, block_size, top_k = (1000, 3000, 517), 8, 2, 128, 256, 3
    q, k, v, cu = packed(lengths, hq, hkv, dim, seed=5)
    weight = upstream(q)
    first = run("triton", q, k, v, cu, max(lengths), block_size, top_k, weight)
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = run("triton", q, k, v, cu, max(lengths), block_size, top_k, weight)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, b in zip(first, again):
        assert torch.equal(a, b)



def test_fused_op_replays_in_a_cuda_graph():
    """Forward and backward captured once in a CUDA graph and replayed on new values in the same buffers give the
    bits an eager call gives on those values: nothing in the op reads the GPU back or keeps host-side copies of
    q, k, v (cu_seqlens, read once before the capture, stays the same tensor)."""
    lengths, hq, hkv, dim, block_size, top_k = (1000, 3000, 517), 8, 2, 128, 256, 3
    q, k, v, cu = packed(lengths, hq, hkv, dim, seed=6)
    weight = upstream(q)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]

    def step():
        out = moba_attn(*leaves, cu, max(lengths), block_size, top_k, backend="triton")
        return [out, *torch.autograd.grad(out, leaves, weight)]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph asks
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    q2, k2, v2, _ = packed(lengths, hq, hkv, dim, seed=7)
    with torch.no_grad():
        for leaf, new in zip(leaves, (q2, k2, v2)):
            leaf.copy_(new)
    graph.replay()
    eager = run("triton", q2, k2, v2, cu, max(lengths), block_size, top_k, weight)
    for name, a, b in zip(("out", "dq", "dk", "dv"), captured, eager):
        assert torch.equal(a, b), name

def test_fused_op_compiles_once_across_packings():
    """Another packing of the same tokens (other block counts and tile offsets, one a multiple of 16) compiles no
    new kernel variant: a later training step never stalls on a compile."""
    from moba_train.ops.fused import bwd, bwd_kv, bwd_q, fwd, gate, means, routing

    kernels = (fwd._past_kernel, fwd._past_block_kernel, fwd._own_kernel, bwd._rows_kernel, bwd_kv.kv_kernel,
               bwd_q.dq_past_kernel, bwd_q.dq_own_kernel, gate._gate_kernel, means._means_kernel,
               routing._keys_kernel, routing._ends_kernel, routing._cut_kernel)
    hq, hkv, dim, block_size, top_k = 8, 2, 128, 64, 3
    counts = []
    for lengths in ((1000, 3000, 517), (65,) * 9 + (3932,)):  # 72 then 80 blocks, 4517 tokens each
        q, k, v, cu = packed(lengths, hq, hkv, dim, seed=len(lengths))
        run("triton", q, k, v, cu, max(lengths), block_size, top_k, torch.randn_like(q))
        counts.append(compiled_variants(*kernels))
    assert counts[0] == counts[1], counts


def exact_rows(q, k, v, idx, rows, block_size, scale):
    """fp32 MoBA output of sampled (token, head) rows of a single document, from the selection."""
    group = q.shape[1] // k.shape[1]
    outs = []
    for t, h in rows:
        keys = torch.cat([torch.arange(b * block_size, min((b + 1) * block_size, t + 1), device=DEV)
                          for b in idx[t, h].tolist() if b >= 0])
        s = (k[keys, h // group].float() @ q[t, h].float()) * scale
        outs.append(s.softmax(0) @ v[keys, h // group].float())
    return torch.stack(outs)


@pytest.mark.parametrize("block_size, top_k", [(128, 8), (512, 3)])
def test_triton_is_deterministic(block_size, top_k):
    """No atomics anywhere (dQ's past part is summed one slot launch at a time): two runs give the same bits."""
    q, k, v, cu = packed([9000, 7384], 8, 2, 128, seed=4)
    weight = upstream(q)
    first, second = (run("triton", q, k, v, cu, 9000, block_size, top_k, weight) for _ in range(2))
    for name, a, b in zip(("out", "dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("top_k", [2, 3])
def test_lane_gate_at_many_blocks(top_k, dtype, dim):
    """Documents of >= 128 blocks take the lane-wise top-k: the same selections as the round-by-round merge over
    the same scores, and the reference's wherever no near-tie flips under another fp32 summation order."""
    from moba_train.ops.fused.gate import gate_config, select
    from moba_train.ops.fused.layout import build_layout, query_tile

    lengths, block_size = [40000, 24000, 1536], 128
    q, k, _, cu = packed(lengths, 8, 2, dim, seed=5, dtype=dtype)
    layout = build_layout(cu, block_size, query_tile(block_size, False), q.device)
    assert gate_config(top_k, layout.max_doc_blocks, dim)["DEPTH"] == top_k - 1
    got = select(q, k, layout, top_k)
    assert torch.equal(got, select(q, k, layout, top_k, {"BLOCK_B": 32, "num_warps": 4, "DEPTH": 0}))
    same = (got == reference_select(q, k, cu, max(lengths), block_size, top_k)).all(-1)
    assert (~same).float().mean() < 1e-4


def test_128k_tokens():
    tokens, hq, hkv, dim, block_size, top_k = 128 * 1024, 8, 2, 128, 2048, 3
    q, k, v, cu = packed([tokens], hq, hkv, dim, seed=3)
    idx = moba_select(q, k, cu, tokens, block_size, top_k)
    ref_idx = reference_select(q, k, cu, tokens, block_size, top_k)
    same = (idx == ref_idx).all(-1)  # varlen takes the reference gate; near-ties may flip (see agreeing_rows)
    assert (~same).float().mean() < 1e-4
    weight = upstream(q) * same[..., None]
    got = run("triton", q, k, v, cu, tokens, block_size, top_k, weight)
    ref = run("varlen", q, k, v, cu, tokens, block_size, top_k, weight)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert_close(f"128K {name}", a, b, same if name == "out" else None)
    gen = torch.Generator(device=DEV).manual_seed(0)
    rows = torch.stack([torch.randint(0, tokens, (256,), generator=gen, device=DEV),
                        torch.randint(0, hq, (256,), generator=gen, device=DEV)], 1).tolist()
    want = exact_rows(q, k, v, idx, rows, block_size, dim ** -0.5)
    have = torch.stack([got[0][t, h].float() for t, h in rows])
    assert (have - want).abs().max() < 2e-2
