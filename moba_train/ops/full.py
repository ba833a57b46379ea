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

from moba_train.ops.flash import CHUNK_ROWS, SEG_ROWS, flash_bwd, flash_fwd
from moba_train.ops.gate import doc_spans
from moba_train.ops.inputs import check_inputs


def empty_batch(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The attention output of a batch without tokens: empty, with (zero) gradients reaching q, k and v."""
    return q.clone() + 0 * (k.sum() + v.sum())


def full_attn(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
              softmax_scale: float | None = None) -> Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]."""
    _, _, softmax_scale = check_inputs(q, k, v, cu_seqlens, softmax_scale=softmax_scale)
    spans = doc_spans(cu_seqlens)
    lengths = {end - start for start, end in spans}  # from the memoised offsets, not the caller's max_seqlen
    if len(lengths) == 1:  # empty documents take no tokens: the others tile the batch
        return equal_docs_sdpa(q, k, v, lengths.pop(), softmax_scale)
    if len(spans) > 1 and flash_takes(q):
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        groups = flash_groups(spans, q.shape[1])
        if len(groups) == 1:
            return PackedCausal.apply(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens.int(),
                                      max(lengths), scale)
        return torch.cat([packed_group(q, k, v, group, scale) for group in groups])
    return per_doc_sdpa(q, k, v, spans, softmax_scale)


def flash_groups(spans: list[tuple[int, int]], heads: int) -> list[list[tuple[int, int]]]:
    """Consecutive documents in groups within FA2's index limit per call (ops/flash.py); a document over the
    limit on its own is a group of one (SDPA takes it)."""
    groups: list[list[tuple[int, int]]] = [[]]
    for start, end in spans:
        group = groups[-1] + [(start, end)]
        if groups[-1] and (end - group[0][0] + SEG_ROWS * len(group)) * heads > CHUNK_ROWS:
            groups.append([(start, end)])
        else:
            groups[-1] = group
    return groups


def packed_group(q: Tensor, k: Tensor, v: Tensor, group: list[tuple[int, int]], scale: float) -> Tensor:
    first, last = group[0][0], group[-1][1]
    if len(group) == 1:
        return per_doc_sdpa(q, k, v, group, scale)
    cu = torch.tensor([start - first for start, _ in group] + [last - first], device=q.device, dtype=torch.int32)
    longest = max(end - start for start, end in group)
    return PackedCausal.apply(*(x[first:last].contiguous() for x in (q, k, v)), cu, longest, scale)


def flash_takes(q: Tensor) -> bool:
    """Whether FA2's varlen kernels take q: CUDA sm80+, fp16/bf16, head size a multiple of 8 up to 256."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0
            and q.shape[-1] <= 256 and torch.cuda.get_device_capability(q.device)[0] >= 8)


def equal_docs_sdpa(q: Tensor, k: Tensor, v: Tensor, length: int, softmax_scale: float | None) -> Tensor:
    """Documents of `length` tokens each, back to back: causal SDPA calls with the documents as the batch, as
    many per call as keep a flash kernel's 32-bit index in range (ops/flash.py)."""
    per_call = max(1, CHUNK_ROWS // (length * q.shape[1])) * length
    as_batch = lambda x: x.reshape(-1, length, *x.shape[1:]).transpose(1, 2)  # noqa: E731  [docs, H, length, D]
    outs = []
    for start in range(0, q.shape[0], per_call):
        part = (as_batch(x[start:start + per_call]) for x in (q, k, v))
        out = F.scaled_dot_product_attention(*part, is_causal=True, scale=softmax_scale,
                                             enable_gqa=q.shape[1] != k.shape[1])
        outs.append(out.transpose(1, 2).reshape(-1, *q.shape[1:]))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def per_doc_sdpa(q: Tensor, k: Tensor, v: Tensor, spans: list[tuple[int, int]],
                 softmax_scale: float | None) -> Tensor:
    gqa = q.shape[1] != k.shape[1]
    outs = []
    for start, end in spans:
        qd, kd, vd = (x[start:end].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        out = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=softmax_scale, enable_gqa=gqa)
        outs.append(out.squeeze(0).transpose(0, 1))
    if not outs:
        return empty_batch(q, k, v)
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
