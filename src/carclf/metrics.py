"""The numeric core: every probability and every score carclf computes comes from these functions.

Softmax with temperature, the members' weighted combination (probability or logit space), the final calibration
maps, clipping + renormalising as the submission holds it, NLL and log loss as the competition scores them, and the
temperature fit. Train, calibrate, ensemble, predict, evaluate, report and export all call these, so what was
measured is what is submitted and served. numpy only (and scikit-learn's log loss): no torch, no carclf imports.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import log_loss

SPACES = ("prob", "logit")
LOG_FLOOR = 1e-30  # log(0) guard: a softmax that underflowed to 0 becomes log(1e-30) = -69
CAL_FLOOR = 1e-12  # the calibration maps see log(max(p, 1e-12)): extreme log-probabilities would dominate W z
SCORER_EPS = 1e-15  # the competition scorer's clipping
DEFAULT_EPS = 1e-6  # the submission's clipping unless the config or the ensemble chose another
# A model no better than chance drives T to infinity; bound it so a broken fold stays visible, not hidden.
T_MIN, T_MAX = 0.05, 20.0


# ------------------------------------------------------------------------------------------------ probabilities
def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / T) over the last axis, in float64."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def combine(members: Sequence[np.ndarray] | np.ndarray, weights: Sequence[float], space: str) -> np.ndarray:
    """Weighted combination of the members' probabilities (each (n, C), the same columns) -> (n, C) probabilities.
    ``prob``: arithmetic mean; ``logit``: softmax of the weighted mean of log-probabilities (a normalised geometric
    mean: sharper where members agree). Members with weight 0 may be None."""
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    w = np.asarray(weights, dtype=np.float64)
    used = np.flatnonzero(w > 0)
    w = w / w[used].sum()
    if space == "prob":
        out = sum(w[i] * np.asarray(members[i], dtype=np.float64) for i in used)
        return out / out.sum(axis=-1, keepdims=True)
    z = sum(w[i] * np.log(np.maximum(members[i], LOG_FLOOR)) for i in used)
    return softmax(z)


def calibrate(p: np.ndarray, cal: dict[str, Any] | None) -> np.ndarray:
    """The final calibration of combined probabilities. Kinds: ``none``; ``temperature`` softmax(log p / T);
    ``vector`` softmax(a * log p + b) (a, b per class); ``matrix`` softmax(log p W^T + b) (Dirichlet calibration,
    Kull et al. 2019)."""
    kind = (cal or {}).get("kind", "none")
    if kind == "none":
        return p
    z = np.log(np.maximum(p, CAL_FLOOR))
    if kind == "temperature":
        return softmax(z, float(cal["temperature"]))
    if kind == "vector":
        return softmax(z * np.asarray(cal["a"], dtype=np.float64) + np.asarray(cal["b"], dtype=np.float64))
    if kind == "matrix":
        return softmax(z @ np.asarray(cal["W"], dtype=np.float64).T + np.asarray(cal["b"], dtype=np.float64))
    raise ValueError(f"unknown calibration kind {kind!r}")


def clip(p: np.ndarray, eps: float) -> np.ndarray:
    """Clip to [eps, 1 - eps] and renormalise, in float64: what the submission holds."""
    q = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    return q / q.sum(axis=-1, keepdims=True)


# ------------------------------------------------------------------------------------------------------- scores
def row_nll(p: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each row's negative log-likelihood of its true class (floored at 1e-15 like the competition's scorer)."""
    return -np.log(np.maximum(p[np.arange(len(labels)), labels], SCORER_EPS))


def nll(p: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (floored at 1e-15 like the competition's scorer)."""
    return float(np.mean(row_nll(p, labels)))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE with equal-width confidence bins.

    Written by hand: scikit-learn has calibration_curve only for binary problems, and torchmetrics would be a
    heavy dependency for these few lines.
    """
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def top_k_accuracy(probs: np.ndarray, labels: np.ndarray, k: int = 5) -> float:
    """Share of rows whose true class is among the k most probable (k capped at the class count)."""
    k = min(k, probs.shape[1])
    top = np.argsort(-probs, axis=1)[:, :k]
    return float((top == np.asarray(labels)[:, None]).any(axis=1).mean())


def class_log_loss(probs: np.ndarray, labels: np.ndarray, eps: float = SCORER_EPS) -> float:
    """Log loss over all of probs' columns (scikit-learn's), after clipping to ``eps`` and renormalising."""
    return float(log_loss(labels, clip(probs, eps), labels=np.arange(probs.shape[1])))


def score(probs: np.ndarray, labels: np.ndarray, eps: float = SCORER_EPS) -> dict[str, float]:
    """log loss (clipped like the competition's scorer), accuracy, top-5 accuracy, ECE."""
    return {
        "log_loss": class_log_loss(probs, labels, eps),
        "accuracy": float((probs.argmax(axis=1) == labels).mean()),
        "top5": top_k_accuracy(probs, labels, 5),
        "ece": expected_calibration_error(probs, labels),
        "n": int(len(labels)),
    }


def submitted_log_loss(probs: np.ndarray, original: np.ndarray, expand: Callable[[np.ndarray], np.ndarray],
                       eps: float) -> float:
    """The competition's figure: model-class probabilities shared out over the submission's columns (``expand``, a
    merge map's), clipped to ``eps`` as the submission is, scored against each photo's own folder label."""
    return class_log_loss(clip(expand(probs), eps), original)


def fold_groups(folds: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """(name, row mask) per fold in order, then ``all`` when there is more than one fold (or none)."""
    folds = np.asarray(folds)
    groups = [(str(int(k)), folds == k) for k in sorted(set(folds.tolist()))]
    if len(groups) != 1:
        groups.append(("all", np.ones(len(folds), dtype=bool)))
    return groups


def score_row(fold: str, t: float, raw: np.ndarray, cal: np.ndarray, labels: np.ndarray, original: np.ndarray,
              expand: Callable[[np.ndarray], np.ndarray], eps: float) -> dict:
    """One row of ``carclf evaluate``'s table: as submitted (raw and calibrated), then over the model's classes."""
    s_raw, s_cal = score(raw, labels), score(cal, labels)
    return {
        "fold": fold, "n": s_raw["n"], "temperature": t,
        "log_loss_raw": submitted_log_loss(raw, original, expand, eps),
        "log_loss": submitted_log_loss(cal, original, expand, eps),
        "log_loss_model": s_cal["log_loss"], "accuracy": s_cal["accuracy"], "top5": s_cal["top5"],
        "ece_raw": s_raw["ece"], "ece": s_cal["ece"],
    }


# -------------------------------------------------------------------------------------------------- temperature
def scale_newton(z: np.ndarray, y: np.ndarray, iters: int = 30, s0: float = 1.0) -> tuple[float, float]:
    """(s, loss): the inverse temperature s in [1/T_MAX, 1/T_MIN] minimising mean NLL of softmax(s z), and that NLL.

    The NLL is convex in s, so a safeguarded Newton step converges in a few iterations. Written by hand rather than
    with torch's L-BFGS (the same optimum): the ensemble step fits hundreds of temperatures and autograd's overhead
    made that 10x slower on 2 CPU cores."""
    z = np.asarray(z, dtype=np.float64)
    n = len(y)
    zy = z[np.arange(n), y]
    lo, hi = 1 / T_MAX, 1 / T_MIN
    s = float(np.clip(s0, lo, hi))

    def parts(s):
        a = s * z
        a = a - a.max(axis=1, keepdims=True)
        e = np.exp(a)
        tot = e.sum(axis=1)
        p = e / tot[:, None]
        loss = float(np.mean(np.log(tot) - a[np.arange(n), y]))
        mean_z = (p * z).sum(axis=1)
        g = float(np.mean(mean_z - zy))
        h = float(np.mean((p * z * z).sum(axis=1) - mean_z**2))
        return loss, g, h

    loss, g, h = parts(s)
    for _ in range(iters):
        step = g / h if h > 1e-12 else np.sign(g) * 0.5 * s
        new = float(np.clip(s - step, lo, hi))
        new_loss, new_g, new_h = parts(new)
        while new_loss > loss + 1e-12 and abs(new - s) > 1e-9:  # overshoot: halve the step
            new = (new + s) / 2
            new_loss, new_g, new_h = parts(new)
        if abs(new - s) < 1e-7 * s:
            s, loss = new, new_loss
            break
        s, loss, g, h = new, new_loss, new_g, new_h
    return s, loss


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature scaling (Guo et al., 2017): the T in [T_MIN, T_MAX] minimising NLL of softmax(logits / T)."""
    return float(np.clip(1 / scale_newton(logits, labels)[0], T_MIN, T_MAX))


def logit_nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean NLL of softmax(logits / T), from the log-sum-exp (exact where a probability underflows)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    m = z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z - m).sum(axis=1)) + m[:, 0]
    return float(np.mean(lse - z[np.arange(len(labels)), labels]))
