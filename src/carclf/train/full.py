"""The full-data fit (``train.folds=full``): one model on every usable photo, for the epochs and with the weights
(raw, EMA or SWA) that the run's cross-validated folds chose. It has no validation photos, so nothing is chosen on
it: the folds choose, the full fit follows. Its temperature is the mean of the folds' (``RunDir.temperature``)."""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from collections.abc import Callable

from torch.utils.data import DataLoader

from carclf.artifacts.metrics_csv import write_metrics
from carclf.artifacts.run import RunDir
from carclf.config import Config, effective_lr
from carclf.errors import CarclfError
from carclf.io import atomic_write_text
from carclf.runtime import versions
from carclf.train.averaging import full_fit_weights
from carclf.train.state import Fold


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


def finish_full(fold: Fold, history: list[dict], train_loader: DataLoader, log: Callable[[str], None]) -> dict:
    """The full-data fit's ``best.pt``: the weights kind the folds chose (SWA, EMA or raw) after the planned epochs;
    then ``summary.json``, which marks the fit complete."""
    plan, fp = fold.plan, fold.fp
    weights, model = full_fit_weights(fold, train_loader, plan["weights"])
    last_epoch = history[-1]["epoch"] if history else -1
    sha256 = fold.save_best(model, last_epoch, weights, math.nan)
    for row in history:
        row["weights"], row["chosen"] = weights, "*" if row["epoch"] == last_epoch else ""
    write_metrics(fp.metrics, history)
    n_train = len(fold.tr_idx)
    summary = {"fold": "full", "epochs": plan["epochs"], "best_epoch": last_epoch, "best_weights": weights,
               "eval_size": plan["eval_size"], "chosen_by": plan["source"], "fold_weights": plan["fold_weights"],
               "n_train": n_train, "lr_effective": effective_lr(fold.cfg), "versions": versions(),
               "best_sha256": sha256}
    atomic_write_text(fp.summary, json.dumps(summary, indent=1))  # last: marks the full-data fit complete
    log(f"full-data fit: {n_train} photos, {plan['epochs']} epoch(s), {weights} weights saved to {fp.best}")
    return summary
