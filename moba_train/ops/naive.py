"""Dense masked MoBA: the reference every other backend is checked against.

Quadratic per document, but processed in query chunks that only see keys up to the chunk's end, so neither
the [H, L, L] mask nor the scores exist at once and the causal upper triangle is never computed.
"""

import torch
from torch import Tensor

from moba_train.ops.gate import doc_spans, picked_table, select_doc

QUERY_CHUNK = 512


def allowed_keys(idx: Tensor, block_size: int, start: int, end: int) -> Tensor:
    """[H, end - start, end] bool: may query start..end-1 see key j? (selected block and causal)."""
    picked = picked_table(idx[start:end], -(-idx.shape[0] // block_size))
    key_block = torch.arange(end, device=idx.device) // block_size
    mask = picked[:, :, key_block].permute(1, 0, 2)
    causal = torch.arange(end, device=idx.device)[None, :] <= torch.arange(start, end, device=idx.device)[:, None]
    return mask & causal


def attend_selected(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, block_size: int, scale: float) -> Tensor:
    """Softmax attention (fp32 or wider) of one document over its selected blocks; K/V heads shared by GQA."""
    with torch.autocast(q.device.type, enabled=False):  # the reference's products stay wide under autocast
        return _attend(q, k, v, idx, block_size, scale)


def _attend(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, block_size: int, scale: float) -> Tensor:
    group = q.shape[1] // k.shape[1]
    wide = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf = (x.to(wide).transpose(0, 1) for x in (q, k, v))  # [H, L, D]
    kf, vf = kf.repeat_interleave(group, 0), vf.repeat_interleave(group, 0)
    outs = []
    for start in range(0, q.shape[0], QUERY_CHUNK):
        end = min(q.shape[0], start + QUERY_CHUNK)
        scores = (qf[:, start:end] @ kf[:, :end].transpose(1, 2)) * scale
        scores = scores.masked_fill(~allowed_keys(idx, block_size, start, end), float("-inf"))
        outs.append(scores.softmax(-1) @ vf[:, :end])
    return torch.cat(outs, 1).transpose(0, 1).to(q.dtype)


def moba_attn(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, block_size: int,
              top_k: int, softmax_scale: float) -> Tensor:
    outs = []
    for start, end in doc_spans(cu_seqlens):
        qd, kd, vd = q[start:end], k[start:end], v[start:end]
        outs.append(attend_selected(qd, kd, vd, select_doc(qd, kd, block_size, top_k), block_size, softmax_scale))
    return torch.cat(outs)
