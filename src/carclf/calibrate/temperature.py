"""Temperature scaling (Guo et al., 2017) fitted on saved out-of-fold logits."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from carclf.io import atomic_write_text, read_npz
from carclf.rundir import FoldPaths, RunDir, retrain_hint

# A model no better than chance drives T to infinity; bound it so a broken fold stays visible, not hidden.
T_MIN, T_MAX = 0.05, 20.0


def fit_temperature(logits: np.ndarray, labels: np.ndarray, max_iter: int = 100) -> float:
    """The temperature T in [T_MIN, T_MAX] minimising NLL of softmax(logits / T), found with L-BFGS on log T."""
    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(np.clip(log_t.exp().item(), T_MIN, T_MAX))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    z = torch.as_tensor(logits, dtype=torch.float64) / temperature
    return float(F.cross_entropy(z, torch.as_tensor(labels, dtype=torch.long)).item())


def load_oof(fold: FoldPaths) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dataset indices, model labels, logits) of a fold's out-of-fold photos."""
    z = read_npz(fold.oof, ("indices", "labels", "logits"), retrain_hint(fold))
    return z["indices"], z["labels"], z["logits"]


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
        fold = rd.fold(k)
        _, labels, logits = load_oof(fold)
        t = fit_temperature(logits, labels)
        row = {"fold": k, "temperature": t, "nll_before": nll(logits, labels), "nll_after": nll(logits, labels, t),
               "n": int(len(labels))}
        warning = bound_warning(k, t)
        if warning:
            row["warning"] = warning
            log(f"warning: {warning}")
        atomic_write_text(fold.calibration, json.dumps(row, indent=1))
        rows.append(row)
    log_fold_figures(rd, {r["fold"]: {k: r[k] for k in ("temperature", "nll_before", "nll_after")} for r in rows},
                     "calibration_", log)
    return rows


def log_fold_figures(rd: RunDir, figures: dict[int, dict], prefix: str, log: Callable[[str], None] = print) -> None:
    """Add each fold's figures to the fold's MLflow run, when it was tracked (``track.*`` of the run's config)."""
    cfg = rd.read_config()
    if not cfg.track.enabled:
        return
    from carclf.tracking import log_to_run, read_run_id

    for k, values in figures.items():
        log_to_run(cfg.track.uri, read_run_id(rd.fold(k).mlflow_run), {prefix + n: v for n, v in values.items()},
                   out_dir=rd.path.parent, log=log)
