"""torch.compile per transformer block's dense parts (norms, MLP); attention (ops + CP collectives) stays eager."""

import torch.nn as nn


def apply_compile(model: nn.Module) -> nn.Module:
    for block in model.layers:
        for name in ("input_layernorm", "post_attention_layernorm", "mlp"):
            getattr(block, name).compile()
    return model
