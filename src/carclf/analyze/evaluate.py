"""``carclf evaluate``: out-of-fold scores of a run or an ensemble, per fold and overall, raw and calibrated."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from carclf.artifacts.oof import ensemble_oof, read_fold_oof
from carclf.artifacts.resolve import ENSEMBLE, kind_of
from carclf.artifacts.run import RunDir
from carclf.io import atomic_write_text
from carclf.metrics import fold_groups, score_row, softmax
from carclf.tracking import log_fold_figures


def evaluate_run(run_dir: Path | str, log: Callable[[str], None] = print) -> list[dict]:
    """One row per completed fold plus an ``all`` row over the concatenated out-of-fold predictions; saved to
    ``evaluation.json`` in the run directory.

    ``log_loss`` (calibrated) and ``log_loss_raw`` score the out-of-fold probabilities exactly as the submission is
    scored: expanded to the submission's columns (merged classes shared out, dropped classes at their fixed
    probability), clipped to ``predict.eps`` and renormalised, against each photo's own folder label. That is the
    figure to trust. ``log_loss_model`` is the calibrated log loss over the model's own classes (comparable with
    ``val_log_loss`` in metrics.csv); accuracy, top-5 and ECE are over the model's classes too.

    An ensemble folder (ensemble.yaml) is scored from its cross-validated out-of-fold probabilities, over the
    submission's classes (:func:`evaluate_ensemble`)."""
    if kind_of(run_dir) == ENSEMBLE:
        return evaluate_ensemble(run_dir, log)
    rd = RunDir.open(run_dir)
    cfg = rd.read_config()
    merge = rd.merge_map()
    eps = cfg.predict.eps
    rows, parts = [], []
    for k in rd.completed_folds():
        z = read_fold_oof(rd.fold(k), ("labels", "logits", "original_labels"), ())
        labels, logits = z["labels"], z["logits"]
        original = z["original_labels"]  # the photo's folder label: the submission column it is scored on
        t = rd.temperature(k)
        part = (softmax(logits), softmax(logits, t), labels, original)
        rows.append(score_row(str(k), t, *part, merge.expand, eps))
        parts.append(part)
    if len(rows) > 1:
        raw, cal, labels, original = (np.concatenate(x) for x in zip(*parts, strict=True))
        rows.append(score_row("all", float("nan"), raw, cal, labels, original, merge.expand, eps))
    atomic_write_text(rd.evaluation_json, json.dumps(rows, indent=1))
    log_fold_figures(rd, {int(r["fold"]): {n: v for n, v in r.items() if n not in ("fold", "n")}
                          for r in rows if r["fold"] != "all"}, "eval_", log)
    return rows


def evaluate_ensemble(path: Path | str, log: Callable[[str], None] = print) -> list[dict]:
    """``carclf evaluate`` for an ensemble folder: the rows of :func:`evaluate_run` from the ensemble's
    cross-validated OOF probabilities, per first-member fold and overall; saved to evaluation.json."""
    oof = ensemble_oof(path)
    t = oof.temperatures[-1]
    rows = [score_row(name, t, oof.probs_raw[m], oof.probs[m], oof.labels[m], oof.labels[m], oof.merge.expand,
                      oof.eps) for name, m in fold_groups(oof.folds)]
    atomic_write_text(Path(path) / "evaluation.json", json.dumps(rows, indent=1))
    return rows


def format_table(rows: list[dict], columns: list[str]) -> str:
    """Plain fixed-width table for the terminal."""
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
