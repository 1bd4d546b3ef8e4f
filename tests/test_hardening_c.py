"""Issue 16 (items 13, 20b, 20a): train and prepare agree on what a class can use, every photo left out is listed,
the split stratifies only the classes that train, and train says how many photos it left out beyond those it lists."""

from __future__ import annotations

import csv
import shutil
import warnings
from pathlib import Path

import numpy as np

from carclf.cli import main
from carclf.config import load_config
from carclf.demo.synth import SynthSpec, make_dataset
from tests.conftest import tiny_overrides

LAST = "힣solo"  # sorts after every Hangul class name the synthetic data uses


def _data(root: Path) -> tuple[Path, list[str]]:
    info = make_dataset(root, SynthSpec(n_classes=3, train_per_class=6, test_per_class=1, size=(64, 48),
                                        n_duplicates=0, merged_pair=False, seed=2))
    return root, info.classes


def _copies_class(root: Path, classes: list[str], n: int) -> Path:
    """A class folder LAST whose ``n`` photos are copies of photos filed under the first class."""
    folder = root / "train" / LAST
    folder.mkdir()
    for i in range(n):
        shutil.copyfile(root / "train" / classes[0] / f"{i:04d}.jpg", folder / f"copy{i}.jpg")
    return folder


def _rows(path: Path) -> list[dict]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


KEEP = {"data.within_class": "keep_all", "data.cross_class": "keep"}


def test_train_and_prepare_count_a_cross_class_copy_for_both_classes(tmp_path, capsys):
    """Item 13: prepare counts the one photo as usable; train used to call the class empty (the copy's group was
    counted for the first class only). Now both say 1, and train's refusal is the per-fold one."""
    root, classes = _data(tmp_path / "data")
    _copies_class(root, classes, 1)
    over = tiny_overrides(root, tmp_path / "runs", **KEEP)
    rc = main(["train", *over])
    err = capsys.readouterr().err
    assert rc == 2
    assert "no usable photo left" not in err
    assert f"fewer usable photos (a photo and its copies count once) than the 2 folds: '{LAST}' (1)" in err
    used = {r["name"]: int(r["n_used"]) for r in _rows(tmp_path / "runs" / "prepare" / "data" / "classes.csv")}
    assert used[LAST] == 1
    assert not (tmp_path / "runs" / "t").exists()


def test_a_class_of_cross_class_copies_is_trained_not_dropped(tmp_path):
    """Item 13 with data.empty_class=drop: two copies are two usable photos in two groups; the class was dropped and
    its photos were in no skipped.csv."""
    from carclf.data.rundata import load_run_data

    root, classes = _data(tmp_path / "data")
    _copies_class(root, classes, 2)
    cfg = load_config(None, tiny_overrides(root, tmp_path / "runs", **KEEP, **{"data.empty_class": "drop"}))
    data = load_run_data(cfg, log=lambda s: None)
    assert data.merge.dropped == []
    assert LAST in data.classes
    mine = [i for i, p in enumerate(data.trainset.paths) if p.parent.name == LAST]
    assert data.usable()[mine].all()
    assert set(data.folds[mine]) == {0, 1}  # one copy in each fold


def test_a_dropped_class_is_not_stratified_and_its_photo_is_listed(tmp_path, monkeypatch, capsys):
    """Item 20b: a class whose only photo is broken, with data.empty_class=drop, entered the split as a class of its
    own ("-1") and scikit-learn warned about its 1 member. It is now in no fold, and skipped.csv names it."""
    import carclf.train.loop as loop

    root, _ = _data(tmp_path / "data")
    (root / "train" / LAST).mkdir()
    (root / "train" / LAST / "broken.jpg").write_bytes(b"")
    monkeypatch.setattr(loop, "parse_folds", lambda spec, n, outer=-1: [])  # the data step only: no fold is trained
    over = tiny_overrides(root, tmp_path / "runs", **{"data.empty_class": "drop"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scikit-learn's "least populated class" UserWarning fails the test
        assert main(["train", *over]) == 0
    out = capsys.readouterr().out
    assert f"training without 1 class(es) that have no usable photo: '{LAST}'" in out
    skipped = {r["path"]: r["reason"] for r in _rows(tmp_path / "runs" / "t" / "skipped.csv")}
    broken = str((root / "train" / LAST / "broken.jpg").absolute())
    assert skipped[broken].startswith("bad file: zero-byte")
    folds = {r["path"]: int(r["fold"]) for r in _rows(tmp_path / "runs" / "t" / "folds.csv")}
    assert folds[f"{LAST}/broken.jpg"] == -1
    assert {f for p, f in folds.items() if not p.startswith(LAST)} == {0, 1}


def test_train_says_how_many_more_photos_it_skipped(tmp_path, monkeypatch, capsys):
    """Item 20a: 13 photos left out, the first 10 listed, then "... and 3 more"."""
    import carclf.train.loop as loop

    root, classes = _data(tmp_path / "data")
    for i in range(13):
        (root / "train" / classes[i % 3] / f"empty{i:02d}.jpg").write_bytes(b"")
    monkeypatch.setattr(loop, "parse_folds", lambda spec, n, outer=-1: [])
    assert main(["train", *tiny_overrides(root, tmp_path / "runs")]) == 0
    out = capsys.readouterr().out.splitlines()
    listed = [line for line in out if line.startswith("  ") and "zero-byte" in line]
    assert len(listed) == 10
    skipped_csv = tmp_path / "runs" / "t" / "skipped.csv"
    assert f"  ... and 3 more (all of them in {skipped_csv})" in out
    assert len(_rows(skipped_csv)) == 13


def test_usable_per_class_counts_a_group_once_per_class_it_holds():
    from carclf.data.prepare import usable_per_class

    labels, usable = [0, 0, 1, 1, 2, -1], [True, True, True, False, True, True]
    assert usable_per_class(labels, usable, 3).tolist() == [2, 1, 1]
    groups = [7, 7, 7, 8, 9, 9]  # group 7 spans classes 0 and 1; 9 holds class 2 and a dropped class
    assert usable_per_class(labels, usable, 3, groups).tolist() == [1, 1, 1]
    assert usable_per_class(np.array([], dtype=int), np.array([], dtype=bool), 2, []).tolist() == [0, 0]
