"""A photo named in a run (an out-of-fold path, a manifest row) found on disk under the data root: the one
resolver, for export's parity check, the report's thumbnails and features, and prepare's report."""

from __future__ import annotations

import os
from pathlib import Path

from carclf.data.scan import nfc


class DataDisk:
    """Photo paths as carclf stores them (NFC, ``/``-separated, relative to the data root) found on disk, where
    folders and files may be NFD (a macOS zip): each component is looked up by its NFC name. The one resolver of a
    stored photo path, for export, report and prepare's report alike."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.listings: dict[Path, dict[str, str]] = {}

    def path(self, rel: str) -> Path:
        """``rel`` under the root, each component as it is spelt on disk (as given when no spelling matches)."""
        cur = self.root
        for part in rel.split("/"):
            if (cur / part).exists() or (cur / part).is_symlink():
                cur = cur / part
                continue
            if cur not in self.listings:
                try:
                    self.listings[cur] = {nfc(n): n for n in os.listdir(cur)}
                except OSError:
                    self.listings[cur] = {}
            cur = cur / self.listings[cur].get(nfc(part), part)
        return cur

    def photo(self, rel: str) -> Path:
        """A stored photo path's file: relative to the data root (``train/<class>/<file>``); runs trained before
        that layout stored ``<class>/<file>``, relative to ``train/``. The path may not exist (a photo since moved)."""
        p = self.path(rel)
        if not p.is_file() and not rel.startswith("train/"):
            q = self.path(f"train/{rel}")
            if q.is_file():
                return q
        return p


def resolve_photo(disk: DataDisk | Path | str, rel: str) -> Path | None:
    """The file of stored photo path ``rel`` (see :class:`DataDisk`), or None when it is not on disk."""
    p = (disk if isinstance(disk, DataDisk) else DataDisk(disk)).photo(rel)
    return p if p.is_file() else None
