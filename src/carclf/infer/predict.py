"""``carclf predict``: every fold of a run -> TTA -> calibration -> validated submission.csv.

The submission's rows are sample_submission.csv's IDs, in its order: those are what is scored. Each ID's photo is
test.csv's; an ID test.csv lacks is looked for where test.csv's naming puts it (``./test/<ID>.jpg``), and when it is
not there its row holds the mean prediction, with a warning naming it. test.csv's IDs the sample lacks are left
out, with a warning. A sample with no rows: test.csv's IDs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from carclf.artifacts.resolve import EXPORT, require
from carclf.data.scan import TestSet, read_sample_columns, scan_test
from carclf.errors import CarclfError
from carclf.infer.predictor import ExportRun, Predictor, open_predictor
from carclf.infer.submission import align_columns, check_output, read_sample_ids, write_submission

SHOWN = 5  # IDs named in a warning


@dataclass
class Rows:
    """The submission's rows: ``ids`` with the photo of each (None: no photo to predict)."""

    ids: list[str]
    paths: list[Path | None]
    by_name: list[str] = field(default_factory=list)  # sample IDs test.csv lacks, photo found by its naming
    no_photo: list[str] = field(default_factory=list)  # sample IDs with no photo at all
    dropped: list[str] = field(default_factory=list)  # test.csv IDs the sample lacks


def _naming(test: TestSet) -> tuple[str, str] | None:
    """(prefix, suffix) when every test.csv photo is ``prefix + ID + suffix`` (``.../test/`` + ID + ``.jpg``)."""
    if not test.ids:
        return None
    first, path = test.ids[0], str(test.paths[0])
    at = path.rfind(first)
    if not first or at < 0:
        return None
    prefix, suffix = path[:at], path[at + len(first):]
    if all(str(p) == f"{prefix}{i}{suffix}" for i, p in zip(test.ids, test.paths, strict=True)):
        return prefix, suffix
    return None


def submission_rows(test: TestSet, sample_ids: list[str]) -> Rows:
    """The rows to write: the sample's IDs, each with its photo (see the module's docstring)."""
    if not sample_ids:
        return Rows(list(test.ids), list(test.paths))
    by_id = dict(zip(test.ids, test.paths, strict=True))
    naming = _naming(test)
    rows = Rows(list(sample_ids), [])
    for i in sample_ids:
        path = by_id.get(i)
        if path is None and naming is not None and "/" not in i and "\\" not in i and i not in (".", ".."):
            guess = Path(f"{naming[0]}{i}{naming[1]}")
            if guess.is_file():
                path = guess
                rows.by_name.append(i)
        if path is None:
            rows.no_photo.append(i)
        rows.paths.append(path)
    wanted = set(sample_ids)
    rows.dropped = [i for i in test.ids if i not in wanted]
    return rows


def _listed(ids: list[str]) -> str:
    return ", ".join(ids[:SHOWN]) + (f" ... (+{len(ids) - SHOWN})" if len(ids) > SHOWN else "")


def predict_run(
    run_dir: Path | str, data_root: Path | str, out: Path | str, overwrite: bool = False, device: str = "auto",
    log: Callable[[str], None] = print, engine: str = "torch", export_run: ExportRun | None = None,
) -> tuple[Path, list[str]]:
    """Write the submission; return its path and the test photos that could not be decoded (filled with the prior).

    ``engine="onnx"``: an export folder as it is; a run or an ensemble through ``export_run`` (the export step's
    :func:`~carclf.export.exporter.onnx_predictor`, which the CLI hands down)."""
    data_root = Path(data_root)
    out = check_output(out, overwrite)  # fail before the slow part
    kind = require(run_dir, doing="predict")  # a run, an ensemble or an export, before the test photos are read
    test = scan_test(data_root)
    missing = [(i, p) for i, p in zip(test.ids, test.paths, strict=True) if not p.is_file()]
    if missing:
        listed = ", ".join(f"{i} ({p})" for i, p in missing[:5])
        raise CarclfError(
            f"{len(missing)} of {len(test.ids)} test IDs in '{data_root / 'test.csv'}' have no image file: {listed}"
            f"{' ...' if len(missing) > 5 else ''}. Check --data and the img_path column."
        )
    sample = data_root / "sample_submission.csv"
    columns = read_sample_columns(sample)
    rows = submission_rows(test, read_sample_ids(sample))
    if rows.by_name:
        log(f"{len(rows.by_name)} ID(s) of {sample.name} are not in test.csv; their photos were found where "
            f"test.csv's naming puts them: {_listed(rows.by_name)}")
    if rows.no_photo:
        log(f"warning: {len(rows.no_photo)} of the {len(rows.ids)} ID(s) of {sample.name} (the rows that are scored) "
            f"have no row in test.csv and no photo: {_listed(rows.no_photo)}. Their rows hold the mean prediction; "
            "add them to test.csv (ID,img_path) and predict again")
    if rows.dropped:
        log(f"warning: {len(rows.dropped)} test.csv ID(s) are not in {sample.name} and are left out of the "
            f"submission (it has the sample's {len(rows.ids)} rows): {_listed(rows.dropped)}")
    # ONNX Runtime: an export folder (whatever --engine says), or the run exported on the fly by export_run
    engine = "onnx" if kind == EXPORT else engine
    predictor: Predictor = open_predictor(run_dir, engine=engine, device=device, export_run=export_run, log=log)
    photos = [p for p in rows.paths if p is not None]
    log(f"predicting {len(photos)} photos with {predictor.describe()}")  # a run's folds or an ensemble's members
    if predictor.incomplete:
        log(f"fold(s) {', '.join(map(str, predictor.incomplete))} not complete: predicting with the finished ones")
    # Check the columns before the slow part too; write_submission checks again on the real matrix.
    align_columns(np.zeros((1, len(predictor.output_classes))), predictor.output_classes, columns)
    found, bad = predictor.predict_paths(photos, progress=True) if photos else (None, [])
    if bad:
        log(f"{len(bad)} test photo(s) could not be decoded; their rows hold the mean prediction:")
        for p in bad[:10]:
            log(f"  {p}")
        if len(bad) > 10:
            log(f"  ... and {len(bad) - 10} more")
    n = len(predictor.output_classes)
    has = np.array([p is not None for p in rows.paths], dtype=bool)
    probs = np.empty((len(rows.ids), n))
    if found is not None:
        probs[has] = found
    probs[~has] = found.mean(axis=0) if found is not None else np.full(n, 1 / n)
    path = write_submission(
        out, rows.ids, probs, predictor.output_classes, columns, predictor.eps, overwrite
    )
    return path, bad
