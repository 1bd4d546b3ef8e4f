"""Atomic file writes: a crash or Ctrl-C never leaves a half-written artefact behind."""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# errno values meaning "no room left": the disk is full, or the user's quota is spent.
DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# torch.save reports a write that failed inside its zip writer as its own RuntimeError, sometimes without the OSError
# behind it: a full disk then, if this little space is left when it fails.
NEARLY_FULL_BYTES = 64 << 20


def atomic_write(path: Path | str, write: Callable[[Any], None], mode: str = "w", **open_kw: Any) -> None:
    """Call ``write(fileobj)`` on a temp file in the same folder, then rename it onto ``path``.

    The temp file is ``.<name>.<pid>.<random hex>.tmp``, created 0o666 so the kernel applies the umask as open()
    would (never os.umask: changing it races with other threads creating files).

    A write that fails because the disk is full (or the quota spent) removes the temp file and raises one
    :class:`~carclf.errors.CarclfError` naming ``path`` and the space left, instead of the writer's own error (torch's
    is a 50-line traceback ending in ``inline_container.cc ... unexpected pos``, naming no file).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as exc:  # no inode left
        if exc.errno in DISK_FULL_ERRNOS:
            raise disk_full_error(path) from exc
        raise
    try:
        with os.fdopen(fd, mode, **open_kw) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except Exception as exc:
        full = is_disk_full(exc, path.parent)  # before the temp file goes: it holds the space that ran out
        tmp.unlink(missing_ok=True)
        if full:
            raise disk_full_error(path) from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception it was raised from or while handling."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def is_disk_full(exc: BaseException, folder: Path) -> bool:
    """Did a write into ``folder`` fail for want of space: ENOSPC / EDQUOT anywhere in the exception chain, or
    torch's own write failure ('unexpected pos', no errno) while the disk has under 64 MiB left."""
    chain = list(_chain(exc))
    if any(isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS for e in chain):
        return True
    torch_write = any(isinstance(e, RuntimeError) and ("unexpected pos" in str(e) or "write" in str(e).lower())
                      for e in chain)
    free = _free_bytes(folder) if torch_write else None
    return free is not None and free < NEARLY_FULL_BYTES


def _size(n: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def disk_full_error(path: Path):
    """The one-line error of a write to ``path`` that ran out of space (the partial file already removed)."""
    from carclf.errors import CarclfError

    free = _free_bytes(path.parent)
    room = f"{_size(free)} free there now, the partial file removed" if free is not None else "partial file removed"
    return CarclfError(
        f"cannot write '{path}': the disk is full ({room}; '{path}' itself is unchanged). Free some space on that "
        "disk, then run the command again: an interrupted carclf train continues from its last epoch with --resume"
    )


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


def read_npz(path: Path | str, keys: tuple[str, ...], remedy: str, optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """The arrays ``keys`` (and those of ``optional`` that are there) of an .npz carclf wrote, read into memory; a
    CarclfError naming the file, what is wrong and ``remedy`` when it is not readable, lacks one of ``keys``, or
    holds an object array (pickled Python objects, never loaded: ``allow_pickle`` stays off)."""
    import zipfile

    import numpy as np

    from carclf.errors import CarclfError

    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise CarclfError(f"'{path}' lacks {', '.join(missing)}: {remedy}")
            out = {}
            for k in (*keys, *(o for o in optional if o in z.files)):
                try:
                    out[k] = z[k]
                except ValueError as exc:
                    if "allow_pickle" not in str(exc):
                        raise
                    raise CarclfError(f"'{path}' holds an object array ('{k}': pickled Python objects, which carclf "
                                      f"never loads), so carclf did not write it: {remedy}") from None
            return out
    except CarclfError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        reason = "pickled Python objects, which carclf never loads" if "pickled" in str(exc) else str(exc)
        raise CarclfError(f"'{path}' is not a readable .npz ({type(exc).__name__}: {reason}): {remedy}") from None


def read_yaml(path: Path, remedy: str) -> Any:
    """A YAML file carclf wrote, or a CarclfError naming it and ``remedy`` when it is not readable YAML."""
    import yaml

    from carclf.errors import CarclfError

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise CarclfError(f"'{path}' is not readable YAML ({exc}): {remedy}") from None
