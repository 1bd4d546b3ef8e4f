"""Folders carclf owns (a run, an ensemble, an export, a report, the demo's): their marker, ``--overwrite``, and
the temp files an interrupted write leaves.

One rule everywhere: ``--overwrite`` deletes a folder's contents only when carclf made the folder (its marker, or
what an older carclf left in its place) and every entry in it is something carclf writes there; anything of the
user's stops it before anything is deleted. Written by hand: no maintained library does "delete only what we
wrote".
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carclf.errors import CarclfError
from carclf.io import atomic_write_text

# Temp files of io.atomic_write (``.<name>.<pid>.<16 hex>.tmp``) and of RunDir.copy_folds, by the file they stand for.
_TEMP_RE = re.compile(r"\.(?P<name>.+?)(\.\d+\.[0-9a-f]{16}|\.copy)\.tmp")


def is_temp(name: str) -> bool:
    """An atomic write's temp file (``.<name>.<random>.tmp``), left behind only if a process was killed mid-write."""
    return name.startswith(".") and name.endswith(".tmp")


def remove_stale_temps(folder: Path, names: set[str]) -> list[Path]:
    """Delete the temp files that interrupted atomic writes of ``names`` left in ``folder`` (a process killed while
    writing; ``kill -9`` runs no cleanup). Only with the lock held under which those files are written: then no live
    process is writing one. Anything else, a user's ``.notes.tmp`` included, stays."""
    removed = []
    for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
        m = _TEMP_RE.fullmatch(entry.name)
        if m and m.group("name") in names and entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def remove_entry(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink()


@dataclass(frozen=True)
class OwnedFolder:
    """One kind of folder carclf owns.

    ``names(folder)``: the top-level names carclf writes there; ``unknown(entry)``, where one entry needs a deeper
    look (a run's fold folders): the paths inside the folder carclf did not write; ``made(folder)``: whether carclf
    made it (default: the marker is there); ``keep``: names ``--overwrite`` leaves in place (a lock folder, a cache
    that does not depend on what is replaced)."""

    what: str  # "export directory": how messages name it
    marker: str  # the marker file's name
    names: Callable[[Path], set[str]]
    one: str  # "an export": what one result of ours in such a folder is called, for the refusals
    flag: str = "-o"  # the option that names the folder, for "choose another ..."
    made: Callable[[Path], bool] | None = None
    unknown: Callable[[Path], list[str]] | None = None
    keep: frozenset[str] = field(default_factory=frozenset)
    # Whether temp-looking entries (``.<name>.<...>.tmp``) are ours to delete with the rest: an atomic write of
    # ours left them, and the folder's lock says no live process writes there. A folder written without a lock
    # (the report) leaves them: a second process may be writing one, or it is the user's.
    temps_ours: bool = True

    def is_made(self, folder: Path) -> bool:
        return self.made(folder) if self.made else (Path(folder) / self.marker).is_file()

    def content(self, folder: Path) -> list[Path]:
        """The entries ``--overwrite`` would delete (temp files and ``keep`` aside)."""
        folder = Path(folder)
        if not folder.is_dir():
            return []
        return [e for e in sorted(folder.iterdir()) if e.name not in self.keep and not is_temp(e.name)]

    def foreign(self, folder: Path) -> list[str]:
        """What carclf did not write in ``folder``, as paths relative to it."""
        if self.unknown:
            return [rel for e in self.content(folder) for rel in self.unknown(e)]
        ours = self.names(Path(folder)) | {self.marker}
        return [e.name for e in self.content(folder) if e.name not in ours]

    def owned_entries(self, folder: Path) -> list[Path]:
        """The entries to delete, once it is sure carclf made ``folder`` and wrote every one of them."""
        folder = Path(folder)
        if not self.is_made(folder):
            raise CarclfError(
                f"--overwrite: '{folder}' was not made by carclf: it does not hold {self.one} made by carclf (no "
                f"{self.marker}), so nothing there is deleted. Choose another {self.flag}, or move or delete the "
                "folder yourself."
            )
        foreign = self.foreign(folder)
        if foreign:
            listed = ", ".join(f"'{rel}'" for rel in foreign[:5])
            more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
            raise CarclfError(
                f"--overwrite: the {self.what} '{folder}' holds things carclf did not write ({listed}{more}), so "
                f"nothing was deleted. Move them out first, or choose another {self.flag}."
            )
        return [e for e in sorted(folder.iterdir())
                if e.name not in self.keep and (self.temps_ours or not is_temp(e.name))]

    def check(self, folder: Path, overwrite: bool) -> list[Path]:
        """Whether ``folder`` may be written, deleting nothing: a missing or empty folder may; one holding an earlier
        result of ours only with ``overwrite``; anything else is refused. Returns what ``--overwrite`` will delete."""
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise CarclfError(f"{self.flag} '{folder}' exists and is not a folder: choose another {self.flag}")
        if not self.content(folder):
            return []
        if not overwrite:
            made = self.is_made(folder)
            held = f"an earlier {self.one.split(' ', 1)[1]}" if made else "files of yours"
            raise CarclfError(f"'{folder}' already holds {held}: "
                              + (f"pass --overwrite to replace it, or choose another {self.flag}" if made else
                                 f"choose another {self.flag}, or move them away"))
        return self.owned_entries(folder)

    def make_room(self, folder: Path, overwrite: bool) -> bool:
        """:meth:`check`, then delete what it allows and create the folder. Returns whether carclf had made the
        folder already (its marker need not be written again)."""
        folder = Path(folder)
        for entry in self.check(folder, overwrite):
            remove_entry(entry)
        made = folder.is_dir() and self.is_made(folder)
        folder.mkdir(parents=True, exist_ok=True)
        return made

    def mark(self, folder: Path, doc: dict[str, Any]) -> None:
        """Write the marker (JSON) that says carclf made ``folder``."""
        atomic_write_text(Path(folder) / self.marker, json.dumps(doc, default=str) + "\n")
