"""Stratified K-fold splits, saved once per data set and reused by every later run on the same data."""

from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from carclf.data.scan import TrainSet
from carclf.errors import CarclfError
from carclf.io import atomic_write_text


def data_fingerprint(relpaths: list[str], labels: list[int], groups: list[int] | None = None) -> str:
    h = hashlib.sha1()
    for i, (rel, lab) in enumerate(zip(relpaths, labels, strict=True)):
        h.update(f"{rel}\t{lab}\t{groups[i] if groups is not None else ''}\n".encode())
    return h.hexdigest()[:10]


def check_fold_counts(classes: list[str], labels: list[int], n_folds: int, counted: str = "images") -> None:
    """Every class needs at least one unit (photo, or duplicate group) per fold, or some fold cannot learn it."""
    y = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(y[y >= 0], minlength=len(classes))  # -1: a dropped class (data.empty_class=drop)
    small = [(classes[i], int(c)) for i, c in enumerate(counts) if c < n_folds]
    if small:
        listed = ", ".join(f"'{n}' ({c})" for n, c in small[:5])
        fewest = min(c for _, c in small)
        fix = f"Use fewer folds (data.n_folds={fewest}), add" if fewest >= 2 else "Add"
        raise CarclfError(
            f"{len(small)} class(es) have fewer {counted} than the {n_folds} folds: {listed}. "
            f"{fix} photos, or merge the class with the model it duplicates (merges.yaml)."
        )


def stratified_folds(labels: list[int], n_folds: int, seed: int, groups: list[int] | None = None) -> np.ndarray:
    """Fold index per sample, shuffled with ``seed``: scikit-learn's StratifiedKFold, or with ``groups``
    StratifiedGroupKFold, which keeps every group (copies of one photo) inside a single fold.

    A label below 0 (a class dropped for want of usable photos, data.empty_class=drop) is no class to stratify: such
    photos are in no fold (-1), and nothing trains or is scored on them."""
    y = np.asarray(labels, dtype=np.int64)
    folds = np.full(len(y), -1, dtype=np.int64)
    rows = np.where(y >= 0)[0]
    if groups is None:
        splits = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(np.zeros(len(rows)), y[rows])
    else:
        sgkf = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        splits = sgkf.split(np.zeros(len(rows)), y[rows], np.asarray(groups)[rows])
    for k, (_, val_idx) in enumerate(splits):
        folds[rows[val_idx]] = k
    return folds


def folds_path(
    prepare_dir: Path, trainset: TrainSet, n_folds: int, seed: int, groups: list[int] | None = None,
    labels: list[int] | None = None,
) -> Path:
    fp = data_fingerprint(trainset.relpaths(), trainset.labels if labels is None else labels, groups)
    policy = "group" if groups is not None else "stratified"
    return prepare_dir / f"folds-k{n_folds}-s{seed}-{policy}-{fp}.csv"


def load_or_make_folds(
    trainset: TrainSet, n_folds: int, seed: int, prepare_dir: Path, groups: list[int] | None = None,
    labels: list[int] | None = None, classes: list[str] | None = None,
) -> tuple[np.ndarray, Path]:
    """Return the fold of every training image, reading the saved split when the same data was split before.

    With ``groups`` (duplicate group per image) the split is leak-free: no group straddles two folds. The file name
    carries the policy and a fingerprint of (path, class, group): added, removed or relabelled photos, or changed
    duplicate groups, get a new split instead of silently reusing one that no longer matches. The file's ``policy``
    column records which split it is.

    ``labels``/``classes`` are the model's (after class merges, so a small class merged into its twin is stratified
    and counted with it); by default the folders'. A photo labelled -1 (its class dropped) gets fold -1: in no fold.
    """
    if labels is None:
        labels, classes = trainset.labels, trainset.classes
    labels = [int(v) for v in labels]
    check_fold_counts(classes or trainset.classes, labels, n_folds)
    path = folds_path(prepare_dir, trainset, n_folds, seed, groups, labels)
    rel = trainset.relpaths()
    if path.is_file():
        with path.open(encoding="utf-8", newline="") as fh:
            rows = list(csv.DictReader(fh))
        by_path = {r["path"]: int(r["fold"]) for r in rows}
        if set(by_path) == set(rel):
            return np.array([by_path[r] for r in rel], dtype=np.int64), path
    folds = stratified_folds(labels, n_folds, seed, groups)
    policy = "stratified_group_kfold" if groups is not None else "stratified_kfold"
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "class", "fold", "group", "policy"])
    for i, (r, lab, f) in enumerate(zip(rel, trainset.labels, folds, strict=True)):
        w.writerow([r, trainset.classes[lab], int(f), groups[i] if groups is not None else "", policy])
    atomic_write_text(path, buf.getvalue())
    return folds, path


def parse_folds(spec: str, n_folds: int, outer: int = -1) -> list[int]:
    """``"all"`` -> every fold; ``"0,2"`` -> [0, 2]; ``"full"`` (alone or after folds: ``"all,full"``) adds the
    full-data fit, numbered ``-1`` (carclf.artifacts.run.FULL) and always last, after the folds that choose its
    epochs. ``outer`` (``data.outer_fold``): a fold left out of the run, never in "all" and refused by number."""
    items = [s.strip().lower() for s in str(spec).split(",") if s.strip()]
    full = "full" in items
    items = [s for s in items if s != "full"]
    if items == ["all"]:
        return [k for k in range(n_folds) if k != outer] + ([-1] if full else [])
    try:
        chosen = sorted({int(s) for s in items})
    except ValueError as exc:
        raise CarclfError(
            f"train.folds='{spec}' must be 'all' or fold numbers such as 0 or 0,2, optionally with 'full' (the "
            "full-data fit)"
        ) from exc
    bad = [k for k in chosen if not 0 <= k < n_folds]
    if bad or not (chosen or full):
        raise CarclfError(f"train.folds='{spec}': folds are numbered 0..{n_folds - 1} (data.n_folds={n_folds})")
    if outer >= 0 and outer in chosen:
        raise CarclfError(f"train.folds='{spec}': fold {outer} is data.outer_fold, left out of this run entirely "
                          "(nested cross-validation): train the other folds")
    return chosen + ([-1] if full else [])
