"""Full causal attention in the varlen layout (documents of a packed batch never see each other)."""

import torch
import torch.nn.functional as F
from torch import Tensor

from moba_train.ops.gate import doc_spans
from moba_train.ops.inputs import check_inputs


def full_attn(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
              softmax_scale: float | None = None) -> Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]; one causal SDPA call per document (flash/cuDNN on GPU)."""
    check_inputs(q, k, v, cu_seqlens)
    gqa = q.shape[1] != k.shape[1]
    outs = []
    for start, end in doc_spans(cu_seqlens):
        qd, kd, vd = (x[start:end].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        out = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=softmax_scale, enable_gqa=gqa)
        outs.append(out.squeeze(0).transpose(0, 1))
    if not outs:  # an empty batch; clone keeps q's autograd graph
        return q.clone()
    return outs[0] if len(outs) == 1 else torch.cat(outs)
