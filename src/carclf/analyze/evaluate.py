"""Out-of-fold scores of a run, per fold and overall, raw and temperature-calibrated."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from carclf.analyze.metrics import score, softmax
from carclf.calibrate.temperature import log_fold_figures
from carclf.data.merges import MergeMap, identity
from carclf.infer.submission import finalize
from carclf.io import atomic_write_text, read_npz
from carclf.rundir import RunDir, retrain_hint


def evaluate_run(run_dir: Path | str, log: Callable[[str], None] = print) -> list[dict]:
    """One row per completed fold plus an ``all`` row over the concatenated out-of-fold predictions; saved to
    ``evaluation.json`` in the run directory.

    ``log_loss`` (calibrated) and ``log_loss_raw`` score the out-of-fold probabilities exactly as the submission is
    scored: expanded to the submission's columns (merged classes shared out, dropped classes at their fixed
    probability), clipped to ``predict.eps`` and renormalised, against each photo's own folder label. That is the
    figure to trust. ``log_loss_model`` is the calibrated log loss over the model's own classes (comparable with
    ``val_log_loss`` in metrics.csv); accuracy, top-5 and ECE are over the model's classes too.

    An ensemble folder (ensemble.yaml) is scored from its cross-validated out-of-fold probabilities, over the
    submission's classes (:func:`carclf.ensemble.evaluate_ensemble`)."""
    if (Path(run_dir) / "ensemble.yaml").is_file():
        from carclf.ensemble import evaluate_ensemble

        return evaluate_ensemble(run_dir, log)
    rd = RunDir.open(run_dir)
    cfg = rd.read_config()
    meta = rd.read_meta()
    merge = MergeMap.from_dict(meta["merge"]) if "merge" in meta else identity(meta["classes"])
    eps = cfg.predict.eps
    rows, parts = [], []
    for k in rd.completed_folds():
        fold = rd.fold(k)
        z = read_npz(fold.oof, ("labels", "logits", "original_labels"), retrain_hint(fold))
        labels, logits = z["labels"], z["logits"]
        original = z["original_labels"]  # the photo's folder label: the submission column it is scored on
        t = rd.temperature(k)
        part = (softmax(logits), softmax(logits, t), labels, original)
        rows.append(_row(str(k), t, *part, merge, eps))
        parts.append(part)
    if len(rows) > 1:
        raw, cal, labels, original = (np.concatenate(x) for x in zip(*parts, strict=True))
        rows.append(_row("all", float("nan"), raw, cal, labels, original, merge, eps))
    atomic_write_text(rd.evaluation_json, json.dumps(rows, indent=1))
    log_fold_figures(rd, {int(r["fold"]): {n: v for n, v in r.items() if n not in ("fold", "n")}
                          for r in rows if r["fold"] != "all"}, "eval_", log)
    return rows


def _row(fold: str, t: float, raw: np.ndarray, cal: np.ndarray, labels: np.ndarray, original: np.ndarray,
         merge: MergeMap, eps: float) -> dict:
    s_raw, s_cal = score(raw, labels), score(cal, labels)
    return {
        "fold": fold, "n": s_raw["n"], "temperature": t,
        "log_loss_raw": _as_submitted(raw, original, merge, eps), "log_loss": _as_submitted(cal, original, merge, eps),
        "log_loss_model": s_cal["log_loss"], "accuracy": s_cal["accuracy"], "top5": s_cal["top5"],
        "ece_raw": s_raw["ece"], "ece": s_cal["ece"],
    }


def _as_submitted(probs: np.ndarray, original: np.ndarray, merge: MergeMap, eps: float) -> float:
    """Log loss of model-class probabilities once they are what ``predict`` writes."""
    return score(finalize(merge.expand(probs), eps), original)["log_loss"]


def format_table(rows: list[dict], columns: list[str]) -> str:
    """Plain fixed-width table for the terminal."""
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
