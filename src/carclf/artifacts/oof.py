"""Out-of-fold rows: the one reader and writer of a fold's ``oof.npz`` and the reader of an ensemble's, and
:class:`OofSet`, the table the report, evaluate, the ensemble step and export's int8 check all read.

A fold's ``oof.npz`` (written last by training: its presence marks the fold complete)::

    indices          (n,) dataset index of each out-of-fold photo
    labels           (n,) model-class label
    original_labels  (n,) label among the original (pre-merge) classes: the photo's folder
    paths            (n,) photo path relative to the data root ("train/<class>/<file>")
    logits           (n, C) float32, averaged over the views of predict.tta
    views, view_logits   (optional) names and (V, n, C) float16 logits of every view in predict.oof_views
    features         (optional) (n, D) float16 penultimate features (predict.oof_features)

An ensemble's ``oof.npz``: ``paths``, ``labels`` (the submission's columns), ``folds``, ``probs``, ``probs_raw`` and
optionally ``features``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from carclf.artifacts.ensemble import OOF_FILE, is_ensemble_dir, read_ensemble
from carclf.artifacts.run import FoldPaths, RunDir, retrain_hint
from carclf.data.merges import MergeMap, identity
from carclf.errors import CarclfError
from carclf.io import atomic_savez, read_npz
from carclf.metrics import softmax

FOLD_KEYS = ("indices", "labels", "original_labels", "paths", "logits")
FOLD_OPTIONAL = ("views", "view_logits", "features")
ENSEMBLE_KEYS = ("paths", "labels", "folds", "probs", "probs_raw")


def read_fold_oof(fold: FoldPaths, keys: tuple[str, ...] = FOLD_KEYS,
                  optional: tuple[str, ...] = FOLD_OPTIONAL) -> dict[str, Any]:
    """The arrays of a fold's oof.npz (``keys`` required, ``optional`` where present), never unpickling."""
    return read_npz(fold.oof, keys, retrain_hint(fold), optional=optional)


def write_fold_oof(fold: FoldPaths, **arrays: Any) -> None:
    """Write a fold's oof.npz atomically (last: its presence marks the fold complete)."""
    missing = [k for k in FOLD_KEYS if k not in arrays]
    if missing:
        raise ValueError(f"oof.npz needs {', '.join(missing)}")
    atomic_savez(fold.oof, **arrays)


def write_ensemble_oof(folder: Path, **arrays: Any) -> None:
    atomic_savez(Path(folder) / OOF_FILE, **arrays)


@dataclass
class OofSet:
    source: str  # the run (or ensemble) folder
    classes: list[str]  # the model's classes: the columns of probs
    merge: MergeMap  # model classes -> the submission's original classes
    paths: np.ndarray  # (n,) photo path relative to the data root, e.g. "train/<class>/<file>"
    labels: np.ndarray  # (n,) model-class label
    original_labels: np.ndarray  # (n,) label among merge.original (the photo's folder)
    folds: np.ndarray  # (n,) fold the photo was validated in
    probs_raw: np.ndarray  # (n, classes) float64, temperature 1
    probs: np.ndarray  # (n, classes) float64, calibrated
    features: np.ndarray | None  # (n, dim) float32 penultimate features, None when a fold did not keep them
    temperatures: dict[int, float]  # fold -> temperature (an ensemble's final temperature under key -1)
    eps: float  # the submission's clipping (predict.eps)

    def __len__(self) -> int:
        return len(self.labels)


def load_run_oof(run_dir: Path | str) -> OofSet:
    """Every completed fold's out-of-fold rows of a run, in fold order."""
    rd = RunDir.open(run_dir)
    cfg = rd.read_config()
    meta = rd.read_meta()
    folds = rd.completed_folds()
    if not folds:
        raise CarclfError(f"'{rd.path}' has no completed fold (no oof.npz): finish training with --resume first")
    parts: dict[str, list] = {k: [] for k in ("paths", "labels", "orig", "fold", "raw", "cal", "feat")}
    temps = {}
    for k in folds:
        t = rd.temperature(k)
        temps[k] = t
        z = read_fold_oof(rd.fold(k), ("logits", "paths", "labels", "original_labels"), ("features",))
        logits = z["logits"].astype(np.float64)
        parts["paths"].append(z["paths"].astype(str))
        parts["labels"].append(z["labels"])
        parts["orig"].append(z["original_labels"])
        parts["fold"].append(np.full(len(logits), k))
        parts["raw"].append(softmax(logits))
        parts["cal"].append(softmax(logits, t))
        parts["feat"].append(z["features"].astype(np.float32) if "features" in z else None)
    feats = None if any(f is None for f in parts["feat"]) else np.concatenate(parts["feat"])
    return OofSet(
        source=str(rd.path), classes=meta["classes"], merge=rd.merge_map(meta), paths=np.concatenate(parts["paths"]),
        labels=np.concatenate(parts["labels"]), original_labels=np.concatenate(parts["orig"]),
        folds=np.concatenate(parts["fold"]), probs_raw=np.concatenate(parts["raw"]),
        probs=np.concatenate(parts["cal"]), features=feats, temperatures=temps, eps=cfg.predict.eps,
    )


def ensemble_oof(path: Path | str) -> OofSet:
    """An ensemble's out-of-fold rows: the chosen recipe's cross-validated probabilities (each row predicted by a fit
    that did not see it), over the submission's classes (``classes`` = the submission's columns, ``merge`` the
    identity, labels = the photo's folder). ``probs_raw`` is the same recipe without member temperatures and final
    calibration; ``folds`` the first member's training folds; ``features`` the first member's, when it kept them."""
    path = Path(path)
    doc = read_ensemble(path)
    f = path / OOF_FILE
    if not f.is_file():
        raise CarclfError(f"'{f}' is missing: rebuild the ensemble with carclf ensemble --overwrite")
    z = read_npz(f, ENSEMBLE_KEYS, "rebuild the ensemble with carclf ensemble --overwrite", optional=("features",))
    classes = list(doc["classes"])
    return OofSet(
        source=str(path), classes=classes, merge=identity(classes), paths=z["paths"].astype(str),
        labels=z["labels"], original_labels=z["labels"], folds=z["folds"],
        probs_raw=z["probs_raw"].astype(np.float64), probs=z["probs"].astype(np.float64),
        features=z["features"].astype(np.float32) if "features" in z else None,
        temperatures={-1: float(doc["calibration"].get("temperature", 1.0))}, eps=float(doc["eps"]),
    )


def load_oof(path: Path | str) -> OofSet:
    """A run's or an ensemble's out-of-fold rows."""
    return ensemble_oof(path) if is_ensemble_dir(path) else load_run_oof(path)
