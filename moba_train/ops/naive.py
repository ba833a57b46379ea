"""Dense masked MoBA: the reference every other backend is checked against. Quadratic per document."""

import torch
from torch import Tensor

from moba_train.ops.gate import doc_spans, select_doc


def selection_mask(idx: Tensor, block_size: int) -> Tensor:
    """[L, H, top_k] selected blocks -> [H, L, L] bool mask of allowed (query, key) pairs, causal."""
    length, heads, _ = idx.shape
    n_blocks = -(-length // block_size)
    picked = torch.zeros(length, heads, n_blocks + 1, dtype=torch.bool, device=idx.device)
    picked.scatter_(2, torch.where(idx < 0, n_blocks, idx.long()), True)  # -1 lands in a spare column
    key_block = torch.arange(length, device=idx.device) // block_size
    mask = picked[:, :, key_block].permute(1, 0, 2)  # [H, Lq, Lk]
    causal = torch.ones(length, length, dtype=torch.bool, device=idx.device).tril()
    return mask & causal


def attend_masked(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """Softmax attention (fp32 or wider) of one document under an [Hq, L, L] mask; K/V heads shared by GQA."""
    group = q.shape[1] // k.shape[1]
    wide = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf = (x.to(wide).transpose(0, 1) for x in (q, k, v))  # [H, L, D]
    kf, vf = kf.repeat_interleave(group, 0), vf.repeat_interleave(group, 0)
    scores = (qf @ kf.transpose(1, 2)) * scale
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return (probs @ vf).transpose(0, 1).to(q.dtype)


def moba_attn(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, block_size: int,
              top_k: int, softmax_scale: float) -> Tensor:
    outs = []
    for start, end in doc_spans(cu_seqlens):
        qd, kd, vd = q[start:end], k[start:end], v[start:end]
        mask = selection_mask(select_doc(qd, kd, block_size, top_k), block_size)
        outs.append(attend_masked(qd, kd, vd, mask, softmax_scale))
    return torch.cat(outs)
