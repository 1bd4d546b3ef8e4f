"""The report folder's names (``carclf report`` writes them; ``train --overwrite`` of a run deletes RUN/report/ with
the run, since it describes the old run's OOF predictions, but only when it carries the report's marker and holds
only its files). Defined here, once, so that the run directory need not import the report (matplotlib)."""

from __future__ import annotations

from pathlib import Path

from carclf.artifacts.owned import OwnedFolder, is_temp

REPORT_DIR = "report"
REPORT_MARKER = ".carclf-report"
REPORT_PLOTS = {"curves": "curves.png", "calibration": "calibration.png", "worst": "worst_classes.png",
                "embedding": "embedding.png"}
REPORT_FEATURE_CACHE = "features.npz"
REPORT_FILES = {"report.html", "report.json", "per_class.csv", "label_issues.csv", "confusable.yaml", "thumbs",
                REPORT_FEATURE_CACHE, *REPORT_PLOTS.values(), REPORT_MARKER}
# --overwrite keeps the features cache: it depends on the fold models, not on what the report shows.
REPORT_FOLDER = OwnedFolder("report folder", REPORT_MARKER, lambda _: REPORT_FILES, "a report",
                            keep=frozenset({REPORT_MARKER, REPORT_FEATURE_CACHE}), temps_ours=False)


def report_entry_unknown(entry: Path) -> list[str] | None:
    """For a run's or an ensemble's own ``report/`` entry: what carclf did not write in it, as paths relative to the
    parent ("report/notes.txt"), or ["report"] when it is not a report carclf made; None for any other entry."""
    if entry.name != REPORT_DIR:
        return None
    if not (entry.is_dir() and not entry.is_symlink() and (entry / REPORT_MARKER).is_file()):
        return [entry.name]
    return sorted(f"{entry.name}/{c.name}" for c in entry.iterdir()
                  if c.name not in REPORT_FILES and not is_temp(c.name))


def report_dir(source: Path | str) -> Path:
    """Where ``carclf report SOURCE`` writes by default: SOURCE/report/."""
    return Path(source) / REPORT_DIR
