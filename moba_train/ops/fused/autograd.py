"""The fused op as one autograd Function: gate (no gradient), routing, forward; KV-major backward."""

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from moba_train.ops.fused.bwd import backward
from moba_train.ops.fused.fwd import forward
from moba_train.ops.fused.gate import select
from moba_train.ops.fused.layout import build_layout, query_tile
from moba_train.ops.fused.routing import build_routes
from moba_train.ops.fused.tiles import dot_size, tiles


# Triton decides at decoration time whether kernels are interpreted; record the same decision once
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def interpreting() -> bool:
    return _INTERPRET


def check_supported(q: Tensor) -> None:
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):  # the kernels' accumulators are fp32
        raise ValueError(f"triton MoBA backend takes fp16, bf16 or fp32, got {q.dtype} (backend='naive' computes "
                         "in float64)")
    dim = q.shape[-1]
    widest = 512 // q.element_size()  # the kernels' shared-memory tiles are sized for rows of at most 512 bytes
    if dot_size(dim) > min(256, widest):
        raise ValueError(f"triton MoBA backend supports {q.dtype} up to head_dim {min(256, widest)}, got {dim}")
    if q.device.type != "cuda" and not interpreting():
        raise RuntimeError("triton MoBA backend needs a CUDA tensor (or TRITON_INTERPRET=1 on the CPU)")
    if interpreting() and q.dtype == torch.bfloat16:  # its bf16 tl.dot multiplies the raw 16-bit patterns
        raise ValueError("the Triton interpreter cannot run the triton MoBA backend in bf16 (its bf16 products are "
                         "wrong); use fp16 or fp32 on the CPU, or backend='naive'")


def aligned(x: Tensor) -> Tensor:
    """TMA descriptors of K and V need 16-byte aligned bases; a view into a foreign buffer may not be."""
    return x if x.data_ptr() % 16 == 0 else x.clone()


def selection(q: Tensor, k: Tensor, cu_seqlens: Tensor, block_size: int, top_k: int):
    """Layout and canonical selection [T, Hq, top_k] of one call (no gradient)."""
    layout = build_layout(cu_seqlens, block_size, query_tile(block_size, interpreting()), q.device)
    return layout, select(q, k, layout, top_k)


class MobaAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, block_size, top_k, scale):
        q, k, v = (aligned(x.contiguous()) for x in (q, k, v))
        layout, idx = selection(q, k, cu_seqlens, block_size, top_k)
        rows = tiles(block_size, q.shape[-1], q.element_size(), interpreting())["past_rows"]
        routes = build_routes(idx, layout, k.shape[1], rows)
        out, lse = forward(q, k, v, layout, routes, scale, interpreting())
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.routes, ctx.scale = layout, routes, scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward: an error, not a silent zero
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = backward(dout.contiguous(), q, k, v, out, lse, ctx.layout, ctx.routes, ctx.scale,
                              interpreting())
        return dq, dk, dv, None, None, None, None


def pad(x: Tensor) -> Tensor:
    """x with zero columns up to the kernels' head size (`dot_size`): a zero column adds exactly nothing to any
    score, mean or output."""
    extra = dot_size(x.shape[-1]) - x.shape[-1]
    return F.pad(x, (0, extra)) if extra else x


def moba_attn(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, block_size: int, top_k: int,
              softmax_scale: float) -> Tensor:
    check_supported(q)
    out = MobaAttn.apply(pad(q), pad(k), pad(v), cu_seqlens, block_size, top_k, softmax_scale)
    return out if out.shape[-1] == q.shape[-1] else out[..., :q.shape[-1]].contiguous()


@torch.no_grad()
def moba_select(q: Tensor, k: Tensor, cu_seqlens: Tensor, max_seqlen: int, block_size: int, top_k: int) -> Tensor:
    check_supported(q)
    return selection(pad(q).contiguous(), pad(k).contiguous(), cu_seqlens, block_size, top_k)[1]
