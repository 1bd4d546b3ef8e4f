"""The prepare folder, ``<out_dir>/prepare/<data folder name>/``: what ``carclf prepare`` finds in a data root,
shared by every run on that data (``data/prepare.py`` writes it, ``data/rundata.py`` and the reports read it; no
torch anywhere on that path).

::

    manifest.csv     every file: status, size, hashes, duplicate group, exclusion (its ``checks`` column says which
                     probe version read it: older rows are read again)
    duplicates.csv   duplicate groups (exact and near) with their members
    conflicts.csv    groups whose photos sit in more than one class folder, and what was kept
    leaks.csv        train photos with a copy among the test photos
    quarantine.csv   every photo left out of training, with the reason
    classes.csv      the class folders: index, name, photos found and usable, alias
    summary.json     counts, policies, timings, the data root it was made from
    folds-k<K>-s<seed>-<policy>-<fingerprint>.csv    a fold split (data/splits.py names it)
    report.html      with ``carclf prepare --report``
    .prepare.lock    one prepare at a time
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PREPARE_DIR = "prepare"


@dataclass(frozen=True)
class PrepareDir:
    """The files of one prepare folder."""

    path: Path

    @classmethod
    def for_data(cls, out_dir: Path | str, data_root: Path | str) -> PrepareDir:
        """The prepare folder of ``data_root`` under ``out_dir`` (named after the data folder)."""
        return cls(Path(out_dir) / PREPARE_DIR / Path(data_root).resolve().name)

    @property
    def manifest(self) -> Path:
        return self.path / "manifest.csv"

    @property
    def duplicates(self) -> Path:
        return self.path / "duplicates.csv"

    @property
    def conflicts(self) -> Path:
        return self.path / "conflicts.csv"

    @property
    def leaks(self) -> Path:
        return self.path / "leaks.csv"

    @property
    def quarantine(self) -> Path:
        return self.path / "quarantine.csv"

    @property
    def classes(self) -> Path:
        return self.path / "classes.csv"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def report(self) -> Path:
        return self.path / "report.html"

    @property
    def lock(self) -> Path:
        return self.path / ".prepare.lock"
