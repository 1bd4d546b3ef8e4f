"""Device, precision and seeding: the thin layer that lets the loop stay the same on CPU and GPU."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from carclf.errors import CarclfError


def select_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError as exc:
        raise CarclfError(f"train.device='{spec}' is not a device: use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CarclfError(f"train.device='{spec}' but CUDA is not available here: use train.device=cpu or auto")
    return dev


def amp_dtype(spec: str, device: torch.device) -> torch.dtype | None:
    """Mixed precision only on CUDA: bf16 where supported (no loss scaling needed), else fp16."""
    if device.type != "cuda" or spec == "off":
        return None
    if spec == "fp16":
        return torch.float16
    if spec == "bf16" and not torch.cuda.is_bf16_supported():
        raise CarclfError("train.amp=bf16 but this GPU has no bfloat16 support: use train.amp=fp16 or auto")
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    """Seed every RNG the main process uses, so an epoch is a pure function of (weights, seed)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
