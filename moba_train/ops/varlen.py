"""MoBA on flash varlen kernels: the published algorithm, the baseline the fused backend must beat.

Two flash passes merged by log-sum-exp:
- own block: causal varlen attention with every block as its own sequence (GQA handled by the kernel);
- past blocks: every (row, selected past block) pair becomes one query row; rows are grouped into one
  varlen sequence per (KV head, block), whose keys are that block of that KV head. K, V are laid out
  once as [Hkv * T, 1, D] so each segment is a contiguous key range; the G query heads of a group share
  the segment, so K and V are never copied per query head.
The backward reruns both flash backward kernels with the merged output and LSE (the gradient of one softmax
over the union of blocks). Kernels: `moba_train/ops/flash.py`.
"""

import torch
from torch import Tensor

from moba_train.ops.flash import CHUNK_ROWS, SEG_ROWS, flash_bwd, flash_fwd
from moba_train.ops.full import flash_takes
from moba_train.ops.gate import moba_select
from moba_train.ops.offsets import TensorMemo, host_offsets, longest_doc

_blocks = TensorMemo()


def _blocks_of(cu_seqlens: Tensor, block_size: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(block starts as varlen offsets [n_blocks + 1], each token's document block 0 and own block [T]), built
    once per cu_seqlens tensor like the fused backend's layout."""
    def build():
        cu = host_offsets(cu_seqlens)
        starts = [s for a, b in zip(cu[:-1], cu[1:]) for s in range(a, b, block_size)]
        blk_start = torch.tensor(starts + [cu[-1]], device=device, dtype=torch.int32)
        tok_blk = torch.repeat_interleave(torch.arange(len(starts), device=device), blk_start.diff().long(),
                                          output_size=cu[-1])
        doc_starts = set(cu[:-1])
        doc_first = torch.tensor([i for i, s in enumerate(starts) if s in doc_starts], device=device)
        first = doc_first[torch.searchsorted(doc_first, tok_blk, right=True) - 1]
        return blk_start, first, tok_blk - first
    return _blocks.get((cu_seqlens,), (block_size, device), build)


def _plan(q: Tensor, k: Tensor, cu_seqlens: Tensor, max_seqlen: int, block_size: int, top_k: int):
    """Block boundaries, and the (row, past block) pairs grouped per (KV head, block)."""
    tokens, hq, _ = q.shape
    hkv = k.shape[1]
    idx = moba_select(q, k, cu_seqlens, max_seqlen, block_size, top_k)
    blk_start, first, own = _blocks_of(cu_seqlens, block_size, q.device)
    n_blocks = blk_start.numel() - 1
    own = own[:, None, None]
    past = idx[:, :, : top_k - 1].long()
    valid = (past >= 0) & (past < own)
    hk = (torch.arange(hq, device=q.device) // (hq // hkv))[None, :, None]
    seg = torch.where(valid, hk * n_blocks + first[:, None, None] + past, hkv * n_blocks).flatten()
    seg, order = torch.sort(seg, stable=True)
    n = int(torch.searchsorted(seg, hkv * n_blocks))
    rows = order[:n] // max(top_k - 1, 1)  # (token, head) row of each pair, grouped by segment
    counts = torch.bincount(seg[:n], minlength=hkv * n_blocks)
    cu_q = torch.zeros(hkv * n_blocks + 1, device=q.device, dtype=torch.int32)
    torch.cumsum(counts, 0, out=cu_q[1:])
    # segment (hk, block) keys: rows hk * T + block range of the [Hkv * T] key layout
    cu_k = (torch.arange(hkv, device=q.device)[:, None] * tokens + blk_start[None, :-1]).flatten()
    cu_k = torch.cat([cu_k, cu_k.new_tensor([hkv * tokens])]).int()
    return blk_start, rows, cu_q, cu_k, _chunks(cu_q.tolist(), cu_k.tolist(), CHUNK_ROWS)


def _chunks(cu_q: list, cu_k: list, limit: int) -> list:
    """[(row range, key range, local cu_q, local cu_k, max_q)] covering every row once, each call's
    rows + SEG_ROWS * segments <= limit. A segment too large on its own is cut into pieces over the same keys
    (their dK/dV add up in the backward)."""
    out, s0 = [], 0
    n_seg = len(cu_q) - 1
    cost = lambda a, b: cu_q[b] - cu_q[a] + SEG_ROWS * (b - a)  # noqa: E731  segments a..b-1
    while s0 < n_seg:
        keys = (cu_k[s0], cu_k[s0 + 1])
        if cost(s0, s0 + 1) > limit:
            piece = limit - SEG_ROWS
            for r0 in range(cu_q[s0], cu_q[s0 + 1], piece):
                r1 = min(r0 + piece, cu_q[s0 + 1])
                out.append(((r0, r1), keys, [0, r1 - r0], [0, keys[1] - keys[0]], r1 - r0))
            s0 += 1
            continue
        s1 = s0 + 1
        while s1 < n_seg and cost(s0, s1 + 1) <= limit:
            s1 += 1
        if cu_q[s1] > cu_q[s0]:
            max_q = max(b - a for a, b in zip(cu_q[s0:s1], cu_q[s0 + 1:s1 + 1]))
            out.append(((cu_q[s0], cu_q[s1]), (cu_k[s0], cu_k[s1]), [x - cu_q[s0] for x in cu_q[s0:s1 + 1]],
                        [x - cu_k[s0] for x in cu_k[s0:s1 + 1]], max_q))
        s0 = s1
    return out


class VarlenMoba(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, block_size, top_k, scale):
        tokens, hq, dim = q.shape
        hkv = k.shape[1]
        blk_start, rows, cu_q, cu_k, chunks = _plan(q, k, cu_seqlens, max_seqlen, block_size, top_k)
        bmax = min(block_size, longest_doc(cu_seqlens))  # from the memoised offsets, not the caller's max_seqlen
        out_self, lse_self, st_self = flash_fwd(q, k, v, blk_start, blk_start, bmax, bmax, True, scale)
        lse = lse_self.t()  # [T, Hq]
        out, ctx.past_state = out_self, None
        if rows.numel():
            kt, vt = (x.transpose(0, 1).reshape(hkv * tokens, 1, dim) for x in (k, v))
            q_flat = q.reshape(tokens * hq, 1, dim)
            out_sel = q.new_empty(rows.numel(), dim)
            lse_sel = torch.empty(rows.numel(), device=q.device, dtype=torch.float32)
            ctx.past_state = []
            for (r0, r1), (k0, k1), cq, ck, max_q in chunks:
                cq, ck = (torch.tensor(x, device=q.device, dtype=torch.int32) for x in (cq, ck))
                o, l_c, st = flash_fwd(q_flat[rows[r0:r1]], kt[k0:k1], vt[k0:k1], cq, ck, max_q, bmax, False, scale)
                out_sel[r0:r1], lse_sel[r0:r1] = o[:, 0], l_c[0, : r1 - r0]
                ctx.past_state.append(st)
            # merge: lse over own + all selected blocks, then weight every partial output by exp(lse_i - lse)
            flat_lse = lse.reshape(-1).clone()
            mx = flat_lse.clone().scatter_reduce_(0, rows, lse_sel, "amax")
            total = torch.exp(flat_lse - mx).index_add_(0, rows, torch.exp(lse_sel - mx[rows]))
            lse_all = mx + torch.log(total)
            merged = out_self.reshape(-1, dim).float() * torch.exp(flat_lse - lse_all)[:, None]
            for r0 in range(0, rows.numel(), CHUNK_ROWS):  # bounded fp32 temporaries
                r = rows[r0:r0 + CHUNK_ROWS]
                w = torch.exp(lse_sel[r0:r0 + CHUNK_ROWS] - lse_all[r])[:, None]
                merged.index_add_(0, r, out_sel[r0:r0 + CHUNK_ROWS].float() * w)
            out = merged.to(q.dtype).view(tokens, hq, dim)
            lse = lse_all.view(tokens, hq)
        ctx.save_for_backward(q, k, v, out, lse, blk_start, rows)
        ctx.meta = (bmax, chunks, scale, st_self)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward: an error, not a silent zero
    def backward(ctx, dout):
        q, k, v, out, lse, blk_start, rows = ctx.saved_tensors
        bmax, chunks, scale, st_self = ctx.meta
        tokens, hq, dim = q.shape
        hkv = k.shape[1]
        dout = dout.contiguous()
        lse_h = lse.t().contiguous()
        dq, dk, dv = flash_bwd(dout, q, k, v, out, lse_h, blk_start, blk_start, bmax, bmax, True, scale, st_self)
        if chunks:
            kt, vt = (x.transpose(0, 1).reshape(hkv * tokens, 1, dim) for x in (k, v))
            dk_t, dv_t = torch.zeros_like(kt), torch.zeros_like(vt)
            dq = dq.reshape(-1, dim)
            flat = lambda x, r: x.reshape(tokens * hq, 1, dim)[r]  # noqa: E731
            for ((r0, r1), (k0, k1), cq, ck, max_q), st in zip(chunks, ctx.past_state):
                cq, ck = (torch.tensor(x, device=q.device, dtype=torch.int32) for x in (cq, ck))
                r = rows[r0:r1]
                lse_c = lse.reshape(-1)[r][None].contiguous()
                dq_c, dk_c, dv_c = flash_bwd(flat(dout, r), flat(q, r), kt[k0:k1], vt[k0:k1], flat(out, r), lse_c, cq,
                                             ck, max_q, bmax, False, scale, st)
                dk_t[k0:k1] += dk_c  # chunks' key ranges overlap where a segment was cut into pieces
                dv_t[k0:k1] += dv_c
                dq.index_add_(0, r, dq_c[:, 0])
            dq = dq.view(tokens, hq, dim)
            dk = dk + dk_t.view(hkv, tokens, dim).transpose(0, 1)
            dv = dv + dv_t.view(hkv, tokens, dim).transpose(0, 1)
        return dq, dk, dv, None, None, None, None, None


def moba_attn(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, block_size: int, top_k: int,
              softmax_scale: float) -> Tensor:
    if not flash_takes(q):
        raise RuntimeError(f"varlen MoBA backend needs what the flash varlen kernels take: CUDA (sm80+) fp16/bf16 "
                           f"tensors with head_dim a multiple of 8 up to 256; got {q.dtype} on {q.device}, "
                           f"head_dim {q.shape[-1]}")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return VarlenMoba.apply(q, k, v, cu_seqlens.int(), max_seqlen, block_size, top_k, softmax_scale)
