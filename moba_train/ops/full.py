"""Full causal attention in the varlen layout (documents of a packed batch never see each other).

Paths, picked by measurement (docs/benchmarks.md, `scripts/bench_full_attn.py`): documents of one length (a
single document, or rows of a fixed length) take one batched causal SDPA call (cuDNN on Hopper, the fastest
kernel at a fixed length); on CUDA, documents of different lengths take one flash varlen call. Per-document SDPA
would pay a launch chain per document and, as document lengths change from step to step, a cuDNN plan for every
new length (1.5-1.7 s per call at 128K in 4-16K documents, against 0.12-0.16 s packed).
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from moba_train.ops.flash import flash_bwd, flash_fwd
from moba_train.ops.gate import doc_spans
from moba_train.ops.inputs import check_inputs


def full_attn(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
              softmax_scale: float | None = None) -> Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]."""
    check_inputs(q, k, v, cu_seqlens)
    spans = doc_spans(cu_seqlens)
    lengths = {end - start for start, end in spans}  # from the memoised offsets, not the caller's max_seqlen
    if len(lengths) == 1:  # empty documents take no tokens: the others tile the batch
        return equal_docs_sdpa(q, k, v, lengths.pop(), softmax_scale)
    if len(spans) > 1 and flash_takes(q):
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        return PackedCausal.apply(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens.int(), max(lengths),
                                  scale)
    return per_doc_sdpa(q, k, v, spans, softmax_scale)


def flash_takes(q: Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256


def equal_docs_sdpa(q: Tensor, k: Tensor, v: Tensor, length: int, softmax_scale: float | None) -> Tensor:
    """Documents of `length` tokens each, back to back: one causal SDPA call with the documents as the batch."""
    as_batch = lambda x: x.reshape(-1, length, *x.shape[1:]).transpose(1, 2)  # noqa: E731  [docs, H, length, D]
    out = F.scaled_dot_product_attention(as_batch(q), as_batch(k), as_batch(v), is_causal=True,
                                         scale=softmax_scale, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2).reshape(q.shape)


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
