"""A torch Dataset over image paths that never dies on a bad photo: it reports it and moves on."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from carclf.data.imageio import load_rgb


class ImageDataset(Dataset):
    """Yields ``(image, label, index, ok)``.

    ``ok`` is False when the photo could not be decoded; the training loop lists it in ``skipped.csv``. In training
    mode a bad photo is replaced by the next good one so a batch stays full; in eval mode a zero image is returned
    and the caller drops or fills that row.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        labels: Sequence[int] | None,
        transform: Callable,
        target: int,
        draft_factor: float = 2.0,
        substitute: bool = False,
        max_pixels: int | None = None,
    ) -> None:
        self.paths = list(paths)
        self.labels = list(labels) if labels is not None else [-1] * len(self.paths)
        self.transform = transform
        self.target = target
        self.draft_factor = draft_factor
        self.substitute = substitute
        self.max_pixels = max_pixels  # data.max_pixels (0: no limit); None keeps Pillow's own guard
        self._shape: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, i: int) -> torch.Tensor:
        if self.max_pixels is not None:  # per call: worker processes do not share the parent's module state
            from PIL import Image

            Image.MAX_IMAGE_PIXELS = self.max_pixels or None
        x = self.transform(load_rgb(self.paths[i], self.target, self.draft_factor))
        self._shape = tuple(x.shape)
        return x

    def __getitem__(self, i: int):
        try:
            return self._load(i), self.labels[i], i, True
        except Exception:  # noqa: BLE001 - any decode error: report the index, keep the epoch going
            if self.substitute:
                for step in range(1, min(len(self), 16)):
                    j = (i + step) % len(self)
                    try:
                        return self._load(j), self.labels[j], i, False
                    except Exception:  # noqa: BLE001,S112
                        continue
            shape = self._shape or (3, self.target, self.target)
            return torch.zeros(shape, dtype=torch.uint8), self.labels[i], i, False
