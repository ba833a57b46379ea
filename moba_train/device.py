"""A `--device` flag checked up front: torch's own errors for a bad name or a missing GPU are deep tracebacks."""

import torch

from moba_train.errors import UserError


def device_arg(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device name; use cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: this script runs on cpu or cuda")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: {torch.cuda.device_count()} CUDA GPUs visible here; use --device cpu")
    return device
