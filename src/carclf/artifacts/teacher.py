"""A distilled run's ``teacher/`` folder: the one owner of its files and of the teacher's checksum.

::

    RUN_DIR/teacher/
      targets.npz            the teacher's calibrated out-of-fold probabilities over the student's classes, one row
                             per training photo that has one (``paths``, ``folds``, ``probs``), and the unlabeled
                             photos with their SHA-1 (``unlabeled_paths``, ``unlabeled_sha1``): fixed at the start
      targets-fold<k>.npz    distill.targets=nested: student fold k's targets, the out-of-fold rows of the teacher's
                             nested models for fold k (trained with fold k left out, ``nested_path``), with that
                             nested teacher's checksum and path: fixed once fold k has trained an epoch (before,
                             a remade nested teacher replaces them)
      unlabeled-fold<k>.npz  the unlabeled photos' teacher probabilities for student fold k, predicted by models
                             that never saw fold k: the nested teacher's, or (OOF targets) the teacher's fold-k
                             models (``paths``, ``sha1``, ``probs``, ``ok``); -full for the full-data fit (every
                             teacher fold). A cache: keyed by the predicting teacher's checksum and each
                             photo's SHA-1, so a resumed fold or a changed folder predicts only what is new
      unlabeled-skipped.csv  unlabeled photos left out (unreadable, a copy of a labeled photo), with the reason

``run.json`` records the teacher under ``distill`` (path, kind, checksum, alpha, T, the unlabeled source and counts):
the provenance a distilled run adds.
"""

from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np

from carclf.artifacts.ensemble import ENSEMBLE_FILE, OOF_FILE, is_ensemble_dir
from carclf.artifacts.run import FULL, TEACHER_DIR, RunDir, is_teacher_file
from carclf.errors import CarclfError
from carclf.io import atomic_savez, atomic_write_text, file_sha256, read_npz

TARGETS_FILE = "targets.npz"
UNLABELED_SKIPPED = "unlabeled-skipped.csv"
TARGETS_FORMAT = 1
TARGET_KEYS = ("format", "checksum", "classes", "paths", "folds", "probs", "unlabeled_paths", "unlabeled_sha1")
FOLD_TARGET_KEYS = ("format", "checksum", "source", "classes", "paths", "folds", "probs")
UNLABELED_KEYS = ("checksum", "paths", "sha1", "probs", "ok")


def unlabeled_file(k: int) -> str:
    return "unlabeled-full.npz" if k == FULL else f"unlabeled-fold{k}.npz"


def nested_path(path: Path | str, k: int) -> Path:
    """Where a teacher's nested models for fold k live: a sibling run (or ensemble) ``<name>-outer<k>``, trained
    with ``data.outer_fold=k`` (``carclf nest`` makes them)."""
    path = Path(path)
    if not path.name:
        path = path.resolve()
    return path.with_name(f"{path.name}-outer{k}")


def teacher_checksum(path: Path | str) -> str:
    """What the student's targets are a function of, hashed: an ensemble's ``ensemble.yaml`` and ``oof.npz`` (the
    yaml pins every member checkpoint); a run's every completed fold's ``oof.npz``, ``best.pt`` checksum (as
    training recorded it) and temperature. Any retraining, recalibration or rebuilt ensemble changes it."""
    path = Path(path)
    h = hashlib.sha256()
    if is_ensemble_dir(path):
        for name in (ENSEMBLE_FILE, OOF_FILE):
            h.update(f"{name}:{file_sha256(path / name)}\n".encode())
        return h.hexdigest()
    rd = RunDir.open(path)
    for k in rd.completed_folds():
        fp = rd.fold(k)
        h.update(f"{k}:{file_sha256(fp.oof)}:{fp.recorded_best_sha256()}:{rd.temperature(k)!r}\n".encode())
    return h.hexdigest()


def photo_sha1(path: Path | str) -> str:
    """A photo's cache key: the SHA-1 of its bytes ("" when it cannot be read)."""
    h = hashlib.sha1(usedforsecurity=False)
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return ""
    return h.hexdigest()


def _read_targets_file(f: Path, keys: tuple[str, ...]) -> Any:
    """A targets file's arrays, refused when it is damaged or of a newer format than this carclf reads."""
    z = read_npz(f, keys, "start the distilled run again under a new name")
    if int(z["format"]) > TARGETS_FORMAT:
        raise CarclfError(f"'{f}' has format {int(z['format'])}, newer than this carclf reads ({TARGETS_FORMAT}): "
                          "upgrade carclf")
    return z


class TeacherDir:
    """The paths and readers/writers of a run's ``teacher/`` folder."""

    def __init__(self, run_dir: Path | str) -> None:
        self.path = Path(run_dir) / TEACHER_DIR

    @property
    def targets(self) -> Path:
        return self.path / TARGETS_FILE

    @property
    def skipped_csv(self) -> Path:
        return self.path / UNLABELED_SKIPPED

    def unlabeled(self, k: int) -> Path:
        return self.path / unlabeled_file(k)

    def fold_targets(self, k: int) -> Path:
        return self.path / f"targets-fold{k}.npz"

    def write_fold_targets(self, k: int, checksum: str, source: str, classes: list[str], paths: np.ndarray,
                           folds: np.ndarray, probs: np.ndarray) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_savez(self.fold_targets(k), format=np.array(TARGETS_FORMAT), checksum=np.array(checksum),
                     source=np.array(source), classes=np.array(classes, dtype=str),
                     paths=np.asarray(paths, dtype=str), folds=np.asarray(folds, dtype=np.int64),
                     probs=np.asarray(probs, dtype=np.float32))

    def read_fold_targets(self, k: int) -> dict[str, Any]:
        z = _read_targets_file(self.fold_targets(k), FOLD_TARGET_KEYS)
        return {"checksum": str(z["checksum"]), "source": str(z["source"]),
                "classes": [str(c) for c in z["classes"]], "paths": z["paths"].astype(str), "folds": z["folds"],
                "probs": z["probs"]}

    def write_targets(self, checksum: str, classes: list[str], paths: np.ndarray, folds: np.ndarray,
                      probs: np.ndarray, unlabeled: list[str], unlabeled_sha1: list[str]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_savez(self.targets, format=np.array(TARGETS_FORMAT), checksum=np.array(checksum),
                     classes=np.array(classes, dtype=str), paths=np.asarray(paths, dtype=str),
                     folds=np.asarray(folds, dtype=np.int64), probs=np.asarray(probs, dtype=np.float32),
                     unlabeled_paths=np.array(unlabeled, dtype=str),
                     unlabeled_sha1=np.array(unlabeled_sha1, dtype=str))

    def read_targets(self) -> dict[str, Any]:
        z = _read_targets_file(self.targets, TARGET_KEYS)
        return {"checksum": str(z["checksum"]), "classes": [str(c) for c in z["classes"]],
                "paths": z["paths"].astype(str), "folds": z["folds"], "probs": z["probs"],
                "unlabeled": [str(p) for p in z["unlabeled_paths"]],
                "unlabeled_sha1": [str(h) for h in z["unlabeled_sha1"]]}

    def read_unlabeled(self, k: int, checksum: str) -> dict[str, np.ndarray] | None:
        """Fold k's cached unlabeled predictions, or None when there are none for this teacher."""
        f = self.unlabeled(k)
        if not f.is_file():
            return None
        z = read_npz(f, UNLABELED_KEYS, f"delete '{f}' (a cache) and resume")
        if str(z["checksum"]) != checksum:
            return None
        return {"paths": z["paths"].astype(str), "sha1": z["sha1"].astype(str), "probs": z["probs"],
                "ok": z["ok"].astype(bool)}

    def write_unlabeled(self, k: int, checksum: str, paths: list[str], sha1: list[str], probs: np.ndarray,
                        ok: np.ndarray) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_savez(self.unlabeled(k), checksum=np.array(checksum), paths=np.array(paths, dtype=str),
                     sha1=np.array(sha1, dtype=str), probs=np.asarray(probs, dtype=np.float32),
                     ok=np.asarray(ok, dtype=bool))

    def read_skipped(self) -> dict[str, str]:
        if not self.skipped_csv.is_file():
            return {}
        with self.skipped_csv.open(encoding="utf-8", newline="") as fh:
            return {r["path"]: r["reason"] for r in csv.DictReader(fh)}

    def write_skipped(self, skipped: dict[str, str]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["path", "reason"])
        w.writerows(sorted(skipped.items()))
        atomic_write_text(self.skipped_csv, buf.getvalue())


__all__ = ["TEACHER_DIR", "TeacherDir", "is_teacher_file", "nested_path", "photo_sha1", "teacher_checksum",
           "unlabeled_file"]
