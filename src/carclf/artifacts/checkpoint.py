"""A fold's checkpoints: ``best.pt`` (the weights predictions use) and ``last.pt`` (everything ``--resume`` needs).

Both are plain dicts of tensors and plain containers, as torchvision's reference writes them, read with
``torch.load(..., weights_only=True)`` so that opening a run directory from elsewhere cannot run code from it.

- ``best.pt``: ``model`` (state dict), ``epoch``, ``val_log_loss``, ``weights`` (ema, raw or swa), ``config``,
  ``classes``;
- ``last.pt``: ``model``, ``ema``, ``swa``, ``optimizer``, ``scheduler``, ``scaler`` (state dicts or None),
  ``epoch``, ``step``, ``best`` (the best epoch so far and best.pt's SHA-256), ``history`` (metrics.csv's rows),
  ``bad`` (photos that failed to decode), ``config``, ``stopped`` (early stop), and ``plan`` for the full-data fit.

Each carries ``format`` (:data:`FORMAT`) and ``kind`` ("best" or "last"). A file without them was written before
they were added; its keys are those of format 1, and it is read as format 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from carclf.artifacts.run import FoldPaths
from carclf.errors import CarclfError
from carclf.io import atomic_torch_save, file_sha256

FORMAT = 1
BEST, LAST = "best", "last"


def rebuild_hint(kind: str, path: Path) -> str:
    """The command that rebuilds a checkpoint of ``kind`` at ``path`` that this carclf cannot read."""
    if kind == BEST:
        return (f"retrain the fold: move '{path.parent}' away, then run carclf train with the run's recipe, that "
                "fold in train.folds and --resume")
    return f"move '{path}' away, then run carclf train with the run's recipe and --resume to restart this fold"


def write_best(path: Path, model_state: dict, *, epoch: int, val_log_loss: float, weights: str, config: dict,
               classes: list[str]) -> str:
    """Write ``best.pt``; return its SHA-256, which last.pt's ``best`` and summary.json record so that a damaged or
    replaced best.pt is refused wherever it is loaded (``FoldPaths.check_best``)."""
    atomic_torch_save({"model": model_state, "epoch": epoch, "weights": weights, "val_log_loss": val_log_loss,
                       "config": config, "classes": classes, "format": FORMAT, "kind": BEST}, path)
    return file_sha256(path)


def write_last(path: Path, state: dict[str, Any]) -> None:
    """Write ``last.pt`` from the keys listed in this module's docstring."""
    atomic_torch_save({**state, "format": FORMAT, "kind": LAST}, path)


def read_best(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    """``best.pt`` as written by :func:`write_best` (or by a carclf from before ``format``)."""
    return _read(path, BEST, map_location, f"cannot read checkpoint '{path}'")


def read_last(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    """``last.pt`` as written by :func:`write_last` (or by a carclf from before ``format``)."""
    return _read(path, LAST, map_location, f"cannot resume from '{path}'")


def _read(path: Path, kind: str, map_location: Any, failed: str) -> dict[str, Any]:
    import torch

    hint = rebuild_hint(kind, path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors vary; all mean "not a checkpoint carclf wrote"
        raise CarclfError(f"{failed}: {type(exc).__name__}: {exc}. It is damaged or was not written by carclf: {hint}"
                          ) from exc
    if not isinstance(obj, dict) or "model" not in obj:
        raise CarclfError(f"{failed}: it holds no model weights, so carclf did not write it: {hint}")
    found = obj.get("format", 1)  # written before checkpoints carried a format: format 1's keys
    if found != FORMAT:
        raise CarclfError(f"{failed}: it is checkpoint format {found!r}, this carclf reads format {FORMAT}: {hint}")
    if obj.get("kind", kind) != kind:
        raise CarclfError(f"{failed}: it is a {obj['kind']}.pt checkpoint, not a {kind}.pt one: {hint}")
    return obj


def checked_best_sha256(fp: FoldPaths, best: dict) -> str:
    """``best.pt``'s SHA-256 for the fold ``fp``, refused when it is not the hash
    last.pt's ``best`` recorded when the file was written (best.pt damaged while the run was stopped); a last.pt from
    before hashes were recorded is taken as it is."""
    return fp.check_best(best.get("sha256") or None, fp.last.name)
