"""Temperature scaling (Guo et al., 2017) fitted on saved out-of-fold logits."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from carclf.errors import CarclfError
from carclf.io import atomic_write_text

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


def fold_number(fold_dir: Path) -> int:
    return int(fold_dir.name[4:])


def fold_dirs(run_dir: Path) -> list[Path]:
    """Completed folds of a run (``fold<k>/`` with out-of-fold logits), in fold order. The one way to find them:
    calibrate, evaluate and the Predictor all use it."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CarclfError(f"'{run_dir}' is not a carclf run directory (no config.yaml)")
    dirs = sorted(
        (d for d in run_dir.glob("fold*") if re.fullmatch(r"fold\d+", d.name) and (d / "oof.npz").is_file()),
        key=fold_number,
    )
    if not dirs:
        raise CarclfError(f"'{run_dir}' has no completed fold (no fold*/oof.npz): train it first")
    return dirs


def load_oof(fold_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with np.load(fold_dir / "oof.npz") as z:
        return z["indices"], z["labels"], z["logits"]


def read_temperature(fold_dir: Path) -> float:
    path = fold_dir / "calibration.json"
    return float(json.loads(path.read_text())["temperature"]) if path.is_file() else 1.0


def calibrate_run(run_dir: Path | str) -> list[dict]:
    """Fit and store a temperature per fold; return per-fold NLL before and after."""
    rows = []
    for d in fold_dirs(Path(run_dir)):
        _, labels, logits = load_oof(d)
        t = fit_temperature(logits, labels)
        row = {"fold": fold_number(d), "temperature": t, "nll_before": nll(logits, labels),
               "nll_after": nll(logits, labels, t), "n": int(len(labels))}
        atomic_write_text(d / "calibration.json", json.dumps(row, indent=1))
        rows.append(row)
    return rows
