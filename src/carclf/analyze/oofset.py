"""Out-of-fold predictions of a run (or, through :mod:`carclf.ensemble`, of an ensemble) as one table of rows.

The report, the ensemble step and export's int8 check all read out-of-fold photos the same way: one row per photo
with its path, label, fold, raw and calibrated probabilities over the model's classes, and (where training kept
them) its penultimate features."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from carclf.analyze.metrics import softmax
from carclf.data.merges import MergeMap, identity
from carclf.errors import CarclfError
from carclf.io import read_npz
from carclf.rundir import RunDir, retrain_hint


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
    classes = meta["classes"]
    merge = MergeMap.from_dict(meta["merge"]) if "merge" in meta else identity(classes)
    folds = rd.completed_folds()
    if not folds:
        raise CarclfError(f"'{rd.path}' has no completed fold (no oof.npz): finish training with --resume first")
    parts: dict[str, list] = {k: [] for k in ("paths", "labels", "orig", "fold", "raw", "cal", "feat")}
    temps = {}
    for k in folds:
        t = rd.temperature(k)
        temps[k] = t
        z = read_npz(rd.fold(k).oof, ("logits", "paths", "labels", "original_labels"), retrain_hint(rd.fold(k)),
                     optional=("features",))
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
        source=str(rd.path), classes=classes, merge=merge, paths=np.concatenate(parts["paths"]),
        labels=np.concatenate(parts["labels"]), original_labels=np.concatenate(parts["orig"]),
        folds=np.concatenate(parts["fold"]), probs_raw=np.concatenate(parts["raw"]),
        probs=np.concatenate(parts["cal"]), features=feats, temperatures=temps, eps=cfg.predict.eps,
    )


def load_oof(path: Path | str) -> OofSet:
    """A run's or an ensemble's out-of-fold rows (an ensemble folder holds ensemble.yaml)."""
    if (Path(path) / "ensemble.yaml").is_file():
        from carclf.ensemble import ensemble_oof  # built by the ensemble step

        return ensemble_oof(path)
    return load_run_oof(path)
