"""Fitting an ensemble on out-of-fold rows, and scoring every fitted choice on rows it was not fitted on.

A :class:`Recipe` is a set of discrete choices (each member's TTA policy, how the weights are found, the space they
average in, the final calibration, fixed or chosen clipping). :func:`fit` fits a recipe's continuous parameters
(member temperatures, weights, calibration maps, the clipping value) on some rows; :func:`apply` predicts other
rows with them. :func:`cross_validate` fits on K-1 parts of the out-of-fold rows and scores the held-out part, so
every figure a candidate gets comes from rows its parameters never saw; :func:`select` picks among candidates by
those figures, stage by stage; :func:`nested` repeats the whole selection inside an outer cross-validation for a
figure that is honest about the selection too.

Written here rather than taken from a library: scikit-learn has no multi-member soft-voting fitter over stored
probabilities, and the Caruana selection and simplex fit are a few lines each on top of numpy and SciPy.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from carclf.data.merges import MergeMap
from carclf.metrics import (
    CAL_FLOOR,
    DEFAULT_EPS,
    LOG_FLOOR,
    SCORER_EPS,
    calibrate,
    clip,
    combine,
    fit_temperature,
    nll,
    row_nll,
    scale_newton,
    softmax,
)

METHODS = ("equal", "logloss", "greedy", "scipy")
EPS_GRID = (1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3)  # within predict.eps's valid range (0, 0.01)
# Regularisation strengths tried for vector scaling and matrix (Dirichlet) calibration, toward the temperature
# solution (a = 1/T, W = I/T, b = 0): penalty = lam / C * (sum (a - 1/T)^2 + sum b^2), resp. the same over all of
# W's entries. Stronger for the matrix: it has C^2 parameters (38,416 for 196 classes) against ~30 photos a class.
CALIBRATIONS = ("none", "temperature", "vector:0.3", "vector:3", "matrix:3", "matrix:30")
GREEDY_ITERS = 100
MIN_GAIN = 1e-4  # a costlier choice must lower the cross-validated log loss by more than this, and by more than
#                   one standard error of the per-photo differences (the one-standard-error rule), to be kept


@dataclass
class Problem:
    """Aligned out-of-fold rows of every member: what fitting needs, no paths, no torch models."""

    names: list[str]
    labels: np.ndarray  # (N,) submission-class label
    groups: np.ndarray  # (N,) cross-validation groups (the first member's training folds)
    merges: list[MergeMap]  # per member: model classes -> submission columns
    model_labels: list[np.ndarray]  # per member (N,): the label among its model classes
    logits: list[dict[str, np.ndarray]]  # per member: TTA policy -> (N, C_m) logits averaged over its views
    _temps: dict = field(default_factory=dict, repr=False)

    @property
    def n_members(self) -> int:
        return len(self.names)

    def __len__(self) -> int:
        return len(self.labels)

    def temperature(self, m: int, policy: str, rows: np.ndarray) -> float:
        """Member m's temperature under ``policy``, fitted on ``rows`` (memoised: stages share it)."""
        key = (m, policy, hashlib.blake2b(np.ascontiguousarray(rows).tobytes(), digest_size=16).digest())
        if key not in self._temps:
            self._temps[key] = fit_temperature(self.logits[m][policy][rows], self.model_labels[m][rows])
        return self._temps[key]

    def member_probs(self, m: int, policy: str, temperature: float, rows: np.ndarray) -> np.ndarray:
        """Member m's tempered probabilities over the submission's columns, on ``rows``."""
        return self.merges[m].expand(softmax(self.logits[m][policy][rows], temperature))


@dataclass(frozen=True)
class Recipe:
    policies: tuple[str, ...]  # per member
    method: str = "equal"  # equal | logloss | greedy | scipy | single:<m>
    space: str = "prob"  # prob | logit
    member_temperature: bool = True
    calibration: str = "temperature"  # one of CALIBRATIONS
    eps: str = "fixed"  # fixed (DEFAULT_EPS) | grid (chosen on the fitting rows)

    def used(self, n_members: int) -> list[int]:
        if self.method.startswith("single:"):
            return [int(self.method.split(":")[1])]
        return list(range(n_members))

    def label(self, names: list[str]) -> str:
        if self.method.startswith("single:"):
            head = f"single {names[int(self.method.split(':')[1])]}"
        else:
            head = f"{self.method}/{self.space}"
        used = [self.policies[i] for i in self.used(len(names))]
        tta = used[0] if len(set(used)) == 1 else "/".join(used)  # per member, in member order
        cal = ("T/member + " if self.member_temperature else "") + self.calibration
        return f"{head} | tta {tta} | {cal} | eps {self.eps}"


@dataclass
class Fitted:
    recipe: Recipe
    temperatures: list[float]  # per member (1.0 where unused or uncalibrated)
    weights: np.ndarray  # per member, on the simplex
    calibration: dict[str, Any]
    eps: float
    member_loss: list[float | None] = field(default_factory=list)  # per member, on the fitting rows


# ------------------------------------------------------------------------------------------------------ weights
def _true_class(P: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(M, n) probability each member gives the true class."""
    return np.maximum(P[:, np.arange(len(y)), y], SCORER_EPS)


def greedy_weights(P: np.ndarray, y: np.ndarray, space: str, iters: int = GREEDY_ITERS) -> np.ndarray:
    """Caruana et al. (2004) forward selection with replacement: start from an empty bag, repeatedly add the member
    whose addition lowers the bag average's log loss most (a member may be added again), and keep the bag size with
    the lowest loss. Weights = how often each member is in that bag; a member never picked gets exactly 0."""
    M = P.shape[0]
    if space == "prob":
        X = _true_class(P, y)  # the loss of a probability average depends only on the true class's column

        def bag_losses(acc: np.ndarray, t: int) -> list[float]:
            return [-np.mean(np.log((acc + X[m]) / t)) for m in range(M)]
    else:
        # In logit space the bag's scale is the final temperature's business: score each bag at its best one.
        X = np.log(np.maximum(P, LOG_FLOOR))  # the log-probabilities metrics.combine averages
        scale = [1.0]

        def bag_losses(acc: np.ndarray, t: int) -> list[float]:
            fits = [scale_newton((acc + X[m]) / t, y, s0=scale[0]) for m in range(M)]
            losses = [f[1] for f in fits]
            scale[0] = fits[int(np.argmin(losses))][0]  # warm start: the next bag's best scale is close
            return losses

    acc = np.zeros(X.shape[1:])
    counts = np.zeros(M)
    best_loss, best_counts, since = np.inf, None, 0
    for t in range(1, iters + 1):
        losses = bag_losses(acc, t)
        m = int(np.argmin(losses))
        acc += X[m]
        counts[m] += 1
        if losses[m] < best_loss - 1e-12:
            best_loss, best_counts, since = losses[m], counts.copy(), 0
        else:
            since += 1
        if since >= 10:  # no better bag in 10 additions: the bag has converged
            break
    return best_counts / best_counts.sum()


def scipy_weights(P: np.ndarray, y: np.ndarray, space: str) -> np.ndarray:
    """Weights on the simplex minimising the combination's log loss, started from equal weights with the analytic
    gradient. Probability space: SciPy's SLSQP (sum = 1, each in [0, 1]). Logit space: L-BFGS-B over non-negative
    weights without the sum constraint (their sum is an inverse temperature, which the final temperature takes
    over), normalised afterwards."""
    from scipy.optimize import minimize

    M, n = P.shape[:2]
    if space == "prob":
        q = _true_class(P, y)

        def f(w):
            s = np.maximum(w @ q, 1e-300)
            return float(-np.mean(np.log(s))), -(q / s).mean(axis=1)
    else:
        L = np.log(np.maximum(P, LOG_FLOOR))
        Ly = L[:, np.arange(n), y]  # (M, n)

        def f(w):
            z = np.tensordot(w, L, axes=1)
            z = z - z.max(axis=1, keepdims=True)
            e = np.exp(z)
            s = e.sum(axis=1, keepdims=True)
            loss = float(np.mean(np.log(s[:, 0]) - z[np.arange(n), y]))
            soft = e / s
            grad = -(Ly.mean(axis=1) - np.einsum("nc,mnc->m", soft, L) / n)
            return loss, grad

    if space == "prob":
        res = minimize(f, np.full(M, 1 / M), jac=True, method="SLSQP", bounds=[(0.0, 1.0)] * M,
                       constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1, "jac": lambda w: np.ones_like(w)}],
                       options={"maxiter": 200, "ftol": 1e-10})
    else:
        res = minimize(f, np.full(M, 1 / M), jac=True, method="L-BFGS-B", bounds=[(0.0, None)] * M)
    w = np.clip(res.x, 0, None)
    w = w / w.sum()
    w[w < 1e-4] = 0.0  # SLSQP leaves dust on members it wants out
    return w / w.sum()


def fit_weights(method: str, P: np.ndarray, y: np.ndarray, space: str) -> np.ndarray:
    M = P.shape[0]
    if method == "equal" or M == 1:
        return np.full(M, 1 / M)
    if method == "logloss":  # inverse of each member's own log loss
        inv = np.array([1 / max(nll(P[m], y), 1e-6) for m in range(M)])
        return inv / inv.sum()
    if method == "greedy":
        return greedy_weights(P, y, space)
    if method == "scipy":
        return scipy_weights(P, y, space)
    raise ValueError(f"unknown weighting method {method!r}")


# --------------------------------------------------------------------------------------------------- calibration
def fit_calibration(spec: str, p: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Fit the final calibration ``spec`` (``none``, ``temperature``, ``vector:<lam>``, ``matrix:<lam>``) on
    combined probabilities ``p``; the result is what :func:`carclf.metrics.calibrate` applies."""
    kind, _, lam = spec.partition(":")
    if kind == "none":
        return {"kind": "none"}
    z = np.log(np.maximum(p, CAL_FLOOR))
    t = fit_temperature(z, y)
    if kind == "temperature":
        return {"kind": "temperature", "temperature": t}
    if kind in ("vector", "matrix"):
        return _fit_affine(kind, z, y, float(lam), t)
    raise ValueError(f"unknown calibration {spec!r}")


def _softmax_nll_grad(out: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean NLL of softmax(out) (:func:`carclf.metrics.logit_nll`) and its gradient with respect to ``out``,
    (softmax - one-hot) / n: what L-BFGS-B needs, in one pass."""
    n = len(y)
    out = out - out.max(axis=1, keepdims=True)
    e = np.exp(out)
    tot = e.sum(axis=1)
    d = e / tot[:, None]
    d[np.arange(n), y] -= 1.0
    return float(np.mean(np.log(tot) - out[np.arange(n), y])), d / n


def _fit_affine(kind: str, z: np.ndarray, y: np.ndarray, lam: float, t: float, max_iter: int = 200) -> dict:
    """Vector scaling softmax(a * z + b) or matrix (Dirichlet) calibration softmax(z W^T + b), started at and
    regularised toward the temperature solution (a = 1/T, W = I/T, b = 0; L2 penalty lam / C on the difference),
    fitted with SciPy's L-BFGS-B on the analytic gradient (numpy: no autograd overhead for 38k parameters)."""
    from scipy.optimize import minimize

    C = z.shape[1]
    if kind == "vector":
        x0 = np.concatenate([np.full(C, 1 / t), np.zeros(C)])

        def f(x):
            loss, d = _softmax_nll_grad(z * x[:C] + x[C:], y)
            diff = x - x0
            return (loss + lam / C * (diff @ diff),
                    np.concatenate([(d * z).sum(axis=0), d.sum(axis=0)]) + 2 * lam / C * diff)
    else:
        x0 = np.concatenate([(np.eye(C) / t).ravel(), np.zeros(C)])

        def f(x):
            loss, d = _softmax_nll_grad(z @ x[: C * C].reshape(C, C).T + x[C * C:], y)
            diff = x - x0
            return (loss + lam / C * (diff @ diff),
                    np.concatenate([(d.T @ z).ravel(), d.sum(axis=0)]) + 2 * lam / C * diff)

    x = minimize(f, x0, jac=True, method="L-BFGS-B", options={"maxiter": max_iter}).x
    if kind == "vector":
        return {"kind": "vector", "lam": lam, "start_temperature": t, "a": x[:C].copy(), "b": x[C:].copy()}
    return {"kind": "matrix", "lam": lam, "start_temperature": t, "W": x[: C * C].reshape(C, C).copy(),
            "b": x[C * C:].copy()}


def choose_eps(p: np.ndarray, y: np.ndarray) -> float:
    """The clipping value from EPS_GRID with the lowest log loss on these rows (the smallest on ties)."""
    losses = [nll(clip(p, e), y) for e in EPS_GRID]
    return float(EPS_GRID[int(np.argmin(losses))])


# ------------------------------------------------------------------------------------------------ fit and apply
def _member_stack(prob: Problem, recipe: Recipe, temps: list[float], rows: np.ndarray) -> np.ndarray:
    """(M, n, C) tempered probabilities over the submission's columns; unused members are zeros."""
    used = recipe.used(prob.n_members)
    first = prob.member_probs(used[0], recipe.policies[used[0]], temps[used[0]], rows)
    P = np.zeros((prob.n_members, *first.shape))
    P[used[0]] = first
    for m in used[1:]:
        P[m] = prob.member_probs(m, recipe.policies[m], temps[m], rows)
    return P


def fit(recipe: Recipe, prob: Problem, rows: np.ndarray) -> Fitted:
    """Fit ``recipe``'s parameters on ``rows`` (indices into ``prob``) only."""
    rows = np.asarray(rows)
    y = prob.labels[rows]
    used = recipe.used(prob.n_members)
    temps = [1.0] * prob.n_members
    if recipe.member_temperature:
        for m in used:
            temps[m] = prob.temperature(m, recipe.policies[m], rows)
    P = _member_stack(prob, recipe, temps, rows)
    losses = [nll(P[m], y) if m in used else None for m in range(prob.n_members)]
    if recipe.method.startswith("single:"):
        w = np.zeros(prob.n_members)
        w[used[0]] = 1.0
    else:
        w = fit_weights(recipe.method, P, y, recipe.space)
    p = combine(P, w, recipe.space)
    cal = fit_calibration(recipe.calibration, p, y)
    p = calibrate(p, cal)
    eps = choose_eps(p, y) if recipe.eps == "grid" else DEFAULT_EPS
    return Fitted(recipe, temps, w, cal, eps, losses)


def apply(fitted: Fitted, prob: Problem, rows: np.ndarray) -> np.ndarray:
    """Calibrated probabilities of ``rows`` (before clipping: clip with ``fitted.eps``)."""
    P = _member_stack(prob, fitted.recipe, fitted.temperatures, np.asarray(rows))
    return calibrate(combine(P, fitted.weights, fitted.recipe.space), fitted.calibration)


# -------------------------------------------------------------------------------------------- cross-validation
Split = tuple[np.ndarray, np.ndarray]


def make_splits(prob: Problem, rows: np.ndarray, k: int = 5, how: str = "grouped", seed: int = 0) -> list[Split]:
    """K-fold splits of ``rows`` (absolute indices): ``grouped`` keeps each of the runs' own folds together (the
    photos one model validated are held out together), falling back to ``stratified`` when fewer than 2 groups."""
    from sklearn.model_selection import GroupKFold, StratifiedKFold

    rows = np.asarray(rows)
    groups = prob.groups[rows]
    n_groups = len(np.unique(groups))
    if how == "grouped" and n_groups >= 2:
        gkf = GroupKFold(n_splits=min(k, n_groups))
        return [(rows[a], rows[b]) for a, b in gkf.split(rows, groups=groups)]
    y = prob.labels[rows]
    with warnings.catch_warnings():  # a class with fewer photos than k: fine, it is in fewer parts
        warnings.simplefilter("ignore", UserWarning)
        skf = StratifiedKFold(n_splits=min(k, max(2, np.bincount(y).max())), shuffle=True, random_state=seed)
        return [(rows[a], rows[b]) for a, b in skf.split(rows, y)]


@dataclass
class CVResult:
    loss: float  # log loss over every held-out row, each clipped with its own fit's eps
    probs: np.ndarray  # (N, C) clipped held-out probabilities (rows not in any test part are NaN)
    fits: list[Fitted]
    row_loss: np.ndarray  # (N,) each held-out row's -log p(true class) (NaN where never held out)


def cross_validate(recipe: Recipe, prob: Problem, splits: list[Split],
                   fit_fn: Callable[[Recipe, Problem, np.ndarray], Fitted] | None = None) -> CVResult:
    """Fit on each split's training rows, predict its test rows: every row's figure comes from a fit that never
    saw it."""
    fit_fn = fit_fn or fit
    out = None
    fits = []
    scored = []
    for train, test in splits:
        f = fit_fn(recipe, prob, train)
        p = clip(apply(f, prob, test), f.eps)
        if out is None:
            out = np.full((len(prob), p.shape[1]), np.nan, dtype=np.float32)
        out[test] = p
        fits.append(f)
        scored.append(test)
    rows = np.concatenate(scored)
    row_loss = np.full(len(prob), np.nan)
    row_loss[rows] = row_nll(out[rows].astype(np.float64), prob.labels[rows])
    return CVResult(float(row_loss[rows].mean()), out, fits, row_loss)


# --------------------------------------------------------------------------------------------------- selection
@dataclass
class Candidate:
    stage: str
    recipe: Recipe
    loss: float
    chosen: bool = False


class Selector:
    """Stage-wise choice among recipes by cross-validated log loss, with a memo so a recipe is scored once."""

    def __init__(self, prob: Problem, splits: list[Split], log: Callable[[str], None] = lambda s: None,
                 calibrations: tuple[str, ...] = CALIBRATIONS) -> None:
        self.prob, self.splits, self.log = prob, splits, log
        self.calibrations = calibrations
        self.memo: dict[Recipe, CVResult] = {}
        self.candidates: list[Candidate] = []

    def score(self, recipe: Recipe) -> CVResult:
        if recipe not in self.memo:
            self.memo[recipe] = cross_validate(recipe, self.prob, self.splits)
        return self.memo[recipe]

    def beats(self, challenger: Recipe, incumbent: Recipe) -> bool:
        """Whether ``challenger`` lowers the cross-validated log loss by more than MIN_GAIN and more than one
        standard error of the per-photo differences (so a costlier choice is not kept for noise)."""
        a, b = self.score(incumbent).row_loss, self.score(challenger).row_loss
        ok = np.isfinite(a) & np.isfinite(b)
        d = a[ok] - b[ok]
        se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else 0.0
        return bool(d.mean() > max(MIN_GAIN, se))

    def _pick(self, stage: str, recipes: list[Recipe]) -> Recipe:
        """The first recipe unless a later one (costlier: listed in order of cost) beats the best so far."""
        scored = [Candidate(stage, r, self.score(r).loss) for r in recipes]
        best = scored[0]
        for c in scored[1:]:
            if c.loss < best.loss and self.beats(c.recipe, best.recipe):
                best = c
        best.chosen = True
        self.candidates += scored
        self.log(f"{stage}: {best.recipe.label(self.prob.names)} (CV log loss {best.loss:.4f})")
        return best.recipe

    def select(self) -> Recipe:
        prob = self.prob
        M = prob.n_members
        base_policies = tuple(next(iter(prob.logits[m])) for m in range(M))  # cheapest: fewest views
        # Stage 1: each member's TTA policy, the member alone with its temperature.
        policies = list(base_policies)
        for m in range(M):
            rec = [Recipe(tuple(policies[:m] + [p] + policies[m + 1:]), f"single:{m}", "prob", True, "none")
                   for p in prob.logits[m]]
            policies[m] = self._pick(f"tta {prob.names[m]}", rec).policies[m]
        policies = tuple(policies)
        # Stage 2: how the members combine (a single member may win), with member temperatures and a final one.
        rec = [Recipe(policies, f"single:{m}", "prob", True, "temperature") for m in range(M)]
        order = np.argsort([self.score(r).loss for r in rec])
        rec = [rec[i] for i in order]  # the best single member first: an ensemble must beat it to be kept
        if M > 1:
            rec += [Recipe(policies, meth, space, True, "temperature")
                    for meth in METHODS for space in ("prob", "logit")]
        chosen = self._pick("combination", rec)
        # Stage 3: the final calibration (none first only when temperature scaling does not help).
        rec = [replace(chosen, calibration=c) for c in ("temperature", *[c for c in self.calibrations
                                                                         if c != "temperature"])]
        chosen = self._pick("calibration", rec)
        # Stage 4: the clipping value: fixed, or chosen on the fitting rows from EPS_GRID.
        return self._pick("clipping", [chosen, replace(chosen, eps="grid")])


def nested(prob: Problem, splits: list[Split], inner_k: int, how: str, seed: int,
           calibrations: tuple[str, ...] = CALIBRATIONS) -> tuple[float, list[Recipe]]:
    """The log loss of the whole selection procedure, cross-validated: in each outer part the selection runs on the
    other parts alone (its own inner cross-validation), and the recipe it picks is fitted there and scored here."""
    out = np.zeros(len(prob))
    scored, picked = [], []
    for train, test in splits:
        inner = make_splits(prob, train, inner_k, how, seed)
        recipe = Selector(prob, inner, calibrations=calibrations).select()
        f = fit(recipe, prob, train)
        p = clip(apply(f, prob, test), f.eps)
        out[test] = row_nll(p, prob.labels[test])
        scored.append(test)
        picked.append(recipe)
    rows = np.concatenate(scored)
    return float(out[rows].mean()), picked
