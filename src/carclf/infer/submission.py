"""The submission file: columns exactly those of sample_submission.csv, rows its IDs (what the scorer reads)."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np

from carclf.data.scan import column_key, read_csv_rows
from carclf.errors import CarclfError
from carclf.io import atomic_write_text


def check_output(path: Path | str, overwrite: bool = False) -> Path:
    """Refuse an output path the submission cannot be written to, before any work: a folder, a file already there
    (without ``overwrite``), a file where a parent folder should be, or a folder this process may not write in.
    Missing parent folders are fine: they are created."""
    path = Path(path)
    if path.is_dir():
        raise CarclfError(f"-o '{path}' is a folder: give the submission's file name, e.g. -o "
                          f"{path / 'submission.csv'}")
    if path.exists() and not overwrite:
        raise CarclfError(f"'{path}' already exists: pass --overwrite to replace it or choose another -o")
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise CarclfError(f"-o '{path}': '{parent}' is a file, not a folder: choose another -o")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CarclfError(f"-o '{path}': this user may not write in '{parent}': choose another -o")
    return path


def read_sample_ids(path: Path) -> list[str]:
    """The row IDs of ``sample_submission.csv``, in its order: the rows the scorer reads."""
    _, rows = read_csv_rows(path)
    return [r[0].strip() for r in rows if r and r[0].strip()]


def align_columns(probs: np.ndarray, classes: list[str], columns: list[str], source: str = "sample_submission.csv"):
    """Reorder ``probs`` (columns = ``classes``) into ``columns``, matching by NFC, stripped name; name any mismatch."""
    own = {column_key(c): i for i, c in enumerate(classes)}
    keys = [column_key(c) for c in columns]
    missing = [c for c, k in zip(columns, keys, strict=True) if k not in own]
    known = set(keys)
    extra = [c for c in classes if column_key(c) not in known]
    if missing or extra:
        raise CarclfError(
            f"{source} does not match the trained classes: "
            f"{len(missing)} column(s) the model does not know ({', '.join(missing[:5]) or '-'}), "
            f"{len(extra)} trained class(es) with no column ({', '.join(extra[:5]) or '-'}). "
            "Train on the same class folders as the submission, or fix the sample file."
        )
    return probs[:, [own[k] for k in keys]]


def finalize(probs: np.ndarray, eps: float) -> np.ndarray:
    """Clip to [eps, 1-eps] and renormalise; refuse NaN/inf rather than write a file the scorer rejects."""
    if not np.isfinite(probs).all():
        raise CarclfError("predictions contain NaN or infinity: the model or its calibration is broken")
    p = np.clip(probs.astype(np.float64), eps, 1 - eps)
    p /= p.sum(axis=1, keepdims=True)
    return p


def validate(p: np.ndarray, n_rows: int, n_cols: int) -> None:
    if p.shape != (n_rows, n_cols):
        raise CarclfError(f"submission has shape {p.shape}, expected ({n_rows}, {n_cols})")
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise CarclfError("submission has values outside [0, 1]")
    if not np.allclose(p.sum(axis=1), 1.0, atol=1e-6):
        raise CarclfError("submission rows do not sum to 1")


def write_submission(
    path: Path | str, ids: list[str], probs: np.ndarray, classes: list[str], columns: list[str], eps: float = 1e-6,
    overwrite: bool = False,
) -> Path:
    """Validate and atomically write ``ID,<columns...>``, the columns exactly as given (as sample_submission.csv has
    them); refuse to replace an existing file unless asked."""
    path = check_output(path, overwrite)
    if len(ids) != len(probs):
        raise CarclfError(f"{len(ids)} test IDs but {len(probs)} predictions")
    p = finalize(align_columns(probs, classes, columns), eps)
    validate(p, len(ids), len(columns))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["ID", *columns])
    for i, row in zip(ids, p, strict=True):
        w.writerow([i, *(f"{v:.8g}" for v in row)])
    atomic_write_text(path, buf.getvalue())
    return path
