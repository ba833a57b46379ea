"""Host values read from the GPU once per step instead of once per layer.

Every layer of a step passes the same cu_seqlens (and, under transformers, the same padding mask). Reading
such a tensor on the host (`tolist`, `int`) blocks until the GPU has caught up, which stops the host from
queueing the next kernels: one read per layer costs a pipeline drain per layer. `TensorMemo` keeps what was
computed from a set of tensors while the same tensors come back: keyed by identity and version counter, an
entry holds its tensors, so their ids cannot pass to other tensors while cached, and an in-place change bumps
the version. A write that bypasses the version counter (through `.data`, DLPack or a CUDA graph replay into
the same buffer) is not seen: pass a new tensor, or write in place through the tensor itself.
"""

from collections import OrderedDict
from typing import Callable

from torch import Tensor


class TensorMemo:
    def __init__(self, capacity: int = 8):
        self.capacity = capacity
        self.entries: OrderedDict = OrderedDict()  # key -> (tensors, versions, value)

    def get(self, tensors: tuple, extra: tuple, compute: Callable):
        """compute() once per (tensors by identity and version, extra); None entries are allowed."""
        if any(t is not None and t.is_inference() for t in tensors):  # inference tensors keep no version
            return compute()
        key = (tuple(id(t) for t in tensors), extra)
        versions = tuple(None if t is None else t._version for t in tensors)
        hit = self.entries.get(key)
        if hit is not None and all(a is b for a, b in zip(hit[0], tensors)) and hit[1] == versions:
            self.entries.move_to_end(key)
            return hit[2]
        value = compute()
        self.entries[key] = (tensors, versions, value)
        self.entries.move_to_end(key)
        if len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
        return value


_offsets = TensorMemo()


def host_offsets(cu_seqlens: Tensor) -> tuple[int, ...]:
    """cu_seqlens as host ints."""
    return _offsets.get((cu_seqlens,), (), lambda: tuple(cu_seqlens.tolist()))


def longest_doc(cu_seqlens: Tensor) -> int:
    """max_seqlen, from the same memoised read as the layers' (0 for an empty batch)."""
    offsets = host_offsets(cu_seqlens)
    return max((end - start for start, end in zip(offsets, offsets[1:])), default=0)
