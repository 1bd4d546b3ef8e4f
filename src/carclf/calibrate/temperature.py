"""``carclf calibrate``: temperature scaling (Guo et al., 2017) fitted per fold on saved out-of-fold logits (the fit
itself is :func:`carclf.metrics.fit_temperature`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from carclf.artifacts.oof import read_fold_oof
from carclf.artifacts.run import RunDir
from carclf.io import atomic_write_text
from carclf.metrics import T_MAX, T_MIN, fit_temperature, logit_nll
from carclf.tracking import log_fold_figures


def bound_warning(k: int, t: float) -> str:
    """What a temperature at its bound means, or '' when it is inside."""
    if t <= T_MIN * 1.001:
        return (f"fold {k}: temperature hit its lower bound {T_MIN}: the model's out-of-fold logits are far too "
                "timid (or nearly constant); check that the fold trained (metrics.csv) before trusting it")
    if t >= T_MAX * 0.999:
        return (f"fold {k}: temperature hit its upper bound {T_MAX}: the model is no better than chance on its "
                "out-of-fold photos, so calibration flattens it to almost uniform; the fold did not learn (check "
                "metrics.csv, the learning rate and the labels)")
    return ""


def calibrate_run(run_dir: Path | str, log: Callable[[str], None] = print) -> list[dict]:
    """Fit and store a temperature per completed fold; return per-fold NLL before and after."""
    rd = RunDir.open(run_dir)
    rows = []
    incomplete = rd.incomplete_folds()
    if incomplete:
        log(f"calibrate: fold(s) {', '.join(map(str, incomplete))} not complete yet: calibrating the finished ones")
    for k in rd.completed_folds():
        z = read_fold_oof(rd.fold(k), ("indices", "labels", "logits"), ())
        labels, logits = z["labels"], z["logits"]
        t = fit_temperature(logits, labels)
        row = {"fold": k, "temperature": t, "nll_before": logit_nll(logits, labels),
               "nll_after": logit_nll(logits, labels, t),
               "n": int(len(labels))}
        warning = bound_warning(k, t)
        if warning:
            row["warning"] = warning
            log(f"warning: {warning}")
        atomic_write_text(rd.fold(k).calibration, json.dumps(row, indent=1))
        rows.append(row)
    log_fold_figures(rd, {r["fold"]: {k: r[k] for k in ("temperature", "nll_before", "nll_after")} for r in rows},
                     "calibration_", log)
    return rows
