"""Everything after the engines' logits, in numpy: member temperatures, the members' probabilities shared out over
the submission's columns, the weighted combination (probability or logit space), the final calibration and the
clipping. The ensemble step scores its out-of-fold candidates with these functions and the Predictor applies them
to new photos, so what was measured is what is submitted (and an ONNX engine in place of PyTorch changes nothing
here).

Class spaces. Members may have been trained with different merges (or a class dropped for want of photos): each
member's probabilities are first expanded to the submission's columns with its own ``MergeMap.expand`` and only
then combined, so the weights apply *after* expansion. In probability space that is the same as weighting before
(expansion is linear and the weights are scalars); in logit space the members' *log-probabilities over the
submission's columns* are averaged (a weighted geometric mean), which is the only choice defined when the members'
class lists differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

SPACES = ("prob", "logit")
LOG_FLOOR = 1e-30  # log(0) guard: a softmax that underflowed to 0 becomes log(1e-30) = -69
CAL_FLOOR = 1e-12  # the calibration maps see log(max(p, 1e-12)): extreme log-probabilities would dominate W z
DEFAULT_EPS = 1e-6


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def tempered(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T) in float64."""
    return softmax(np.asarray(logits, dtype=np.float64) / float(temperature))


def combine(members: Sequence[np.ndarray] | np.ndarray, weights: Sequence[float], space: str) -> np.ndarray:
    """Weighted combination of the members' probabilities (each (n, C), the submission's columns) -> (n, C)
    probabilities. ``prob``: arithmetic mean; ``logit``: softmax of the weighted mean of log-probabilities (a
    normalised geometric mean: sharper where members agree)."""
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
        return softmax(z / float(cal["temperature"]))
    if kind == "vector":
        return softmax(z * np.asarray(cal["a"], dtype=np.float64) + np.asarray(cal["b"], dtype=np.float64))
    if kind == "matrix":
        return softmax(z @ np.asarray(cal["W"], dtype=np.float64).T + np.asarray(cal["b"], dtype=np.float64))
    raise ValueError(f"unknown calibration kind {kind!r}")


def clip(p: np.ndarray, eps: float) -> np.ndarray:
    """Clip to [eps, 1 - eps] and renormalise: what the submission holds (carclf.infer.submission.finalize)."""
    q = np.clip(p, eps, 1 - eps)
    return q / q.sum(axis=-1, keepdims=True)


def nll(p: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (floored at 1e-15 like the competition's scorer)."""
    return float(-np.mean(np.log(np.maximum(p[np.arange(len(labels)), labels], 1e-15))))


def postprocess(member_probs: Sequence[np.ndarray], head: dict[str, Any]) -> np.ndarray:
    """The Predictor's post-processing of an ensemble: each member's probabilities (its folds' tempered softmax,
    averaged, over its model classes) -> expanded by its merge map -> combined -> calibrated. Clipping is left to the
    submission writer (``head['eps']``), as for a run."""
    from carclf.data.merges import MergeMap

    expanded = [MergeMap.from_dict(m["merge"]).expand(p) if p is not None else None
                for m, p in zip(head["members"], member_probs, strict=True)]
    weights = [m["weight"] for m in head["members"]]
    return calibrate(combine(expanded, weights, head["space"]), head.get("calibration"))
