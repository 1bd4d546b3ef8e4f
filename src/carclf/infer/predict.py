"""``carclf predict``: every fold of a run -> TTA -> calibration -> validated submission.csv."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from carclf.data.scan import read_sample_columns, scan_test
from carclf.errors import CarclfError
from carclf.infer.onnx_engine import is_export_dir, open_predictor
from carclf.infer.predictor import Predictor
from carclf.infer.submission import align_columns, write_submission


def predict_run(
    run_dir: Path | str, data_root: Path | str, out: Path | str, overwrite: bool = False, device: str = "auto",
    log: Callable[[str], None] = print, engine: str = "torch",
) -> tuple[Path, list[str]]:
    """Write the submission; return its path and the test photos that could not be decoded (filled with the prior)."""
    data_root = Path(data_root)
    out = Path(out)
    if out.exists() and not overwrite:  # fail before the slow part
        raise CarclfError(f"'{out}' already exists: pass --overwrite to replace it or choose another -o")
    test = scan_test(data_root)
    missing = [(i, p) for i, p in zip(test.ids, test.paths, strict=True) if not p.is_file()]
    if missing:
        listed = ", ".join(f"{i} ({p})" for i, p in missing[:5])
        raise CarclfError(
            f"{len(missing)} of {len(test.ids)} test IDs in '{data_root / 'test.csv'}' have no image file: {listed}"
            f"{' ...' if len(missing) > 5 else ''}. Check --data and the img_path column."
        )
    columns = read_sample_columns(data_root / "sample_submission.csv")
    if engine == "torch" and not is_export_dir(run_dir):
        predictor = Predictor(run_dir, device=device)
    else:  # ONNX Runtime: an export directory, or the run exported on the fly
        predictor = open_predictor(run_dir, engine="onnx", device=device, log=log)
    log(f"predicting {len(test.ids)} photos with {predictor.describe()}")  # a run's folds or an ensemble's members
    if predictor.incomplete:
        log(f"fold(s) {', '.join(map(str, predictor.incomplete))} not complete: predicting with the finished ones")
    # Check the columns before the slow part too; write_submission checks again on the real matrix.
    align_columns(np.zeros((1, len(predictor.output_classes))), predictor.output_classes, columns)
    probs, bad = predictor.predict_paths(test.paths, progress=True)
    if bad:
        log(f"{len(bad)} test photo(s) could not be decoded; their rows hold the mean prediction:")
        for p in bad[:10]:
            log(f"  {p}")
    path = write_submission(
        out, test.ids, probs, predictor.output_classes, columns, predictor.eps, overwrite
    )
    return path, bad
