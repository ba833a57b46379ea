import json
import os
import subprocess
import sys

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


def run_interpreted(script: str, timeout: int) -> dict:
    """Run a test file as a script in a child process with TRITON_INTERPRET=1 and return the JSON object on its
    last stdout line. The interpreter is chosen when kernels are defined and must stay on while they run, so the
    rest of the test session never sees the variable. Skips where a GPU is present (tests/gpu covers it)."""
    if torch.cuda.is_available():
        pytest.skip("interpreter cases run on CPU-only machines; the GPU tests cover the kernels there")
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, os.path.abspath(script)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def compiled_variants(*kernels) -> int:
    """How many specialisations of these Triton kernels are compiled for the current GPU, all told."""
    device = torch.cuda.current_device()
    return sum(len(kernel.device_caches[device][0]) for kernel in kernels)
