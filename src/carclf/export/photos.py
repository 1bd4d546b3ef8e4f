"""Photos for the export's checks: a run's out-of-fold photos (parity, the lower precisions' evaluation), each fold's
training photos (int8 calibration), synthetic photos when the run's data is gone, and their decoded batches."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from carclf.artifacts.oof import read_fold_oof
from carclf.artifacts.photos import DataDisk, resolve_photo
from carclf.artifacts.run import RunDir


@dataclass
class FoldPhotos:
    """Out-of-fold photos of one fold: files on disk, model-class labels, and how many the OOF listed."""

    paths: list[Path]
    labels: np.ndarray
    listed: int


def spread(n: int, k: int) -> np.ndarray:
    """``k`` indices spread evenly over ``range(n)`` (deterministic: the same photos on every export)."""
    if k <= 0 or n <= 0:
        return np.zeros(0, dtype=int)
    return np.unique(np.linspace(0, n - 1, min(k, n)).round().astype(int))


def oof_photos(run: RunDir, fold: int, limit: int, root: Path | None = None) -> FoldPhotos:
    """Up to ``limit`` out-of-fold photos of ``fold`` that are still on disk, with their labels."""
    root = Path(root or run.read_config().data.root)
    z = read_fold_oof(run.fold(fold), ("paths", "labels"), ())
    rel, labels = [str(p) for p in z["paths"]], np.asarray(z["labels"])
    disk = DataDisk(root)
    found = [(resolve_photo(disk, r), y) for r, y in zip(rel, labels, strict=True)]
    found = [(p, y) for p, y in found if p is not None]
    pick = spread(len(found), limit)
    return FoldPhotos([found[i][0] for i in pick], np.array([found[i][1] for i in pick], dtype=np.int64), len(rel))


def training_photos(run: RunDir, fold: int, limit: int, root: Path | None = None) -> list[Path]:
    """Up to ``limit`` photos fold ``fold`` trained on (folds.csv rows of the other folds): int8 calibration
    photos that are not the photos it is then scored on."""
    root = Path(root or run.read_config().data.root)
    rel = [p for p, f in run.read_folds().items() if f != fold]
    pick = spread(len(rel), limit * 2)  # some may be gone; take the first ``limit`` that exist
    disk = DataDisk(root)
    out = [p for p in (resolve_photo(disk, rel[i]) for i in pick) if p is not None]
    return out[:limit]


def synthetic_photos(n: int, size: tuple[int, int] = (320, 240), seed: int = 0) -> list[bytes]:
    """``n`` smooth random colour photos, PNG-encoded (parity needs pixels, not cars)."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w, h = size
        base = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.BICUBIC).filter(ImageFilter.GaussianBlur(2))
        noise = rng.normal(0, 12, (h, w, 3))
        arr = np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def photo_batches(sources: list, dcfg: dict[str, Any], cfg, batch_size: int
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(uint8 NCHW batch, ok mask) over ``sources``, decoded and transformed as the Predictor does."""
    from carclf.data.dataset import ImageDataset, eval_batches
    from carclf.data.transforms import eval_transform

    ds = ImageDataset(sources, None, eval_transform(dcfg), int(dcfg["input_size"][1]), cfg.data.draft_factor,
                      max_pixels=cfg.data.max_pixels)
    for x, _, _, ok in eval_batches(ds, batch_size):
        yield x.numpy(), ok.numpy().astype(bool)
