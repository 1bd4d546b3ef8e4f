"""A torch Dataset over photos that never dies on a bad one, and the sampler that makes every epoch reproducible."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from carclf.data.imageio import ImageSource, load_rgb
from carclf.runtime import seed_everything


class EpochSampler(Sampler):
    """Yields ``(index, seed)`` pairs. The order and each photo's augmentation seed are functions of
    (``seed``, epoch, index) alone, so an epoch draws the same crops whether 0, 1 or 16 workers decode it and whether
    they persist across epochs (which saves a GPU box seconds per epoch) or are started afresh; a resumed run
    therefore repeats an uninterrupted one. Call :meth:`set_epoch` before each epoch.

    Under distributed training rank r of w takes every w-th photo of the epoch's order, starting at r (the order
    padded by repeating its start to a multiple of w, as ``DistributedSampler`` does): the ranks' batches together
    are the single-process batches, and every photo keeps its own augmentation seed."""

    def __init__(self, n: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, 0
        self.rank, self.world_size = rank, world_size
        self.size = 0  # progressive resizing: the epoch's input size, sent to the workers with every index

    def set_size(self, size: int) -> None:
        self.size = size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.n // self.world_size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        base = (self.seed * 1_000_003 + self.epoch) % 2**62
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(base)).tolist()
        else:
            order = list(range(self.n))
        if self.world_size > 1:
            padded = order + order[: len(self) * self.world_size - self.n]
            order = padded[self.rank :: self.world_size]
        for i in order:
            if self.size:
                yield int(i), (base * 1_000_033 + int(i)) % 2**62, self.size
            else:
                yield int(i), (base * 1_000_033 + int(i)) % 2**62


class ImageDataset(Dataset):
    """Yields ``(image, label, index, ok)``; index with an int, or with ``(index, seed)`` from :class:`EpochSampler`
    to seed the photo's augmentation.

    ``ok`` is False when the photo could not be decoded; the training loop lists it in ``skipped.csv``. In training
    mode a bad photo is replaced by the next good one so a batch stays full; in eval mode a zero image is returned
    and the caller drops or fills that row. Sources are paths or encoded bytes (see :func:`load_rgb`).
    """

    def __init__(
        self,
        sources: Sequence[ImageSource],
        labels: Sequence[int] | None,
        transform: Callable,
        target: int,
        draft_factor: float = 2.0,
        substitute: bool = False,
        max_pixels: int | None = None,
    ) -> None:
        self.sources = list(sources)
        self.labels = list(labels) if labels is not None else [-1] * len(self.sources)
        self.transform = transform
        self.target = target
        self.draft_factor = draft_factor
        self.substitute = substitute
        self.max_pixels = max_pixels  # data.max_pixels (0: no limit); None keeps Pillow's own guard
        self._shapes: dict[int | None, tuple[int, ...]] = {}  # a good photo's tensor shape, per input size
        self.transforms: dict[int, Callable] = {}  # progressive resizing: transform per input size
        self._size: int | None = None

    def __len__(self) -> int:
        return len(self.sources)

    def _transform(self) -> Callable:
        """The transform of the current input size (progressive resizing), else the dataset's own."""
        return self.transform if self._size is None else self.transforms[self._size]

    def _load(self, i: int) -> torch.Tensor:
        x = self._transform()(load_rgb(self.sources[i], self.target, self.draft_factor, self.max_pixels))
        self._shapes[self._size] = tuple(x.shape)
        return x

    def _blank(self) -> torch.Tensor:
        """The zero image standing in for a photo that failed to decode, shaped as the good photos of this input
        size are (non-square inputs too), learnt from a grey stand-in when no photo has decoded yet."""
        shape = self._shapes.get(self._size)
        if shape is None:
            side = 2 * max(self.target, 1)
            grey = Image.new("RGB", (side, side), (128, 128, 128))
            shape = self._shapes[self._size] = tuple(self._transform()(grey).shape)
        return torch.zeros(shape, dtype=torch.uint8)

    def _get(self, i: int):
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
            return self._blank(), self.labels[i], i, False

    def __getitem__(self, key: int | tuple[int, int] | tuple[int, int, int]):
        if not isinstance(key, tuple):
            return self._get(key)
        i, seed = key[:2]
        self._size = key[2] if len(key) == 3 else None
        if self._size is not None and self._size not in self.transforms:
            raise KeyError(f"no transform for input size {self._size}: give ImageDataset.transforms one")
        if get_worker_info() is not None:  # a worker process: its RNGs serve this dataset alone
            seed_everything(seed)
            return self._get(i)
        # In the main process (num_workers=0) keep the caller's RNG streams (dropout, Mixup) untouched.
        states = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            seed_everything(seed)
            return self._get(i)
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])


def make_loader(
    ds: ImageDataset, batch_size: int, workers: int, shuffle: bool = False, seed: int = 0, pin_memory: bool = False,
    drop_last: bool = False, rank: int = 0, world_size: int = 1,
) -> DataLoader:
    """A DataLoader over ``ds`` driven by an :class:`EpochSampler` (``loader.sampler.set_epoch(e)`` before epoch e);
    workers persist across epochs."""
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=EpochSampler(len(ds), shuffle, seed, rank, world_size),
        drop_last=drop_last,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers else None,
        # Worker base seeds come from the loader's own generator, not the global one: creating an iterator (once
        # per fold, or again after a resume) must not shift the RNG stream that dropout and Mixup draw from.
        generator=torch.Generator().manual_seed(seed),
    )


def eval_batches(ds: ImageDataset, batch_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """The batches ``make_loader(ds, batch_size, 0)`` yields, (x, y, index, ok), decoded in this thread without a
    DataLoader: no per-photo save, seed and restore of the RNGs (an eval transform draws no random numbers), and
    the photos stacked by numpy in this thread, not by torch's intra-op pool, whose idle threads spin against an
    ONNX Runtime session on the same cores. Prediction in memory (the service's micro-batches) uses it: there the
    DataLoader's per-photo overhead was about a third of a batch's time."""
    for start in range(0, len(ds), batch_size):
        items = [ds[i] for i in range(start, min(start + batch_size, len(ds)))]
        yield (torch.from_numpy(np.stack([it[0].numpy() for it in items])), torch.tensor([it[1] for it in items]),
               torch.tensor([it[2] for it in items]), torch.tensor([it[3] for it in items]))
