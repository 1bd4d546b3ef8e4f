"""``ensemble.yaml``: what an ensemble folder holds and how the Predictor rebuilds it.

::

    ENSEMBLE_DIR/
      ensemble.yaml     members (run path, folds, sha256 of each best.pt, weight, temperature, TTA policy), space,
                        final calibration, clipping eps, the cross-validated OOF figure of every candidate
      calibration.npz   vector / matrix calibration parameters (only for those kinds; its sha256 is in the yaml)
      oof.npz           the chosen ensemble's cross-validated out-of-fold probabilities (artifacts.oof.ensemble_oof)
      evaluation.json   written by ``carclf evaluate ENSEMBLE_DIR``
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from carclf.artifacts.owned import OwnedFolder, is_temp
from carclf.artifacts.report import report_entry_unknown
from carclf.errors import CarclfError
from carclf.io import atomic_savez, file_sha256, read_yaml

ENSEMBLE_FILE = "ensemble.yaml"
KIND = "carclf ensemble"
FORMAT = 1
CALIBRATION_FILE = "calibration.npz"
OOF_FILE = "oof.npz"
# What carclf writes into an ensemble folder: --overwrite deletes these and nothing else.
KNOWN = {ENSEMBLE_FILE, CALIBRATION_FILE, OOF_FILE, "evaluation.json", "report"}


def _readable(path: Path) -> bool:
    try:
        read_ensemble(path)
    except CarclfError:
        return False
    return True


def _entry_unknown(entry: Path) -> list[str]:
    """What carclf did not write in one entry of an ensemble folder (its report/ is looked into, as a run's is)."""
    report = report_entry_unknown(entry)
    if report is not None:
        return report
    return [] if entry.name in KNOWN or is_temp(entry.name) else [entry.name]


# ensemble.yaml is the folder's marker: a folder whose ensemble.yaml carclf can read is an ensemble carclf made.
ENSEMBLE_FOLDER = OwnedFolder("ensemble folder", ENSEMBLE_FILE, lambda _: KNOWN, "an ensemble", made=_readable,
                              unknown=_entry_unknown)


def is_ensemble_dir(path: Path | str) -> bool:
    return (Path(path) / ENSEMBLE_FILE).is_file()


def read_ensemble(path: Path | str) -> dict[str, Any]:
    """The ensemble's description, checked for the fields the Predictor needs."""
    path = Path(path)
    f = path / ENSEMBLE_FILE
    if not f.is_file():
        raise CarclfError(f"'{path}' is not an ensemble folder (no {ENSEMBLE_FILE}): run carclf ensemble first")
    doc = read_yaml(f, "rebuild it with carclf ensemble --overwrite")
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        raise CarclfError(f"'{f}' was not written by carclf ensemble (no 'kind: {KIND}')")
    missing = [k for k in ("format", "classes", "members", "space", "calibration", "eps") if k not in doc]
    if missing:
        raise CarclfError(f"'{f}' lacks {', '.join(missing)}: rebuild it with carclf ensemble --overwrite")
    if doc["format"] > FORMAT:
        raise CarclfError(f"'{f}' has format {doc['format']}, newer than this carclf reads ({FORMAT}): upgrade carclf")
    return doc


def member_run(ens_dir: Path, member: dict[str, Any]) -> Path:
    """A member's run directory: its path relative to the ensemble folder (both moved together), else the absolute
    path recorded when the ensemble was made (the ensemble folder moved alone)."""
    rel = Path(os.path.normpath(ens_dir / member["run"]))
    if rel.is_dir():
        return rel
    absolute = Path(member.get("run_abs", ""))
    if member.get("run_abs") and absolute.is_dir():
        return absolute
    raise CarclfError(
        f"{ens_dir / ENSEMBLE_FILE}: member {member['name']}'s run is missing: neither '{rel}' nor "
        f"'{member.get('run_abs')}' exists. Put the run back, or rebuild the ensemble with carclf ensemble.")


def verify_checksum(ens_dir: Path, member: dict[str, Any], fold: int, best: Path) -> None:
    """Refuse weights that changed since the ensemble was made (retrained or replaced folds)."""
    want = member["best_sha256"][fold]
    if not best.is_file():
        raise CarclfError(f"{ens_dir / ENSEMBLE_FILE}: member {member['name']} fold {fold}: '{best}' is missing. "
                          "Rebuild the ensemble with carclf ensemble --overwrite.")
    have = file_sha256(best)
    if have != want:
        raise CarclfError(
            f"{ens_dir / ENSEMBLE_FILE}: '{best}' has changed since the ensemble was made (sha256 {have[:12]}..., "
            f"recorded {want[:12]}...): its weights, temperatures and TTA were chosen for the old model. Rebuild the "
            "ensemble with carclf ensemble --overwrite.")


def save_calibration(folder: Path, cal: dict[str, Any]) -> dict[str, Any]:
    """The final calibration as YAML data, its arrays (vector / matrix parameters) written to
    ``folder/calibration.npz`` and named there with their sha256: the inverse of :func:`load_calibration`, for an
    ensemble folder and for an export of one."""
    plain = {k: (float(v) if isinstance(v, float | np.floating) else v) for k, v in cal.items()
             if not isinstance(v, np.ndarray)}
    arrays = {k: v for k, v in cal.items() if isinstance(v, np.ndarray)}
    if arrays:
        atomic_savez(folder / CALIBRATION_FILE, **arrays)
        plain.update(file=CALIBRATION_FILE, sha256=file_sha256(folder / CALIBRATION_FILE))
    return plain


def load_calibration(ens_dir: Path, cal: dict[str, Any], fix: str = "Rebuild the ensemble with carclf ensemble "
                     "--overwrite.", listed_in: str = ENSEMBLE_FILE) -> dict[str, Any]:
    """The final calibration with its arrays (vector / matrix parameters live in calibration.npz, in an ensemble
    folder or an export of one)."""
    if "file" not in cal:
        return dict(cal)
    f = ens_dir / cal["file"]
    if not f.is_file():
        raise CarclfError(f"'{f}' is missing: the ensemble's {cal['kind']} calibration is stored there. {fix}")
    if cal.get("sha256") and file_sha256(f) != cal["sha256"]:
        raise CarclfError(f"'{f}' does not match its checksum in {listed_in}: {fix}")
    out = {k: v for k, v in cal.items() if k not in ("file", "sha256")}
    with np.load(f) as z:
        out.update({k: z[k] for k in z.files})
    return out


def relative_run(ens_dir: Path, run: Path) -> str:
    """The run's path relative to the ensemble folder (POSIX separators)."""
    return Path(os.path.relpath(run.resolve(), ens_dir.resolve())).as_posix()
