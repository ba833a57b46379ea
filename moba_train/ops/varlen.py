"""MoBA on flash varlen kernels: the published algorithm, the baseline the fused backend must beat.

Two flash passes merged by log-sum-exp:
- own block: causal varlen attention with every block as its own sequence (GQA handled by the kernel);
- past blocks: every (row, selected past block) pair becomes one query row; rows are grouped into one
  varlen sequence per (KV head, block), whose keys are that block of that KV head. K, V are laid out
  once as [Hkv * T, 1, D] so each segment is a contiguous key range; the G query heads of a group share
  the segment, so K and V are never copied per query head.
The backward reruns both flash backward kernels with the merged output and LSE (the gradient of one softmax
over the union of blocks). Uses flash-attn when installed, else torch's own FA2 ops.
"""

import torch
from torch import Tensor

from moba_train.ops.gate import moba_select

try:  # optional dependency
    from flash_attn.flash_attn_interface import _flash_attn_varlen_backward, _flash_attn_varlen_forward
except ImportError:
    _flash_attn_varlen_forward = _flash_attn_varlen_backward = None


def _fwd(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    """-> out [N, H, D], lse [H, N] fp32, state the backward needs."""
    if _flash_attn_varlen_forward is not None:
        res = _flash_attn_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, scale, causal=causal)
        return res[0], res[1], None
    out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0,
                                                                        causal, False, scale=scale)
    return out, lse, (rng, unused)


def _bwd(do, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, state):
    if _flash_attn_varlen_backward is not None:
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _flash_attn_varlen_backward(do, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max_q, max_k, 0.0, scale,
                                    causal, -1, -1, 0.0, None, False)
        return dq, dk, dv
    return torch.ops.aten._flash_attention_backward(do, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.0, causal,
                                                    state[0], state[1], scale=scale)


def _plan(q: Tensor, k: Tensor, cu_seqlens: Tensor, max_seqlen: int, block_size: int, top_k: int):
    """Block boundaries, and the (row, past block) pairs grouped per (KV head, block)."""
    tokens, hq, _ = q.shape
    hkv = k.shape[1]
    idx = moba_select(q, k, cu_seqlens, max_seqlen, block_size, top_k)
    cu = cu_seqlens.tolist()
    starts = [s for a, b in zip(cu[:-1], cu[1:]) for s in range(a, b, block_size)]
    blk_start = torch.tensor(starts + [tokens], device=q.device, dtype=torch.int32)  # cu_seqlens of the blocks
    n_blocks = len(starts)
    tok_blk = torch.repeat_interleave(torch.arange(n_blocks, device=q.device), blk_start.diff().long(),
                                      output_size=tokens)
    doc_starts = set(cu[:-1])
    doc_first = torch.tensor([i for i, s in enumerate(starts) if s in doc_starts], device=q.device)
    first = doc_first[torch.searchsorted(doc_first, tok_blk, right=True) - 1]
    own = (tok_blk - first)[:, None, None]
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
    max_q = int(counts.max()) if n else 0
    return blk_start, rows, cu_q, cu_k, max_q


class VarlenMoba(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, block_size, top_k, scale):
        tokens, hq, dim = q.shape
        hkv = k.shape[1]
        blk_start, rows, cu_q, cu_k, max_q = _plan(q, k, cu_seqlens, max_seqlen, block_size, top_k)
        bmax = min(block_size, max_seqlen)
        out_self, lse_self, st_self = _fwd(q, k, v, blk_start, blk_start, bmax, bmax, True, scale)
        lse = lse_self.t()  # [T, Hq]
        out, ctx.past_state = out_self, None
        if rows.numel():
            kt, vt = (x.transpose(0, 1).reshape(hkv * tokens, 1, dim) for x in (k, v))
            q_sel = q.reshape(tokens * hq, 1, dim)[rows]
            out_sel, lse_sel, st_sel = _fwd(q_sel, kt, vt, cu_q, cu_k, max_q, bmax, False, scale)
            lse_sel = lse_sel[0, : rows.numel()]
            # merge: lse over own + all selected blocks, then weight every partial output by exp(lse_i - lse)
            flat_lse = lse.reshape(-1).clone()
            mx = flat_lse.clone().scatter_reduce_(0, rows, lse_sel, "amax")
            total = torch.exp(flat_lse - mx).index_add_(0, rows, torch.exp(lse_sel - mx[rows]))
            lse_all = mx + torch.log(total)
            merged = out_self.reshape(-1, dim).float() * torch.exp(flat_lse - lse_all)[:, None]
            merged.index_add_(0, rows, out_sel[:, 0].float() * torch.exp(lse_sel - lse_all[rows])[:, None])
            out = merged.to(q.dtype).view(tokens, hq, dim)
            lse = lse_all.view(tokens, hq)
            ctx.past_state = st_sel
        ctx.save_for_backward(q, k, v, out, lse, blk_start, rows, cu_q, cu_k)
        ctx.meta = (bmax, max_q, scale, st_self, rows.numel() > 0)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, blk_start, rows, cu_q, cu_k = ctx.saved_tensors
        bmax, max_q, scale, st_self, has_past = ctx.meta
        tokens, hq, dim = q.shape
        hkv = k.shape[1]
        dout = dout.contiguous()
        lse_h = lse.t().contiguous()
        dq, dk, dv = _bwd(dout, q, k, v, out, lse_h, blk_start, blk_start, bmax, bmax, True, scale, st_self)
        if has_past:
            kt, vt = (x.transpose(0, 1).reshape(hkv * tokens, 1, dim) for x in (k, v))
            sel = lambda x: x.reshape(tokens * hq, 1, dim)[rows]  # noqa: E731
            lse_sel = lse.reshape(-1)[rows][None].contiguous()
            dq_s, dk_t, dv_t = _bwd(sel(dout), sel(q), kt, vt, sel(out), lse_sel, cu_q, cu_k, max_q, bmax, False,
                                    scale, ctx.past_state)
            dq = dq.reshape(-1, dim).index_add_(0, rows, dq_s[:, 0]).view(tokens, hq, dim)
            dk = dk + dk_t.view(hkv, tokens, dim).transpose(0, 1)
            dv = dv + dv_t.view(hkv, tokens, dim).transpose(0, 1)
        return dq, dk, dv, None, None, None, None, None


def moba_attn(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, block_size: int, top_k: int,
              softmax_scale: float) -> Tensor:
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError("varlen MoBA backend needs CUDA fp16/bf16 tensors (flash varlen kernels)")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return VarlenMoba.apply(q, k, v, cu_seqlens.int(), max_seqlen, block_size, top_k, softmax_scale)
