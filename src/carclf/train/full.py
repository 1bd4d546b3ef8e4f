"""The full-data fit (``train.folds=full``): one model on every usable photo, for the epochs and with the weights
(raw, EMA or SWA) that the run's cross-validated folds chose. It has no validation photos, so nothing is chosen on
it: the folds choose, the full fit follows. Its temperature is the mean of the folds' (``RunDir.temperature``)."""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from collections.abc import Callable

from carclf.artifacts.run import RunDir
from carclf.config import Config
from carclf.errors import CarclfError


def full_fit_plan(rd: RunDir, cfg: Config, log: Callable[[str], None]) -> dict:
    """Epochs, final weights and input size for the full-data fit, from the completed folds' summaries (or
    ``train.full_epochs``)."""
    t = cfg.train
    summaries = [json.loads(rd.fold(k).summary.read_text(encoding="utf-8")) for k in rd.completed_folds()]
    primary = "ema" if t.ema else "raw"
    if t.full_epochs:
        epochs, source = t.full_epochs, "train.full_epochs"
    elif summaries:
        # best_epoch is 0-based; the median over folds, rounded half up
        epochs = math.floor(statistics.median(int(s["best_epoch"]) + 1 for s in summaries) + 0.5)
        source = f"median best epoch of fold(s) {[s['fold'] for s in summaries]}"
    else:
        raise CarclfError(
            f"train.folds=full: '{rd.path}' has no completed fold to choose the full-data fit's epochs from. Train "
            "the folds first (train.folds=all,full trains them and then the full fit), or set train.full_epochs=N"
        )
    chosen = [s.get("best_weights") or primary for s in summaries]
    weights = Counter(chosen).most_common(1)[0][0] if chosen else primary
    if weights == "swa" and (not t.swa_start_epoch or epochs <= t.swa_start_epoch):
        weights = primary  # SWA needs epochs after train.swa_start_epoch to average
    sizes = [int(s.get("eval_size") or 0) for s in summaries]
    eval_size = Counter(sizes).most_common(1)[0][0] if sizes else 0
    plan = {"epochs": int(epochs), "weights": weights, "eval_size": eval_size, "source": source,
            "fold_weights": chosen}
    log(f"full-data fit: {epochs} epoch(s) of {t.epochs} ({source}), {weights} weights"
        + (f", predicting at {eval_size}px" if eval_size else ""))
    return plan
