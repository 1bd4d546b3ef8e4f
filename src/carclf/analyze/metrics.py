"""Scores on probabilities: log loss (the competition metric), accuracy, top-5 and calibration error."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import log_loss


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


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


def score(probs: np.ndarray, labels: np.ndarray, eps: float = 1e-15) -> dict[str, float]:
    """log loss (clipped like the competition's scorer), accuracy, top-5 accuracy, ECE."""
    n_classes = probs.shape[1]
    p = np.clip(probs, eps, 1 - eps)
    p = p / p.sum(axis=1, keepdims=True)
    return {
        "log_loss": float(log_loss(labels, p, labels=np.arange(n_classes))),
        "accuracy": float((probs.argmax(axis=1) == labels).mean()),
        "top5": top_k_accuracy(probs, labels, 5),
        "ece": expected_calibration_error(probs, labels),
        "n": int(len(labels)),
    }
