"""``RunDir``: the one owner of a run directory's layout, its marker, its locks and which folds are complete.

::

    runs/<name>/
      .carclf-run          marker: this folder was made by carclf (JSON: version, name, created)
      .locks/              run.lock (short: shared files) and fold<k>.lock (held while fold k trains)
      config.yaml          the resolved config
      run.json             classes, merges, data root, folds file, counts
      folds.csv            the split this run trained on
      skipped.csv          photos left out of training, with the reason
      evaluation.json      written by ``carclf evaluate``
      fold<k>/             best.pt  last.pt  metrics.csv  oof.npz  summary.json  calibration.json
                           mlflow_run.json  curves.png   (with tracking on)
      full/                the full-data fit (train.folds=full): best.pt  last.pt  metrics.csv  summary.json
                           (no oof.npz: it has no validation photos; summary.json, written last, marks it complete)

Train, calibrate, evaluate and the Predictor reach these files through this module only. ``--overwrite`` deletes
a folder only when it carries the marker and holds nothing carclf did not write; locks are ``filelock`` locks
(``fcntl``/``msvcrt``), released by the OS when a process dies, so a killed run never leaves a stale lock.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from carclf.artifacts.owned import OwnedFolder, is_temp, remove_entry, remove_stale_temps
from carclf.artifacts.report import report_entry_unknown
from carclf.config import Config, read_config
from carclf.data.merges import MergeMap, identity
from carclf.errors import CarclfError
from carclf.io import atomic_write_text, file_sha256

MARKER = ".carclf-run"
# The run directory's layout version, in the marker ("format"; a marker without one is format 1, as every run before
# the key existed). A newer format than this carclf reads is refused on open, in one line.
RUN_FORMAT = 1
LOCKS = ".locks"
FOLD_RE = re.compile(r"fold(\d+)")
FULL = -1  # the fold number of the full-data fit (train.folds=full), kept in full/
FULL_DIR = "full"
TOP_FILES = {"config.yaml", "run.json", "folds.csv", "skipped.csv", "evaluation.json", MARKER}
FOLD_FILES = {"best.pt", "last.pt", "metrics.csv", "oof.npz", "summary.json", "calibration.json", "curves.png",
              "mlflow_run.json"}
TEACHER_DIR = "teacher"  # a distilled run's teacher targets and caches (carclf.artifacts.teacher)
RUN_LOCK_TIMEOUT = 120.0  # seconds to wait for another process's short update of the shared files


@dataclass(frozen=True)
class FoldPaths:
    """The files of one fold."""

    k: int
    dir: Path

    @property
    def best(self) -> Path:
        return self.dir / "best.pt"

    @property
    def last(self) -> Path:
        return self.dir / "last.pt"

    @property
    def metrics(self) -> Path:
        return self.dir / "metrics.csv"

    @property
    def oof(self) -> Path:
        return self.dir / "oof.npz"

    @property
    def summary(self) -> Path:
        return self.dir / "summary.json"

    @property
    def calibration(self) -> Path:
        return self.dir / "calibration.json"

    @property
    def mlflow_run(self) -> Path:
        """The fold's MLflow run id, so a resumed fold, calibrate and evaluate log into the same run."""
        return self.dir / "mlflow_run.json"

    @property
    def is_full(self) -> bool:
        return self.k == FULL

    @property
    def complete(self) -> bool:
        """A fold is complete once its out-of-fold logits are written (the last thing training does); the
        full-data fit once its summary is."""
        if self.is_full:
            return self.summary.is_file() and self.best.is_file()
        return self.oof.is_file() and self.best.is_file()

    def recorded_best_sha256(self) -> str | None:
        """``best.pt``'s SHA-256 as training recorded it in summary.json when it wrote the file; None for a fold
        trained before carclf recorded it (nothing to check against)."""
        if not self.summary.is_file():
            return None
        try:
            return json.loads(self.summary.read_text(encoding="utf-8")).get("best_sha256")
        except (ValueError, AttributeError) as exc:
            raise CarclfError(f"'{self.summary}' is not a summary carclf wrote ({exc}): {retrain_hint(self)}") from None

    def verify_best(self, sha256: str | None = None) -> None:
        """Refuse a ``best.pt`` whose bytes are not those training wrote (damaged or replaced: its predictions would
        silently not be the model's). ``sha256``: the file's hash when the caller has just computed it."""
        want = self.recorded_best_sha256()
        if want is not None:
            self.check_best(want, self.summary.name, sha256)

    def check_best(self, want: str | None, recorded_in: str, have: str | None = None) -> str:
        """``best.pt``'s SHA-256 (``have`` when the caller has just computed it), refused when it is not ``want``,
        the hash recorded in ``recorded_in`` when training wrote the file; ``want`` None: nothing to check."""
        have = have or file_sha256(self.best)
        if want is not None and have != want:
            raise CarclfError(
                f"'{self.best}' is not the file training wrote (sha256 {have[:12]}..., recorded {want[:12]}... in "
                f"{recorded_in}): it was damaged or replaced. {retrain_hint(self)}"
            )
        return have


class RunDir:
    """A run directory: ``RunDir(path)`` names it; :meth:`open` checks that it is one."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._run_lock_depth = 0  # run_lock is re-entrant within one RunDir object

    def __repr__(self) -> str:
        return f"RunDir('{self.path}')"

    def __str__(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------------------------------------------ layout
    @property
    def marker(self) -> Path:
        return self.path / MARKER

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def meta_path(self) -> Path:
        return self.path / "run.json"

    @property
    def folds_csv(self) -> Path:
        return self.path / "folds.csv"

    @property
    def skipped_csv(self) -> Path:
        return self.path / "skipped.csv"

    @property
    def evaluation_json(self) -> Path:
        return self.path / "evaluation.json"

    def fold(self, k: int) -> FoldPaths:
        """Fold k's files; ``fold(FULL)`` is the full-data fit's."""
        return FoldPaths(k, self.path / (FULL_DIR if k == FULL else f"fold{k}"))

    @property
    def full(self) -> FoldPaths:
        return self.fold(FULL)

    def has_full(self) -> bool:
        """A finished full-data fit (train.folds=full)."""
        return self.full.complete

    def fold_numbers(self) -> list[int]:
        """Every fold that has a folder, complete or not."""
        if not self.path.is_dir():
            return []
        found = (FOLD_RE.fullmatch(p.name) for p in self.path.iterdir() if p.is_dir())
        return sorted(int(m.group(1)) for m in found if m)

    def completed_folds(self) -> list[int]:
        return [k for k in self.fold_numbers() if self.fold(k).complete]

    def incomplete_folds(self) -> list[int]:
        return [k for k in self.fold_numbers() if not self.fold(k).complete]

    # ------------------------------------------------------------------------------------------------ state
    def is_run(self) -> bool:
        """Made by carclf: the marker, or (runs from before the marker existed) config.yaml beside run.json."""
        return self.marker.is_file() or (self.config_path.is_file() and self.meta_path.is_file())

    def not_a_run(self) -> CarclfError:
        """The refusal for a folder of the user's where this run would go: neither --resume nor --overwrite may touch
        it, so suggest neither."""
        return CarclfError(
            f"'{self.path}' already exists and is not a carclf run directory (it was not made by carclf: no {MARKER} "
            "marker), so carclf neither continues it nor deletes it: choose another name=..., or move the folder "
            "elsewhere"
        )

    def exists_nonempty(self) -> bool:
        return self.path.is_dir() and any(p.name != LOCKS for p in self.path.iterdir())

    @classmethod
    def open(cls, path: Path | str, need_folds: bool = True) -> RunDir:
        """An existing run; with ``need_folds``, one with at least one complete fold."""
        rd = cls(path)
        if not rd.path.is_dir():
            raise CarclfError(f"'{rd.path}' does not exist: give the run directory, e.g. runs/<name>")
        if not rd.is_run() or not rd.config_path.is_file():
            raise CarclfError(f"'{rd.path}' is not a carclf run directory (no {MARKER} and config.yaml)")
        rd.check_format()
        if need_folds and not rd.completed_folds():
            raise CarclfError(f"'{rd.path}' has no completed fold (no fold*/oof.npz): train it first")
        return rd

    def format(self) -> int:
        """The layout version in the marker (1 for runs from before the key, and those from before the marker)."""
        try:
            doc = json.loads(self.marker.read_text(encoding="utf-8")) if self.marker.is_file() else {}
        except (OSError, ValueError):
            doc = {}
        fmt = doc.get("format", 1) if isinstance(doc, dict) else 1
        return fmt if isinstance(fmt, int) else 1

    def check_format(self) -> None:
        fmt = self.format()
        if fmt > RUN_FORMAT:
            raise CarclfError(f"'{self.path}' is a run directory of format {fmt}, newer than this carclf reads "
                              f"({RUN_FORMAT}): upgrade carclf (pip install -U carclf), or train it again with this "
                              "one (carclf train --overwrite)")

    def read_config(self) -> Config:
        return read_config(self.config_path)

    def read_meta(self) -> dict[str, Any]:
        if not self.meta_path.is_file():
            raise CarclfError(f"'{self.meta_path}' not found: '{self.path}' was never trained")
        return json.loads(self.meta_path.read_text(encoding="utf-8"))

    def merge_map(self, meta: dict[str, Any] | None = None) -> MergeMap:
        """Model classes -> the submission's original classes (run.json's ``merge``; the identity for a run trained
        without merges)."""
        meta = self.read_meta() if meta is None else meta
        return MergeMap.from_dict(meta["merge"]) if "merge" in meta else identity(meta["classes"])

    def write_meta(self, meta: dict[str, Any]) -> None:
        atomic_write_text(self.meta_path, json.dumps(meta, ensure_ascii=False, indent=1))

    def temperature(self, k: int) -> float:
        """Fold k's fitted temperature, 1.0 before ``carclf calibrate``. The full-data fit has no out-of-fold photos
        to fit one on: it takes the mean of the completed folds' temperatures (same recipe, same epochs)."""
        if k == FULL:
            temps = [self.temperature(j) for j in self.completed_folds()]
            return float(sum(temps) / len(temps)) if temps else 1.0
        path = self.fold(k).calibration
        return float(json.loads(path.read_text(encoding="utf-8"))["temperature"]) if path.is_file() else 1.0

    def eval_size(self, k: int) -> int:
        """The input size fold k was chosen to predict at (``predict.eval_sizes``); 0: the training size."""
        path = self.fold(k).summary
        if not path.is_file():
            return 0
        return int(json.loads(path.read_text(encoding="utf-8")).get("eval_size") or 0)

    # ------------------------------------------------------------------------------------------------ creation
    def create(self, cfg: Config) -> None:
        """Write the marker and the resolved config (call with :meth:`run_lock` held)."""
        from carclf import __version__
        from carclf.config import save_config

        self.path.mkdir(parents=True, exist_ok=True)
        if not self.marker.is_file():
            marker = {"kind": "carclf run", "format": RUN_FORMAT, "name": cfg.name, "carclf": __version__,
                      "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            atomic_write_text(self.marker, json.dumps(marker, indent=1) + "\n")
        save_config(cfg, self.config_path)

    def clear(self, protect: list[Path] = (), dry_run: bool = False) -> None:
        """Delete what carclf wrote here (``--overwrite``), keeping the lock files; refuse a folder carclf did not
        make, one holding files carclf did not write, one with a fold in training, or one that holds ``protect``.
        ``dry_run``: only check."""
        # is_run(): the marker, or config.yaml beside run.json for runs made before the marker existed.
        owned = RUN_FOLDER.owned_entries(self.path)
        here = self.path.resolve()
        for p in protect:
            p = Path(p).resolve()
            if p == here or here in p.parents:
                raise CarclfError(f"--overwrite: '{self.path}' holds '{p}', which carclf must not delete")
        locks = self.path / LOCKS
        held = {int(m.group(1)) for m in (FOLD_RE.fullmatch(f.stem) for f in locks.glob("fold*.lock")) if m}
        held |= {FULL} if (locks / "full.lock").is_file() or self.full.dir.is_dir() else set()
        with contextlib.ExitStack() as stack:  # every fold stays locked until the deletion is done
            for k in sorted(held | set(self.fold_numbers())):
                stack.enter_context(self.fold_lock(k, "--overwrite"))
            if dry_run:
                return
            for entry in owned:
                if entry.name != LOCKS:
                    remove_entry(entry)

    # ------------------------------------------------------------------------------------------------ locks
    def _lock_path(self, name: str) -> Path:
        d = self.path / LOCKS
        d.mkdir(parents=True, exist_ok=True)
        return d / name

    @contextlib.contextmanager
    def run_lock(self) -> Iterator[None]:
        """Held briefly while a process writes the files folds share (config, run.json, folds.csv, skipped.csv).
        Re-entrant within this object."""
        from filelock import FileLock, Timeout

        if self._run_lock_depth:
            self._run_lock_depth += 1
            try:
                yield
            finally:
                self._run_lock_depth -= 1
            return
        lock = FileLock(self._lock_path("run.lock"), timeout=RUN_LOCK_TIMEOUT)
        try:
            lock.acquire()
        except Timeout as exc:
            raise CarclfError(
                f"'{self.path}' has been locked by another carclf process for {RUN_LOCK_TIMEOUT:.0f} s: "
                "wait for it, or end it"
            ) from exc
        self._run_lock_depth = 1
        try:
            yield
        finally:
            self._run_lock_depth = 0
            lock.release()

    @contextlib.contextmanager
    def fold_lock(self, k: int, doing: str = "training") -> Iterator[None]:
        """Held while fold k trains; a second process that wants the same fold is refused at once."""
        from filelock import FileLock, Timeout

        lock = FileLock(self._lock_path(FULL_DIR + ".lock" if k == FULL else f"fold{k}.lock"))
        try:
            lock.acquire(blocking=False)
        except Timeout as exc:
            raise CarclfError(
                f"{fold_name(k)} of '{self.path}' is being trained by another process, so {doing} cannot touch it: "
                "wait for it to finish, or train another fold (train.folds=...) with --resume"
            ) from exc
        try:
            yield
        finally:
            lock.release()

    # ------------------------------------------------------------------------------------------------ skipped
    def update_skipped(self, new: dict[str, str]) -> None:
        """Add rows (path -> reason) to ``skipped.csv``, keeping what other folds and processes recorded."""
        with self.run_lock():
            rows: dict[str, str] = {}
            if self.skipped_csv.is_file():
                with self.skipped_csv.open(encoding="utf-8", newline="") as fh:
                    rows = {r["path"]: r["reason"] for r in csv.DictReader(fh)}
            rows.update(new)
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            w.writerow(["path", "reason"])
            for p, reason in sorted(rows.items()):
                w.writerow([p, reason])
            atomic_write_text(self.skipped_csv, buf.getvalue())

    def read_folds(self) -> dict[str, int]:
        """folds.csv: the fold of every photo the run was split over ({} for a run without one)."""
        if not self.folds_csv.is_file():
            return {}
        with self.folds_csv.open(encoding="utf-8", newline="") as fh:
            return {row["path"]: int(row["fold"]) for row in csv.DictReader(fh)}

    def copy_folds(self, source: Path) -> None:
        """Record the split (called with :meth:`run_lock` held)."""
        tmp = self.folds_csv.with_name(".folds.csv.copy.tmp")
        shutil.copyfile(source, tmp)
        tmp.replace(self.folds_csv)

    def remove_stale_temps(self, k: int | None = None) -> list[Path]:
        """Delete what interrupted atomic writes left: of fold ``k``'s training files (with its :meth:`fold_lock`
        held), or with ``k`` None of the shared files at the top of the run (with :meth:`run_lock` held)."""
        if k is None:
            return remove_stale_temps(self.path, _RUN_LOCKED)
        return remove_stale_temps(self.fold(k).dir, _FOLD_LOCKED)


def fold_name(k: int) -> str:
    """'fold 3', or 'the full-data fit'."""
    return "the full-data fit" if k == FULL else f"fold {k}"


def retrain_hint(fp: FoldPaths) -> str:
    """How to train one fold again from scratch."""
    return (f"Retrain {fold_name(fp.k)}: move '{fp.dir}' away, then run carclf train with the run's recipe, "
            f"train.folds={'full' if fp.is_full else fp.k} and --resume")


# What training writes under a fold's lock (calibration.json is calibrate's, which takes no lock), and under the run
# lock at the top of the run (evaluation.json is evaluate's, which takes none).
_FOLD_LOCKED = FOLD_FILES - {"calibration.json"}
_RUN_LOCKED = {"config.yaml", "run.json", "folds.csv", "skipped.csv", MARKER}


def _run_entry_unknown(entry: Path) -> list[str]:
    """What carclf did not write in one top-level entry of a run directory, as paths relative to the run ("notes.txt",
    "fold0/plot.png"); [] when carclf wrote all of it."""
    name = entry.name
    if name == LOCKS or is_temp(name):
        return []
    report = report_entry_unknown(entry)
    if report is not None:
        return report
    if entry.is_dir() and (FOLD_RE.fullmatch(name) or name == FULL_DIR):
        known = FOLD_FILES
    elif entry.is_dir() and name == TEACHER_DIR:
        return sorted(f"{name}/{c.name}" for c in entry.iterdir() if not is_teacher_file(c.name)
                      and not is_temp(c.name))
    else:
        return [] if name in TOP_FILES and entry.is_file() else [name]
    return sorted(f"{name}/{c.name}" for c in entry.iterdir() if c.name not in known and not is_temp(c.name))


def is_teacher_file(name: str) -> bool:
    """What carclf writes into a distilled run's ``teacher/`` (artifacts/teacher.py's files; ``--overwrite``
    deletes these and nothing else). Here, not there: teacher.py reads runs, so run.py cannot import it."""
    return name in {"targets.npz", "unlabeled-skipped.csv", "unlabeled-full.npz"} or any(
        name.startswith(stem) and name.endswith(".npz") and name[len(stem):-4].isdigit()
        for stem in ("unlabeled-fold", "targets-fold"))


# made: the marker, or config.yaml beside run.json for runs made before the marker existed (RunDir.is_run)
RUN_FOLDER = OwnedFolder("run directory", MARKER, lambda _: TOP_FILES, "a run", flag="name",
                         made=lambda p: RunDir(p).is_run(), unknown=_run_entry_unknown)

__all__ = ["FULL", "MARKER", "RUN_FOLDER", "FoldPaths", "RunDir", "fold_name"]
