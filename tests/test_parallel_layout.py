"""Single-process pieces of context parallelism: shard layouts, batch sharding, local-vs-global attention."""

import pytest
import torch

import moba_train.parallel.offset_attn as offset
from moba_train.model.attention import FullCore, MobaCore
from moba_train.model.config import AttentionConfig
from moba_train.parallel.cp import layout_segments, local_index, shard_batch

from conftest import packed


@pytest.mark.parametrize("mode", ["allgather", "ulysses"])
@pytest.mark.parametrize("cp", [2, 3, 4])
def test_layouts_partition_the_stream(mode, cp):
    total = 2 * cp * 5
    held = torch.cat([local_index(total, cp, r, mode) for r in range(cp)])
    assert sorted(held.tolist()) == list(range(total))
    if mode == "allgather":  # zigzag: rank r holds chunks r and 2cp-1-r
        assert local_index(total, cp, 0, mode).tolist() == list(range(5)) + list(range(total - 5, total))


def test_shard_batch_keeps_global_positions_and_documents():
    ids = torch.arange(2 * 8).view(2, 8)
    cu = torch.tensor([0, 3, 8, 13, 16], dtype=torch.int32)
    batch = {"input_ids": ids, "labels": ids + 100, "cu_seqlens": cu}
    part = shard_batch(batch, 2, 1, "allgather")  # chunks 1 and 2 of 4: tokens 4..11
    assert part["input_ids"].tolist() == [list(range(4, 12))]
    assert part["labels"].tolist() == [list(range(104, 112))]
    assert part["positions"].tolist() == [[1, 2, 3, 4, 0, 1, 2, 3]]  # documents [3, 8) and [8, 13)
    assert torch.equal(part["cu_seqlens"], cu)


@pytest.mark.parametrize("kind", ["moba", "full"])
def test_local_queries_against_global_keys_match_the_whole(kind):
    q, k, v, cu, max_len = packed([13, 37, 1, 45], 4, 2, 16)
    acfg = AttentionConfig(block_size=8, top_k=3, backend="naive")
    core = MobaCore(acfg) if kind == "moba" else FullCore(acfg)
    grad = torch.randn_like(q)
    want = core(q, k, v, cu, max_len)
    want_grads = torch.autograd.grad((want * grad).sum(), (q, k, v))
    for cp in (2, 3):
        outs = []
        for rank in range(cp):
            idx = local_index(q.shape[0], cp, rank, "allgather")
            out = offset.offset_attn(core, q[idx], k, v, layout_segments(q.shape[0], cp, rank, "allgather"),
                                     cu, max_len)
            torch.testing.assert_close(out, want[idx], rtol=1e-10, atol=1e-10)
            outs.append((out * grad[idx]).sum())
        for got, exp in zip(torch.autograd.grad(sum(outs), (q, k, v)), want_grads):
            torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-10)
