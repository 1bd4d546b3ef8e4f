"""Out-of-fold scores of a run, per fold and overall, raw and temperature-calibrated."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from carclf.analyze.metrics import score, softmax
from carclf.calibrate.temperature import fold_dirs, load_oof, read_temperature
from carclf.io import atomic_write_text


def evaluate_run(run_dir: Path | str) -> list[dict]:
    """One row per fold plus an ``all`` row over the concatenated out-of-fold predictions; saved to
    ``evaluation.json`` in the run directory."""
    rows, raw_all, cal_all, lab_all = [], [], [], []
    for d in fold_dirs(Path(run_dir)):
        _, labels, logits = load_oof(d)
        t = read_temperature(d)
        raw, cal = softmax(logits), softmax(logits, t)
        rows.append(_row(d.name[4:], t, raw, cal, labels))
        raw_all.append(raw)
        cal_all.append(cal)
        lab_all.append(labels)
    if len(rows) > 1:
        rows.append(_row("all", float("nan"), np.concatenate(raw_all), np.concatenate(cal_all), np.concatenate(lab_all)))
    atomic_write_text(Path(run_dir) / "evaluation.json", json.dumps(rows, indent=1))
    return rows


def _row(fold: str, t: float, raw: np.ndarray, cal: np.ndarray, labels: np.ndarray) -> dict:
    s_raw, s_cal = score(raw, labels), score(cal, labels)
    return {
        "fold": fold, "n": s_raw["n"], "temperature": t,
        "log_loss_raw": s_raw["log_loss"], "log_loss": s_cal["log_loss"],
        "accuracy": s_cal["accuracy"], "top5": s_cal["top5"], "ece_raw": s_raw["ece"], "ece": s_cal["ece"],
    }


def format_table(rows: list[dict], columns: list[str]) -> str:
    """Plain fixed-width table for the terminal."""
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
