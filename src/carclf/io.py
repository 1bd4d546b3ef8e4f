"""Atomic file writes: a crash or Ctrl-C never leaves a half-written artefact behind."""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: Path | str, write: Callable[[Any], None], mode: str = "w", **open_kw: Any) -> None:
    """Call ``write(fileobj)`` on a temp file in the same folder, then rename it onto ``path``.

    The temp file is ``.<name>.<pid>.<random hex>.tmp``, created 0o666 so the kernel applies the umask as open()
    would (never os.umask: changing it races with other threads creating files).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, mode, **open_kw) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text), "w", encoding="utf-8")


def atomic_torch_save(obj: Any, path: Path | str) -> None:
    import torch

    atomic_write(path, lambda fh: torch.save(obj, fh), "wb")


def atomic_savez(path: Path | str, **arrays: Any) -> None:
    import numpy as np

    atomic_write(path, lambda fh: np.savez(fh, **arrays), "wb")


def file_sha256(path: Path | str) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (checkpoints and ONNX graphs are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_yaml(path: Path, remedy: str) -> Any:
    """A YAML file carclf wrote, or a CarclfError naming it and ``remedy`` when it is not readable YAML."""
    import yaml

    from carclf.errors import CarclfError

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise CarclfError(f"'{path}' is not readable YAML ({exc}): {remedy}") from None
