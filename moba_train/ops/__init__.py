"""Attention math: the MoBA op (several backends, one contract) and full causal attention.

Public op (flash-attn varlen layout): q [T, Hq, D], k/v [T, Hkv, D], cu_seqlens [n_docs + 1] int32.
"""

import importlib

import torch
from torch import Tensor

from moba_train.ops.full import empty_batch, flash_takes, full_attn
from moba_train.ops.gate import moba_select as _select_reference
from moba_train.ops.inputs import check_inputs
from moba_train.ops.offsets import longest_doc

BACKENDS = ("naive", "varlen", "triton")
# backend name -> module that defines moba_attn(q, k, v, cu_seqlens, max_seqlen, block_size, top_k, softmax_scale)
_MODULES = {"naive": "moba_train.ops.naive", "varlen": "moba_train.ops.varlen", "triton": "moba_train.ops.fused"}


def _triton_usable(q: Tensor) -> bool:
    """On CUDA, with a head size and dtype the fused kernels take."""
    if q.device.type != "cuda":
        return False
    try:
        fused = importlib.import_module(_MODULES["triton"])
        fused.check_supported(q)
    except (ImportError, ValueError):
        return False
    return True


def resolve_backend(backend: str, q: Tensor) -> str:
    """`auto` -> the fastest backend usable for `q` (triton, else varlen where FA2 takes q, else naive); an
    unknown name is an error, never a fallback."""
    if backend == "auto":
        if _triton_usable(q):
            return "triton"
        return "varlen" if flash_takes(q) else "naive"
    if backend not in BACKENDS:
        raise ValueError(f"attention.backend={backend!r} is not one of {('auto',) + BACKENDS}")
    return backend


def effective_top_k(cu_seqlens: Tensor, block_size: int, top_k: int) -> int:
    """top_k, or where it exceeds the blocks of the batch's longest document (it then selects every block) the
    next power of two at or above those: the same blocks without [T, Hq, top_k] tables, and few kernel variants
    (the fused kernels compile one per top_k)."""
    blocks = max(1, -(-longest_doc(cu_seqlens) // block_size))
    return top_k if top_k <= blocks else min(top_k, 1 << (blocks - 1).bit_length())


def moba_attn(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, block_size: int = 4096,
              top_k: int = 12, backend: str = "auto", softmax_scale: float | None = None) -> Tensor:
    """MoBA attention over a packed batch; every backend meets the contract in README.md ("The MoBA op").

    `auto` runs a batch whose documents all have at most `top_k` blocks as full attention: every block is
    selected there, so MoBA is exactly full causal attention (README.md), and dense kernels do it faster.

    cu_seqlens' values are read on the host once per tensor (ops/offsets.py): rewrite it in place only through
    the tensor itself (`cu.copy_(...)`), never behind its version counter (`cu.data`), or pass a new tensor.
    """
    block_size, top_k, softmax_scale = check_inputs(q, k, v, cu_seqlens, block_size, top_k, softmax_scale)
    if q.shape[0] == 0:
        return empty_batch(q, k, v)
    top_k = effective_top_k(cu_seqlens, block_size, top_k)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    if backend == "auto" and longest_doc(cu_seqlens) <= top_k * block_size:
        return full_attn(q, k, v, cu_seqlens, max_seqlen, scale)
    module = importlib.import_module(_MODULES[resolve_backend(backend, q)])
    return module.moba_attn(q, k, v, cu_seqlens, max_seqlen, block_size, top_k, scale)


def moba_select(q: Tensor, k: Tensor, cu_seqlens: Tensor, max_seqlen: int, block_size: int, top_k: int) -> Tensor:
    """[T, Hq, top_k] int32 selected block indices within each document (ascending, own block included, -1 = none).

    Uses the fused Triton gate on CUDA when available, else the reference.
    """
    block_size, top_k, _ = check_inputs(q, k, k, cu_seqlens, block_size, top_k)
    out = torch.full((q.shape[0], q.shape[1], top_k), -1, device=q.device, dtype=torch.int32)
    if q.shape[0] == 0:
        return out
    picks = effective_top_k(cu_seqlens, block_size, top_k)  # the columns past them hold -1
    if _triton_usable(q):
        fused = importlib.import_module(_MODULES["triton"])
        out[..., :picks] = fused.moba_select(q, k, cu_seqlens, max_seqlen, block_size, picks)
    else:
        out[..., :picks] = _select_reference(q, k, cu_seqlens, max_seqlen, block_size, picks)
    return out


__all__ = ["BACKENDS", "full_attn", "moba_attn", "moba_select", "resolve_backend"]
