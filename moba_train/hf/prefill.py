"""Prefill (no past keys): [B, H, S, D] tensors with a padding mask -> unpadded varlen layout -> the MoBA op."""

import torch
from torch import Tensor

from moba_train.ops import full_attn, moba_attn
from moba_train.ops.offsets import TensorMemo, longest_doc


_layouts = TensorMemo()


def varlen_layout(mask: Tensor | None, position_ids: Tensor | None, batch: int, seq: int,
                  device: torch.device) -> tuple[Tensor | None, Tensor, int]:
    """(index of kept tokens in the flat [B * S] batch or None for all, cu_seqlens int32, max_seqlen).

    With a padding mask every row's real tokens form one document. Without one, a row is one document unless
    `position_ids` restart at 0 inside it (HF's packed-sequence convention, as for flash attention). Every layer
    of a forward passes the same mask and position_ids: the layout (and its host reads) is built once.
    """
    return _layouts.get((mask, position_ids), (batch, seq, str(device)),
                        lambda: _build_layout(mask, position_ids, batch, seq, device))


def _build_layout(mask: Tensor | None, position_ids: Tensor | None, batch: int, seq: int,
                  device: torch.device) -> tuple[Tensor | None, Tensor, int]:
    if mask is not None:
        index = mask.reshape(-1).nonzero().squeeze(1)
        lengths = mask.sum(1)
        lengths = lengths[lengths > 0]
        cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    else:
        index = None
        starts = torch.zeros(batch, seq, dtype=torch.bool, device=device)
        starts[:, 0] = True
        if position_ids is not None and position_ids.dim() == 2 and position_ids.shape[-1] == seq:
            starts |= position_ids.to(device).expand(batch, seq) == 0
        flat = starts.reshape(-1).nonzero().squeeze(1)
        cu = torch.cat([flat, flat.new_full((1,), batch * seq)])
    cu = cu.to(torch.int32)
    return index, cu, longest_doc(cu)


def prefill(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, position_ids: Tensor | None,
            block_size: int, top_k: int, backend: str, scale: float, full: bool) -> Tensor:
    """query [B, Hq, S, D], key/value [B, Hkv, S, D] -> [B, S, Hq, D] (zeros at padded positions)."""
    batch, hq, seq, dim = query.shape

    def rows(x: Tensor) -> Tensor:
        return x.transpose(1, 2).reshape(batch * seq, x.shape[1], dim)

    q, k, v = rows(query), rows(key), rows(value)
    # under autocast transformers' RoPE hands over fp32 q, k next to a lower-precision v: attend in one dtype
    device_type = query.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else query.dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    index, cu, max_seqlen = varlen_layout(mask, position_ids, batch, seq, query.device)
    if index is not None:
        if index.numel() == 0:
            return query.new_zeros(batch, seq, hq, dim)
        q, k, v = q[index], k[index], v[index]
    if full:
        out = full_attn(q, k, v, cu, max_seqlen, scale)
    else:
        out = moba_attn(q, k, v, cu, max_seqlen, block_size, top_k, backend, scale)
    if index is not None:
        out = out.new_zeros(batch * seq, hq, dim).index_copy_(0, index, out)
    return out.view(batch, seq, hq, dim)
