"""Fused Triton MoBA backend: block means, gate + top-k, key-block-major attention, KV-major backward.

Files: layout (block/tile tables), means, gate, routing (row lists per block), fwd, bwd, autograd (the op).
"""

from moba_train.ops.fused.autograd import check_supported, moba_attn, moba_select

__all__ = ["check_supported", "moba_attn", "moba_select"]
