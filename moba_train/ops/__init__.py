"""Attention math: the MoBA op (several backends, one contract) and full causal attention.

Public op (flash-attn varlen layout): q [T, Hq, D], k/v [T, Hkv, D], cu_seqlens [n_docs + 1] int32.
"""

import importlib

import torch
from torch import Tensor

from moba_train.ops.full import full_attn
from moba_train.ops.gate import moba_select as _select_reference
from moba_train.ops.offsets import host_offsets

BACKENDS = ("naive", "varlen", "triton")
# backend name -> module that defines moba_attn(q, k, v, cu_seqlens, max_seqlen, block_size, top_k, softmax_scale)
_MODULES = {"naive": "moba_train.ops.naive", "varlen": "moba_train.ops.varlen", "triton": "moba_train.ops.fused"}


def _triton_usable(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        importlib.import_module(_MODULES["triton"])
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """`auto` -> the fastest backend usable on `device`; an unknown name is an error, never a fallback."""
    if backend == "auto":
        return "triton" if _triton_usable(device) else "naive"
    if backend not in BACKENDS:
        raise ValueError(f"attention.backend={backend!r} is not one of {('auto',) + BACKENDS}")
    return backend


def check_inputs(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, block_size: int, top_k: int) -> None:
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"expected q [T, Hq, D] and k, v [T, Hkv, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of KV heads ({k.shape[1]})")
    if top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1")
    if block_size < 1:
        raise ValueError(f"block_size={block_size} must be >= 1")
    offsets = host_offsets(cu_seqlens) if cu_seqlens.dim() == 1 else ()
    if not offsets or offsets[0] != 0 or offsets[-1] != q.shape[0]:
        raise ValueError(f"cu_seqlens must run from 0 to the token count {q.shape[0]}")


def moba_attn(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, block_size: int = 4096,
              top_k: int = 12, backend: str = "auto", softmax_scale: float | None = None) -> Tensor:
    """MoBA attention over a packed batch; every backend meets the contract in DESIGN.md.

    cu_seqlens' values are read on the host once per tensor (ops/offsets.py): rewrite it in place only through
    the tensor itself (`cu.copy_(...)`), never behind its version counter (`cu.data`), or pass a new tensor.
    """
    check_inputs(q, k, v, cu_seqlens, block_size, top_k)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    module = importlib.import_module(_MODULES[resolve_backend(backend, q.device)])
    return module.moba_attn(q, k, v, cu_seqlens, max_seqlen, block_size, top_k, scale)


def moba_select(q: Tensor, k: Tensor, cu_seqlens: Tensor, max_seqlen: int, block_size: int, top_k: int) -> Tensor:
    """[T, Hq, top_k] int32 selected block indices within each document (ascending, own block included, -1 = none).

    Uses the fused Triton gate on CUDA when available, else the reference.
    """
    check_inputs(q, k, k, cu_seqlens, block_size, top_k)
    if _triton_usable(q.device):
        return importlib.import_module(_MODULES["triton"]).moba_select(q, k, cu_seqlens, max_seqlen, block_size, top_k)
    return _select_reference(q, k, cu_seqlens, max_seqlen, block_size, top_k)


__all__ = ["BACKENDS", "full_attn", "moba_attn", "moba_select", "resolve_backend"]
