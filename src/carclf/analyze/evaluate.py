"""Out-of-fold scores of a run, per fold and overall, raw and temperature-calibrated."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from carclf.analyze.metrics import score, softmax
from carclf.calibrate.temperature import fold_dirs, fold_number, load_oof, read_temperature
from carclf.data.merges import MergeMap
from carclf.io import atomic_write_text


def evaluate_run(run_dir: Path | str) -> list[dict]:
    """One row per fold plus an ``all`` row over the concatenated out-of-fold predictions; saved to
    ``evaluation.json`` in the run directory. With class merges, ``log_loss_columns`` scores the calibrated
    probabilities shared out over the original class columns, as the submission is scored."""
    merge = _merge_map(Path(run_dir))
    rows, raw_all, cal_all, lab_all, orig_all = [], [], [], [], []
    for d in fold_dirs(Path(run_dir)):
        _, labels, logits = load_oof(d)
        with np.load(d / "oof.npz") as z:
            original = z.get("original_labels", None)
        t = read_temperature(d)
        raw, cal = softmax(logits), softmax(logits, t)
        rows.append(_row(str(fold_number(d)), t, raw, cal, labels, merge, original))
        raw_all.append(raw)
        cal_all.append(cal)
        lab_all.append(labels)
        orig_all.append(original)
    if len(rows) > 1:
        original = None if any(o is None for o in orig_all) else np.concatenate(orig_all)
        rows.append(_row("all", float("nan"), np.concatenate(raw_all), np.concatenate(cal_all),
                         np.concatenate(lab_all), merge, original))
    atomic_write_text(Path(run_dir) / "evaluation.json", json.dumps(rows, indent=1))
    return rows


def _merge_map(run_dir: Path) -> MergeMap | None:
    meta = run_dir / "run.json"
    if not meta.is_file():
        return None
    d = json.loads(meta.read_text(encoding="utf-8")).get("merge")
    mm = MergeMap.from_dict(d) if d else None
    return mm if mm is not None and mm.groups else None


def _row(fold: str, t: float, raw: np.ndarray, cal: np.ndarray, labels: np.ndarray, merge: MergeMap | None,
         original: np.ndarray | None) -> dict:
    s_raw, s_cal = score(raw, labels), score(cal, labels)
    row = {
        "fold": fold, "n": s_raw["n"], "temperature": t,
        "log_loss_raw": s_raw["log_loss"], "log_loss": s_cal["log_loss"],
        "accuracy": s_cal["accuracy"], "top5": s_cal["top5"], "ece_raw": s_raw["ece"], "ece": s_cal["ece"],
    }
    if merge is not None and original is not None:
        # What the submission is scored on: merged probabilities shared out over the original columns.
        row["log_loss_columns"] = score(merge.expand(cal), original)["log_loss"]
    return row


def format_table(rows: list[dict], columns: list[str]) -> str:
    """Plain fixed-width table for the terminal."""
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
