import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def packed(lengths, hq, hkv, dim, dtype=torch.float64, seed=0, requires_grad=True):
    """Random q, k, v and cu_seqlens for documents of the given lengths."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v = (torch.randn(total, h, dim, generator=gen, dtype=dtype) for h in (hq, hkv, hkv))
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    return q, k, v, cu, max(lengths)
