"""Atomic file writes: a crash or Ctrl-C never leaves a half-written artefact behind."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path | str, write: Callable[[Any], None], mode: str = "w", **open_kw: Any) -> None:
    """Call ``write(fileobj)`` on a temp file in the same folder, then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **open_kw) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the mode open() would have
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text), "w", encoding="utf-8")


def atomic_torch_save(obj: Any, path: Path | str) -> None:
    import torch

    atomic_write(path, lambda fh: torch.save(obj, fh), "wb")


def atomic_savez(path: Path | str, **arrays: Any) -> None:
    import numpy as np

    atomic_write(path, lambda fh: np.savez(fh, **arrays), "wb")
