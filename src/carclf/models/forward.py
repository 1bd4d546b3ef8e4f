"""Forward passes over a loader, shared by validation, out-of-fold logits and the Predictor, and the TTA views
(:mod:`carclf.tta` names them)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from carclf.runtime import autocast
from carclf.tta import CROP_FRACTION


def apply_view(x: torch.Tensor, view: str) -> torch.Tensor:
    """One view of a normalised NCHW batch (:mod:`carclf.tta` describes the views)."""
    flip = view.endswith("flip")
    base = "orig" if view == "flip" else view[: -len("+flip")] if flip else view
    h, w = x.shape[-2:]
    if base.startswith("zoom"):
        f = float(base[4:])
        x = F.interpolate(x, size=(round(h * f), round(w * f)), mode="bilinear", align_corners=False, antialias=f < 1)
    elif base.startswith("crop_"):
        ch, cw = round(h * CROP_FRACTION), round(w * CROP_FRACTION)
        top = {"c": (h - ch) // 2, "tl": 0, "tr": 0, "bl": h - ch, "br": h - ch}[base[5:]]
        left = {"c": (w - cw) // 2, "tl": 0, "tr": w - cw, "bl": 0, "br": w - cw}[base[5:]]
        x = F.interpolate(x[..., top : top + ch, left : left + cw], size=(h, w), mode="bilinear", align_corners=False)
    if flip:
        x = torch.flip(x, dims=[3])
    return x


def _features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features (timm's ``forward_head(pre_logits=True)``) and logits in one pass."""
    feats = model.forward_head(model.forward_features(x), pre_logits=True)
    return feats, model.get_classifier()(feats)


def batch_view_logits(
    model: nn.Module, x: torch.Tensor, device: torch.device, normalize: Callable, views: Sequence[str],
    amp: torch.dtype | None = None, channels_last: bool = False, features: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float32 logits of one uint8 batch for every view, shape (views, batch, classes); with ``features`` also the
    penultimate features of the first view (float32, (batch, dim)), else None."""
    x = normalize(x.to(device, non_blocking=True))
    out, feats = [], None
    with autocast(device, amp):
        for j, view in enumerate(views):
            xv = apply_view(x, view)
            if channels_last:
                xv = xv.contiguous(memory_format=torch.channels_last)
            if features and j == 0:
                f, logits = _features_and_logits(model, xv)
                feats = f.float()
            else:
                logits = model(xv)
            out.append(logits.float())
    return torch.stack(out), feats


def batch_logits(
    model: nn.Module, x: torch.Tensor, device: torch.device, normalize: Callable, views: Sequence[str] = ("orig",),
    amp: torch.dtype | None = None, channels_last: bool = False,
) -> torch.Tensor:
    """Float32 logits of one uint8 batch, averaged over the TTA ``views`` in logit space."""
    return batch_view_logits(model, x, device, normalize, views, amp, channels_last)[0].mean(0)


@torch.inference_mode()
def infer_view_logits(
    model: nn.Module, loader: DataLoader, device: torch.device, normalize: Callable, views: Sequence[str] = ("orig",),
    amp: torch.dtype | None = None, channels_last: bool = False, features: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """(per-view logits (views, n, classes), dataset indices, ok mask, features (n, dim) or None) over ``loader``."""
    model.eval()
    out, idx, oks, feats = [], [], [], []
    for x, _, i, ok in loader:
        logits, f = batch_view_logits(model, x, device, normalize, views, amp, channels_last, features)
        out.append(logits.cpu())
        if f is not None:
            feats.append(f.cpu())
        idx.append(i)
        oks.append(ok)
    if not out:
        return np.zeros((len(views), 0, 0), np.float32), np.zeros(0, np.int64), np.zeros(0, bool), None
    return (torch.cat(out, dim=1).numpy(), torch.cat(idx).numpy(), torch.cat(oks).numpy().astype(bool),
            torch.cat(feats).numpy() if feats else None)


def infer_logits(
    model: nn.Module, loader: DataLoader, device: torch.device, normalize: Callable, views: Sequence[str] = ("orig",),
    amp: torch.dtype | None = None, channels_last: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (logits averaged over ``views``, dataset indices, ok mask) over ``loader``."""
    logits, idx, ok, _ = infer_view_logits(model, loader, device, normalize, views, amp, channels_last)
    return (logits.mean(0) if logits.shape[1] else np.zeros((0, 0), np.float32)), idx, ok
