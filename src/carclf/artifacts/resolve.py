"""What a path given on the command line is: a run directory, an ensemble folder or an export folder.

Every step that takes "a run, an ensemble or an export" asks here, once, instead of probing for ensemble.yaml or
export.yaml itself."""

from __future__ import annotations

from pathlib import Path

from carclf.artifacts.ensemble import ENSEMBLE_FILE, is_ensemble_dir
from carclf.artifacts.export import EXPORT_FILE, is_export_dir
from carclf.artifacts.run import MARKER, RunDir
from carclf.errors import CarclfError

RUN, ENSEMBLE, EXPORT = "run", "ensemble", "export"
_NAMES = {RUN: f"a run directory ({MARKER})", ENSEMBLE: f"an ensemble folder ({ENSEMBLE_FILE})",
          EXPORT: f"an export folder ({EXPORT_FILE})"}


def kind_of(path: Path | str) -> str | None:
    """``"export"``, ``"ensemble"``, ``"run"``, or None when carclf did not make ``path``."""
    if is_export_dir(path):
        return EXPORT
    if is_ensemble_dir(path):
        return ENSEMBLE
    if Path(path).is_dir() and RunDir(path).is_run():
        return RUN
    return None


def require(path: Path | str, kinds: tuple[str, ...] = (RUN, ENSEMBLE, EXPORT), doing: str = "use") -> str:
    """:func:`kind_of`, refusing (one line naming what ``doing`` takes) a path that is none of ``kinds``."""
    kind = kind_of(path)
    if kind in kinds:
        return kind
    wanted = ", ".join(_NAMES[k] for k in kinds[:-1]) + (" or " if len(kinds) > 1 else "") + _NAMES[kinds[-1]]
    found = f"it is {_NAMES[kind]}" if kind else ("it does not exist" if not Path(path).exists() else
                                                  "carclf did not make it")
    raise CarclfError(f"'{path}': carclf {doing} takes {wanted}, and {found}")
