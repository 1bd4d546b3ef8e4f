"""A fold's ``metrics.csv``: one row per epoch (``train_loss`` filled), then one per end-of-training candidate (the
raw or SWA weights scored once after the last epoch, ``train_loss`` empty); ``weights`` names the weights a row
scored and ``chosen`` marks the row whose weights became best.pt. Floats are written with 6 significant digits."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from carclf.errors import CarclfError
from carclf.io import atomic_write_text

METRIC_FIELDS = [
    "epoch", "step", "train_loss", "val_log_loss", "val_accuracy", "val_top5", "lr", "ema_decay", "skipped_steps",
    "mixup", "backbone_frozen", "train_size", "images_per_s", "data_wait", "seconds", "weights", "chosen",
]


def write_metrics(path: Path, history: list[dict]) -> None:
    """Write ``history`` (the rows training keeps, keys of :data:`METRIC_FIELDS`; others ignored) atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for row in history:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


def read_metrics(path: Path | str) -> list[dict[str, str]]:
    """Every row of a metrics.csv as written (strings; a column an older carclf did not write is absent); a
    CarclfError naming the file when there is none."""
    src = Path(path)
    if not src.is_file():
        raise CarclfError(f"'{src}' not found: no metrics to plot (the fold has not finished an epoch)")
    with src.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def split_rows(rows: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(per-epoch rows, end-of-training candidate rows) of :func:`read_metrics`."""
    epochs = [r for r in rows if r.get("train_loss") not in (None, "")]
    return epochs, [r for r in rows if r.get("train_loss") in (None, "")]


def read_float(value: str | None) -> float:
    """A metrics.csv cell as a float; NaN for an empty or non-numeric one."""
    try:
        return float(value) if value not in (None, "") else math.nan
    except ValueError:
        return math.nan
