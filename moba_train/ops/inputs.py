"""Input checks shared by the attention ops: a ValueError naming the problem instead of a kernel's traceback."""

import math
import operator

import torch
from torch import Tensor

from moba_train.ops.offsets import host_offsets


def whole_number(name: str, value, minimum: int = 1) -> int:
    """`value` as a plain int >= minimum (ints, numpy ints, 0-dim integer tensors; not floats or bools), else a
    ValueError naming `name`."""
    try:
        ok = not isinstance(value, bool) and operator.index(value) >= minimum
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
    return operator.index(value)


def check_inputs(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, block_size: int = 1, top_k: int = 1,
                 softmax_scale: float | None = None) -> tuple[int, int, float | None]:
    """A ValueError naming the problem for anything the kernels would mishandle (shapes, dtypes, offsets).

    Returns (block_size, top_k, softmax_scale) as plain Python numbers: a numpy int or 0-dim tensor would reach
    the kernels' compile-time constants and the memoised layouts (whose keys it hashes like an int)."""
    if not all(isinstance(x, Tensor) for x in (q, k, v, cu_seqlens)):
        raise ValueError("q, k, v and cu_seqlens must be tensors")
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"expected q [T, Hq, D] and k, v [T, Hkv, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if min(q.shape[1], k.shape[1], q.shape[2]) < 1:
        raise ValueError(f"heads and head_dim must be >= 1; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of KV heads ({k.shape[1]})")
    if not q.dtype == k.dtype == v.dtype or not q.device == k.device == v.device:
        raise ValueError(f"q, k, v must share dtype and device; got {q.dtype}/{k.dtype}/{v.dtype} on "
                         f"{q.device}/{k.device}/{v.device}")
    if not q.dtype.is_floating_point:
        raise ValueError(f"q, k, v must be floating point, got {q.dtype}")
    top_k, block_size = whole_number("top_k", top_k), whole_number("block_size", block_size)
    if softmax_scale is not None:
        try:  # Python and numpy floats, 0-dim tensors; not bools
            scale = None if isinstance(softmax_scale, bool) else float(softmax_scale)
        except (TypeError, ValueError, RuntimeError):
            scale = None
        if scale is None or not 0 < scale < math.inf:
            raise ValueError(f"softmax_scale={softmax_scale} must be a finite number > 0 (or None: head_dim ** -0.5)")
        softmax_scale = scale
    if cu_seqlens.device.type == "meta":
        raise ValueError("cu_seqlens must hold values (it is on the meta device)")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool:
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    offsets = host_offsets(cu_seqlens)
    if not offsets or offsets[0] != 0 or offsets[-1] != q.shape[0]:
        raise ValueError(f"cu_seqlens must run from 0 to the token count {q.shape[0]}")
    if any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError("cu_seqlens must not decrease (documents have lengths >= 0)")
    return block_size, top_k, softmax_scale
