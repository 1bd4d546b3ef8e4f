"""The error-analysis report's figures, from out-of-fold rows alone (no images, no plots): headline scores,
calibration bins, per-class table, confused pairs, confusable groups and likely label errors.

Everything here works on plain arrays (an :class:`~carclf.artifacts.oof.OofSet`'s probabilities, labels and
features), so the tests can plant look-alike classes and wrong labels in synthetic data and check what is found.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from carclf.data.merges import MergeMap
from carclf.errors import CarclfError
from carclf.metrics import SCORER_EPS, clip, fold_groups, nll, row_nll, score, submitted_log_loss

N_BINS = 15  # confidence bins of the reliability diagram, the histogram and the log-loss shares (as in ECE)
# Confusable groups by confusion: the symmetrised soft confusion rate s(a, b) = (c_ab + c_ba) / 2, where c_ab is the
# mean probability the model gives class b on photos labelled a, becomes the distance 1 - 2 s (0: the two classes
# are indistinguishable, each photo split half and half; 1: never confused). Groups are cut at 0.8: on average at
# least 10% of the probability of one class's photos goes to the other.
CONFUSION_CUT = 0.8
# Confusable groups by features: cosine distances between class centroids (mean of the L2-normalised penultimate
# features of each class's photos), cut at this fraction of the median distance between two classes.
FEATURE_CUT_RATIO = 0.5
LINKAGE = "average"


# ------------------------------------------------------------------------------------------------ headline


def headline(probs: np.ndarray, labels: np.ndarray, eps: float = SCORER_EPS) -> dict[str, float]:
    """Scores of one set of rows over the model's classes: :func:`carclf.metrics.score` (log loss clipped to ``eps``
    like the submission, accuracy, top-5 accuracy, ECE), then mean confidence (top-1 probability), mean entropy
    (nats) and the mean confidence gap (top-1 minus top-2 probability)."""
    s = score(probs, np.asarray(labels), eps)
    srt = np.sort(probs, axis=1)
    plogp = np.where(probs > 0, probs * np.log(np.where(probs > 0, probs, 1.0)), 0.0)
    return {
        "n": s["n"], "log_loss": s["log_loss"], "accuracy": s["accuracy"], "top5": s["top5"], "ece": s["ece"],
        "confidence": float(srt[:, -1].mean()),
        "entropy": float(-plogp.sum(axis=1).mean()),
        "gap": float((srt[:, -1] - (srt[:, -2] if probs.shape[1] > 1 else 0.0)).mean()),
    }


def headline_rows(probs_raw: np.ndarray, probs: np.ndarray, labels: np.ndarray, original: np.ndarray,
                  folds: np.ndarray, merge: MergeMap, eps: float, temperatures: dict[int, float]) -> list[dict]:
    """Per fold and over all rows, raw and calibrated: :func:`headline` plus ``log_loss_submitted``, the log loss
    once the probabilities are what ``predict`` writes (the original columns, merged classes shared out, clipped to
    ``eps``) against each photo's folder label: the figure the competition scores (and ``carclf evaluate``'s)."""
    for p in (probs_raw, probs):
        if not np.isfinite(p).all():  # what predict refuses to write, the report refuses to score
            raise CarclfError("out-of-fold predictions contain NaN or infinity: the model or its calibration is "
                              "broken")
    rows = []
    for name, m in fold_groups(folds):
        if not m.any():
            continue
        for kind, p in (("raw", probs_raw), ("calibrated", probs)):
            t = 1.0 if kind == "raw" else temperatures.get(int(name), temperatures.get(-1)) if name != "all" else None
            rows.append({"fold": name, "probs": kind, "temperature": t, **headline(p[m], labels[m], eps),
                         "log_loss_submitted": submitted_log_loss(p[m], original[m], merge.expand, eps)})
    return rows


# ------------------------------------------------------------------------------------------------ calibration


def confidence_bins(probs: np.ndarray, labels: np.ndarray, eps: float = SCORER_EPS,
                    n_bins: int = N_BINS) -> list[dict]:
    """Equal-width top-1 confidence bins: count, mean confidence, accuracy, and the share of the total log loss
    that the bin's photos contribute (where the loss comes from: a few confident mistakes, or many hesitant
    rows)."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    loss = row_nll(clip(probs, eps), labels)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    total = loss.sum() or 1.0
    out = []
    for b in range(n_bins):
        m = bins == b
        out.append({
            "lo": float(edges[b]), "hi": float(edges[b + 1]), "n": int(m.sum()),
            "confidence": float(conf[m].mean()) if m.any() else float("nan"),
            "accuracy": float(correct[m].mean()) if m.any() else float("nan"),
            "loss_share": float(loss[m].sum() / total), "mean_nll": float(loss[m].mean()) if m.any() else float("nan"),
        })
    return out


# ------------------------------------------------------------------------------------------------ classes


def per_class(probs: np.ndarray, labels: np.ndarray, n_classes: int, eps: float = SCORER_EPS) -> list[dict]:
    """One row per model class: support, accuracy (recall), mean log loss of its photos, mean confidence on the
    true class, and the class its photos are most often mistaken for (with the count)."""
    pred = probs.argmax(axis=1)
    loss = row_nll(clip(probs, eps), labels)
    conf = confusion_counts(probs, labels, n_classes)
    rows = []
    for c in range(n_classes):
        m = labels == c
        wrong = conf[c].copy()
        wrong[c] = 0
        top = int(wrong.argmax())
        rows.append({
            "class": c, "support": int(m.sum()),
            "accuracy": float((pred[m] == c).mean()) if m.any() else float("nan"),
            "log_loss": float(loss[m].mean()) if m.any() else float("nan"),
            "p_true": float(probs[m, c].mean()) if m.any() else float("nan"),
            "wrong_class": top if wrong[top] > 0 else -1, "wrong_count": int(wrong[top]),
        })
    return rows


def worst_first(rows: list[dict]) -> list[dict]:
    """Classes by mean log loss, highest first (classes without photos last)."""
    return sorted(rows, key=lambda r: (np.isnan(r["log_loss"]), -np.nan_to_num(r["log_loss"]), r["class"]))


def confusion_counts(probs: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Hard confusion matrix: [true, predicted] counts."""
    conf = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(conf, (labels, probs.argmax(axis=1)), 1)
    return conf


def soft_confusion(probs: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """[a, b]: mean probability of class b on the photos labelled a (0 for a class without photos)."""
    total = np.zeros((n_classes, n_classes))
    np.add.at(total, labels, probs)
    counts = np.bincount(labels, minlength=n_classes).astype(float)
    return total / np.maximum(counts, 1.0)[:, None]


def confused_pairs(probs: np.ndarray, labels: np.ndarray, n_classes: int, top: int = 15) -> list[dict]:
    """Class pairs by the number of photos of one predicted as the other (both directions), most first."""
    conf = confusion_counts(probs, labels, n_classes)
    soft = soft_confusion(probs, labels, n_classes)
    both = conf + conf.T
    iu = np.triu_indices(n_classes, 1)
    order = np.lexsort((-(soft + soft.T)[iu], -both[iu]))
    out = []
    for j in order[:top]:
        a, b = int(iu[0][j]), int(iu[1][j])
        if both[a, b] == 0:
            break
        out.append({"a": a, "b": b, "a_as_b": int(conf[a, b]), "b_as_a": int(conf[b, a]),
                    "rate": float((soft[a, b] + soft[b, a]) / 2)})
    return out


# ------------------------------------------------------------------------------------------------ groups


@dataclass
class Groups:
    """Classes grouped by agglomerative clustering: ``label`` gives each class its group (0..), ``groups`` lists the
    groups of two or more classes (closest first) with the height at which each formed (``distances``)."""

    method: str  # "confusion" or "features"
    label: np.ndarray  # (classes,) group id of each class; singletons have their own id
    groups: list[list[int]] = field(default_factory=list)
    distances: list[float] = field(default_factory=list)
    cut: float = 0.0


def cluster(dist: np.ndarray, cut: float, method: str) -> Groups:
    """Average-linkage agglomerative clustering (scipy) of a square distance matrix, cut at ``cut``."""
    from scipy.cluster.hierarchy import cophenet, fcluster, linkage
    from scipy.spatial.distance import squareform

    n = dist.shape[0]
    if n < 2:
        return Groups(method, np.zeros(n, dtype=np.int64), cut=cut)
    d = (dist + dist.T) / 2
    np.fill_diagonal(d, 0.0)
    z = linkage(squareform(np.clip(d, 0.0, None), checks=False), method=LINKAGE)
    label = fcluster(z, t=cut, criterion="distance") - 1
    coph = squareform(cophenet(z))
    groups, heights = [], []
    for g in np.unique(label):
        members = np.where(label == g)[0]
        if len(members) > 1:
            groups.append(members.tolist())
            heights.append(float(coph[np.ix_(members, members)].max()))
    order = sorted(range(len(groups)), key=lambda i: (heights[i], -len(groups[i])))  # most confusable first
    return Groups(method, label.astype(np.int64), [groups[i] for i in order], [heights[i] for i in order], cut)


def confusion_groups(probs: np.ndarray, labels: np.ndarray, n_classes: int, cut: float = CONFUSION_CUT) -> Groups:
    soft = soft_confusion(probs, labels, n_classes)
    sym = (soft + soft.T) / 2
    return cluster(1.0 - np.clip(2 * sym, 0.0, 1.0), cut, "confusion")


def class_centroids(features: np.ndarray, labels: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(centroids of the L2-normalised features of each class's photos, mask of classes that have photos)."""
    ok = np.isfinite(features).all(axis=1)
    f = features[ok].astype(np.float64)
    f /= np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    cent = np.zeros((n_classes, f.shape[1]))
    np.add.at(cent, labels[ok], f)
    counts = np.bincount(labels[ok], minlength=n_classes)
    return cent / np.maximum(counts, 1)[:, None], counts > 0


def feature_groups(features: np.ndarray, labels: np.ndarray, n_classes: int,
                   ratio: float = FEATURE_CUT_RATIO) -> Groups:
    """Groups of classes whose centroids lie close in feature space (cosine distance); classes without photos stay
    alone."""
    from scipy.spatial.distance import cdist

    cent, present = class_centroids(features, labels, n_classes)
    dist = np.ones((n_classes, n_classes)) * 2.0  # beyond any cosine distance: absent classes never join
    idx = np.where(present)[0]
    if len(idx) > 1:
        dist[np.ix_(idx, idx)] = cdist(cent[idx], cent[idx], metric="cosine")
    pairs = dist[np.ix_(idx, idx)][np.triu_indices(len(idx), 1)] if len(idx) > 1 else np.array([1.0])
    cut = ratio * float(np.median(pairs))
    return cluster(np.nan_to_num(dist, nan=2.0), cut, "features")


def group_scores(probs: np.ndarray, labels: np.ndarray, label_of: np.ndarray,
                 eps: float = SCORER_EPS) -> dict[str, float]:
    """Accuracy and log loss when classes of one group count as one (each group's probability summed)."""
    n_groups = int(label_of.max()) + 1 if len(label_of) else 0
    gp = np.zeros((len(probs), n_groups))
    np.add.at(gp.T, label_of, probs.T)
    gl = label_of[labels]
    return {"accuracy": float((gp.argmax(axis=1) == gl).mean()), "log_loss": nll(clip(gp, eps), gl)}


# ------------------------------------------------------------------------------------------------ label issues


def confident_joint_issues(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Confident learning's rule (Northcutt, Jiang and Chuang, JAIR 2021), by hand for when cleanlab is missing:
    each class's threshold is the mean probability the model gives it on the photos labelled with it; a photo
    counts towards class j when p_j reaches j's threshold (the most probable such j); it is a likely label error
    when that class is not its given label (an off-diagonal entry of the confident joint). Returns the indices,
    least self-confident first."""
    n_classes = probs.shape[1]
    counts = np.bincount(labels, minlength=n_classes)
    thresholds = np.full(n_classes, np.inf)
    has = counts > 0
    thresholds[has] = soft_confusion(probs, labels, n_classes)[has, np.where(has)[0]]
    above = probs >= thresholds[None, :]
    masked = np.where(above, probs, -1.0)
    j = masked.argmax(axis=1)
    counted = above.any(axis=1)
    flagged = np.where(counted & (j != labels))[0]
    return flagged[np.argsort(probs[flagged, labels[flagged]], kind="stable")]


def find_label_issues(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, str]:
    """(indices of likely label errors, least self-confident first; the method used). cleanlab's
    ``find_label_issues`` (confident learning, pruned by noise rate) where it is installed and accepts the data,
    else :func:`confident_joint_issues`."""
    try:
        from cleanlab.filter import find_label_issues as cl_find
    except ImportError:
        return confident_joint_issues(probs, labels), "confident joint (by hand; cleanlab is not installed)"
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. classes with few photos: the rule still applies
            idx = cl_find(labels, probs, return_indices_ranked_by="self_confidence", n_jobs=1)
    except (ValueError, AssertionError, IndexError) as exc:
        return confident_joint_issues(probs, labels), f"confident joint (by hand; cleanlab refused the data: {exc})"
    return np.asarray(idx, dtype=np.int64), "cleanlab.filter.find_label_issues (confident learning)"


def suggested_labels(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The most probable class other than the given one."""
    p = probs.copy()
    p[np.arange(len(labels)), labels] = -1.0
    return p.argmax(axis=1)
