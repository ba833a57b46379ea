"""Full causal attention in the varlen layout (documents of a packed batch never see each other).

Two paths, picked by measurement (docs/benchmarks.md, `scripts/bench_full_attn.py`): one causal SDPA call per
document (cuDNN on Hopper, the fastest kernel for long documents), or, on CUDA with many short documents, one
flash varlen call for the whole batch (per-document calls would cost a launch chain each).
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from moba_train.ops.flash import flash_bwd, flash_fwd
from moba_train.ops.gate import doc_spans
from moba_train.ops.inputs import check_inputs

# longest document for which one packed flash call is taken: on an H100 it is 4.7-27x faster than per-document
# SDPA for documents of 256-2K tokens, even at 4K (1.03x slower), and 1.5x slower from 8K on (cuDNN's kernel)
PACKED_MAX_DOC = 4096


def full_attn(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
              softmax_scale: float | None = None) -> Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]."""
    check_inputs(q, k, v, cu_seqlens)
    spans = doc_spans(cu_seqlens)
    longest = max((end - start for start, end in spans), default=0)  # from the memoised offsets, not the caller
    if len(spans) > 1 and longest <= PACKED_MAX_DOC and flash_takes(q):
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        return PackedCausal.apply(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens.int(), longest, scale)
    return per_doc_sdpa(q, k, v, spans, softmax_scale)


def flash_takes(q: Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256


def per_doc_sdpa(q: Tensor, k: Tensor, v: Tensor, spans: list[tuple[int, int]],
                 softmax_scale: float | None) -> Tensor:
    gqa = q.shape[1] != k.shape[1]
    outs = []
    for start, end in spans:
        qd, kd, vd = (x[start:end].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        out = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=softmax_scale, enable_gqa=gqa)
        outs.append(out.squeeze(0).transpose(0, 1))
    if not outs:  # an empty batch; clone keeps q's autograd graph
        return q.clone()
    return outs[0] if len(outs) == 1 else torch.cat(outs)


class PackedCausal(torch.autograd.Function):
    """Causal attention over every document of a packed batch in one flash varlen call (GQA native)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, scale):
        out, lse, state = flash_fwd(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, True, scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.meta = (max_seqlen, scale, state)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse, cu = ctx.saved_tensors
        max_seqlen, scale, state = ctx.meta
        dq, dk, dv = flash_bwd(dout.contiguous(), q, k, v, out, lse, cu, cu, max_seqlen, max_seqlen, True, scale,
                               state)
        return dq, dk, dv, None, None, None
