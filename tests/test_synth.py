"""Tests for the synthetic competition-layout dataset generator."""

from __future__ import annotations

import csv
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from carclf.demo.synth import SynthInfo, SynthSpec, class_names, make_dataset

SMALL = SynthSpec(n_classes=6, train_per_class=5, test_per_class=3, n_duplicates=3, seed=3)


def _read_csv(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.reader(fh))


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> SynthInfo:
    return make_dataset(tmp_path_factory.mktemp("small") / "data", SMALL)


def test_layout_and_csvs(small: SynthInfo) -> None:
    root = small.root
    assert small.classes == sorted(small.classes)
    assert len(set(small.classes)) == SMALL.n_classes
    assert sorted(p.name for p in (root / "train").iterdir()) == small.classes
    n_train = sum(len(list((root / "train" / c).glob("*.jpg"))) for c in small.classes)
    assert n_train == SMALL.n_classes * SMALL.train_per_class + SMALL.n_duplicates

    test_csv = _read_csv(root / "test.csv")
    assert test_csv[0] == ["ID", "img_path"]
    ids = [r[0] for r in test_csv[1:]]
    assert ids == [f"TEST_{i:05d}" for i in range(SMALL.n_classes * SMALL.test_per_class)]
    assert all(r[1] == f"./test/{r[0]}.jpg" for r in test_csv[1:])
    assert sorted(p.stem for p in (root / "test").glob("*.jpg")) == ids
    with Image.open(root / "test" / "TEST_00000.jpg") as im:
        assert im.size == SMALL.size
        assert im.format == "JPEG"

    sub = _read_csv(root / "sample_submission.csv")
    cols = sub[0][1:]
    assert sub[0][0] == "ID"
    assert sorted(cols) == small.classes
    assert cols != small.classes  # consumers must match columns by name
    assert [r[0] for r in sub[1:]] == ids
    assert all(np.isclose(float(x), 1 / SMALL.n_classes) for r in sub[1:] for x in r[1:])

    labels = _read_csv(root / "test_labels.csv")
    assert labels[0] == ["ID", "label"]
    assert {r[0]: r[1] for r in labels[1:]} == small.test_labels
    assert set(small.test_labels) == set(ids)
    assert set(small.test_labels.values()) == set(small.classes)


def test_merged_pair_and_duplicates(small: SynthInfo) -> None:
    assert len(small.merged) == 1
    a, b = small.merged[0]
    assert a != b
    assert {a, b} <= set(small.classes)
    assert len(small.duplicates) == SMALL.n_duplicates
    for src, dst in small.duplicates:
        assert src.parent == dst.parent
        assert src.name != dst.name
        assert src.read_bytes() == dst.read_bytes()


def test_deterministic(small: SynthInfo, tmp_path: Path) -> None:
    again = make_dataset(tmp_path / "again", SMALL)
    other = make_dataset(tmp_path / "other", SynthSpec(**{**SMALL.__dict__, "seed": 4}))
    for rel in ("test/TEST_00001.jpg", f"train/{small.classes[0]}/0002.jpg", "sample_submission.csv"):
        assert (small.root / rel).read_bytes() == (again.root / rel).read_bytes()
    assert (small.root / "test/TEST_00001.jpg").read_bytes() != (other.root / "test/TEST_00001.jpg").read_bytes()
    assert again.test_labels == small.test_labels
    assert [d.name for _, d in again.duplicates] == [d.name for _, d in small.duplicates]


def test_nfd_folder_names(tmp_path: Path) -> None:
    spec = SynthSpec(n_classes=3, train_per_class=2, test_per_class=1, n_duplicates=1, nfd_names=True)
    info = make_dataset(tmp_path / "nfd", spec)
    folders = [p.name for p in (info.root / "train").iterdir()]
    korean = [f for f in folders if not f.isascii()]
    assert korean
    for f in korean:
        assert unicodedata.is_normalized("NFD", f)
        assert not unicodedata.is_normalized("NFC", f)
    assert all(unicodedata.is_normalized("NFC", c) for c in info.classes)
    assert sorted(unicodedata.normalize("NFC", f) for f in folders) == info.classes
    header = _read_csv(info.root / "sample_submission.csv")[0]
    assert all(unicodedata.is_normalized("NFC", c) for c in header)


def test_refuses_non_empty_root(tmp_path: Path) -> None:
    root = tmp_path / "busy"
    root.mkdir()
    (root / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="busy"):
        make_dataset(root, SynthSpec(n_classes=2, train_per_class=1, test_per_class=1, n_duplicates=0))
    empty = tmp_path / "empty"
    empty.mkdir()  # an existing empty folder is fine
    make_dataset(empty, SynthSpec(n_classes=2, train_per_class=1, test_per_class=1, n_duplicates=0))


def test_class_names() -> None:
    names = class_names(40)
    assert len(set(names)) == 40
    assert names[:5] == class_names(5)
    for n in names:
        assert unicodedata.is_normalized("NFC", n)
        assert n == n.strip()
        assert not set(n) & set('/\\:*?"<>|,')
    with pytest.raises(ValueError, match="class_names supports"):
        class_names(10_000)


def test_not_trivial_for_pixel_nearest_centroid(tmp_path: Path) -> None:
    # Colour, background and pose are nuisances, so raw 16x16 pixels must not solve the task.
    info = make_dataset(tmp_path / "nc", SynthSpec(n_classes=8, train_per_class=12, test_per_class=6, n_duplicates=0))

    def vec(p: Path) -> np.ndarray:
        with Image.open(p) as im:
            return np.asarray(im.convert("L").resize((16, 16), Image.BILINEAR), np.float32).ravel() / 255

    cents = np.stack([np.mean([vec(p) for p in (info.root / "train" / c).glob("*.jpg")], 0) for c in info.classes])
    ids = sorted(info.test_labels)
    x = np.stack([vec(info.root / "test" / f"{t}.jpg") for t in ids])
    pred = ((x[:, None, :] - cents[None]) ** 2).sum(-1).argmin(1)
    acc = np.mean([info.classes[k] == info.test_labels[t] for k, t in zip(pred, ids, strict=True)])
    assert acc < 0.9
