"""Forward passes over a loader, shared by validation, out-of-fold logits and the Predictor."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from carclf.runtime import autocast


def batch_logits(
    model: nn.Module, x: torch.Tensor, device: torch.device, normalize: Callable, tta_hflip: bool = False,
    amp: torch.dtype | None = None, channels_last: bool = False,
) -> torch.Tensor:
    """Float32 logits of one uint8 batch; with ``tta_hflip`` the mean of the photo's and its mirror image's logits
    (in logit space, so a temperature fitted on these logits applies unchanged)."""
    x = normalize(x.to(device, non_blocking=True))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device, amp):
        logits = model(x).float()
        if tta_hflip:
            logits = (logits + model(torch.flip(x, dims=[3])).float()) / 2
    return logits


@torch.inference_mode()
def infer_logits(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    normalize: Callable,
    tta_hflip: bool = False,
    amp: torch.dtype | None = None,
    channels_last: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (logits, dataset indices, ok mask) over ``loader``; see :func:`batch_logits` for ``tta_hflip``."""
    model.eval()
    out, idx, oks = [], [], []
    for x, _, i, ok in loader:
        out.append(batch_logits(model, x, device, normalize, tta_hflip, amp, channels_last).cpu())
        idx.append(i)
        oks.append(ok)
    if not out:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64), np.zeros(0, bool)
    return torch.cat(out).numpy(), torch.cat(idx).numpy(), torch.cat(oks).numpy().astype(bool)
