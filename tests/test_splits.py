import csv

import numpy as np
import pytest

from carclf.data.scan import TrainSet
from carclf.data.splits import load_or_make_folds, parse_folds, stratified_folds
from carclf.errors import CarclfError


def _trainset(tmp_path, counts):
    classes = [f"c{i}" for i in range(len(counts))]
    paths, labels = [], []
    for i, n in enumerate(counts):
        for j in range(n):
            paths.append(tmp_path / "train" / classes[i] / f"{j}.jpg")
            labels.append(i)
    return TrainSet(tmp_path / "train", classes, paths, labels)


def test_folds_are_stratified_and_seeded():
    labels = [c for c in range(7) for _ in range(10 + c)]
    a = stratified_folds(labels, 5, seed=3)
    assert set(a) == set(range(5))
    y = np.array(labels)
    for c in range(7):
        per_fold = np.bincount(a[y == c], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1  # each class spread evenly over the folds
    assert (stratified_folds(labels, 5, seed=3) == a).all()
    assert (stratified_folds(labels, 5, seed=4) != a).any()


def test_saved_split_is_reused_and_renewed_when_data_changes(tmp_path):
    ts = _trainset(tmp_path, [6, 7, 8])
    folds, path = load_or_make_folds(ts, 3, 0, tmp_path / "prep")
    assert path.is_file()
    # A saved split is read back even if the seed-derived split would now differ (e.g. another sklearn version).
    rows = list(csv.DictReader(path.open()))
    assert {r["policy"] for r in rows} == {"stratified_kfold"}
    rows[0]["fold"] = "9"
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    again, path2 = load_or_make_folds(ts, 3, 0, tmp_path / "prep")
    assert path2 == path
    assert 9 in again
    grown = _trainset(tmp_path, [6, 7, 9])
    new, path3 = load_or_make_folds(grown, 3, 0, tmp_path / "prep")
    assert path3 != path
    assert 9 not in new


def test_class_smaller_than_folds_says_how_to_fix(tmp_path):
    ts = _trainset(tmp_path, [6, 2, 8])
    with pytest.raises(CarclfError, match=r"'c1' \(2\).*data.n_folds=2.*merge"):
        load_or_make_folds(ts, 5, 0, tmp_path / "prep")


def test_parse_folds():
    assert parse_folds("all", 3) == [0, 1, 2]
    assert parse_folds("2,0", 3) == [0, 2]
    assert parse_folds(1, 3) == [1]
    with pytest.raises(CarclfError, match="numbered 0..2"):
        parse_folds("3", 3)
    with pytest.raises(CarclfError, match="must be 'all' or fold numbers"):
        parse_folds("first", 3)


def test_group_folds_never_split_a_group_and_are_recorded(tmp_path):
    ts = _trainset(tmp_path, [12, 12, 12, 12])
    # Pairs of copies: 0-1, 2-3, ... share a group; plain stratified folds split many of them.
    groups = [i // 2 for i in range(len(ts.labels))]
    plain, _ = load_or_make_folds(ts, 4, 0, tmp_path / "prep")
    grouped, path = load_or_make_folds(ts, 4, 0, tmp_path / "prep", groups)
    g = np.array(groups)
    straddle = lambda folds: sum(len(set(folds[g == k])) > 1 for k in set(groups))  # noqa: E731
    assert straddle(plain) > 0
    assert straddle(grouped) == 0
    assert "group" in path.name
    rows = list(csv.DictReader(path.open()))
    assert {r["policy"] for r in rows} == {"stratified_group_kfold"}
    assert [int(r["group"]) for r in rows] == groups
    y = np.array(ts.labels)
    for c in range(4):  # still stratified: every class in every fold
        assert set(grouped[y == c]) == set(range(4))


def test_photos_of_a_dropped_class_are_in_no_fold_and_not_stratified(tmp_path):
    """Issue 16 item 20b: label -1 (a class dropped by data.empty_class=drop) was stratified as a class of its own,
    and scikit-learn warned that its 1 member is fewer than the folds."""
    import warnings

    labels = [0] * 6 + [1] * 6 + [-1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = stratified_folds(labels, 3, seed=0)
        grouped = stratified_folds(labels, 3, seed=0, groups=list(range(13)))
    for folds in (plain, grouped):
        assert folds[-1] == -1
        assert sorted(set(folds[:-1])) == [0, 1, 2]
    assert (stratified_folds(labels[:-1], 3, seed=0) == plain[:-1]).all()  # the others' split is unchanged
