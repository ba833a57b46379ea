"""Flash varlen attention kernels: flash-attn when it is installed, else torch's own FA2 ops (no GQA copies:
the kernels take Hq query heads over Hkv key/value heads)."""

import torch
from torch.nn.attention import SDPBackend

# SDPA backends without cuDNN, for inputs whose lengths change from call to call (packed documents, a growing
# KV cache): cuDNN builds an execution plan for every new length, ~0.1 s per length for fwd+bwd at 4-16K tokens
# on an H100 (docs/benchmarks.md), and caches it only for that exact shape.
SDPA_NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

# FA2's backward indexes its fp32 dq buffer with 32-bit products of (rows + 128 * sequences) * heads * 128, so
# one call keeps (rows + 128 * sequences) * heads well under 2**31 / 128 (16.7M); callers split larger inputs.
CHUNK_ROWS = 8 << 20
SEG_ROWS = 128  # the per-sequence padding of that index

try:  # optional dependency
    from flash_attn.flash_attn_interface import _flash_attn_varlen_backward, _flash_attn_varlen_forward
except ImportError:
    _flash_attn_varlen_forward = _flash_attn_varlen_backward = None


def flash_fwd(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    """-> out [N, H, D], lse [H, N] fp32, state the backward needs."""
    if _flash_attn_varlen_forward is not None:
        res = _flash_attn_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, scale, causal=causal)
        return res[0], res[1], None
    out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0,
                                                                        causal, False, scale=scale)
    return out, lse, (rng, unused)


def flash_bwd(do, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, state):
    if _flash_attn_varlen_backward is not None:
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _flash_attn_varlen_backward(do, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max_q, max_k, 0.0, scale,
                                    causal, -1, -1, 0.0, None, False)
        return dq, dk, dv
    return torch.ops.aten._flash_attention_backward(do, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.0, causal,
                                                    state[0], state[1], scale=scale)
