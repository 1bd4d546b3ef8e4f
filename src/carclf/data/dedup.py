"""Duplicate groups over the manifest: exact copies (same bytes or same decoded pixels) and near copies (perceptual
hashes within a Hamming distance), as connected components, each classified as within-class, cross-class (a label
conflict) and/or train-test (a leak).

Threshold calibration (``DEFAULT_NEAR_THRESHOLD``), reproducible with ``python benchmarks/prepare_cars196.py
--calibrate`` (single process, ~15 s). Real photos: the 6,114 of ../shared/data/cars196 (196 classes, tight crops of
cars, so distinct photos look alike more than in most data sets). phash distances are even numbers in practice (the
hash thresholds 64 DCT terms at their median, so every hash has 32 bits set).

* Near copies of 300 photos, distance to the original (share caught at <= 2 / 4 / 6): JPEG re-encode at quality
  50-95, resize to 50-90 % (+ quality 75), PNG re-save: 100 % / 100 % / 100 %; brightness +10 %: 96 / 100 / 100 %;
  1 % crop: 57 / 91 / 99 %; 2 % crop: 15 / 47 / 73 %; 5 % crop: 0 / 1 / 4 %.
* Distinct photos, all 18.7M pairs: 8 pairs at <= 2, all true copies on inspection (same photo filed under two
  classes, e.g. Aston Martin V8 Vantage Convertible/Coupe). At 4, 2 more true copies and 2 *different cars* in the
  same pose (Audi S4 vs Suzuki Aerio, BMW M3 vs M5): false label conflicts. At 6, 3 true and 4 false more; at 8,
  ~60 more, nearly all false. Same-class pairs (93k): none <= 4.

So the default is 2: no false positive among 18.7M real pairs, every re-encode/resize caught. Cropped copies are
beyond what a 64-bit phash separates from look-alike photos; the report lists the pairs just above the threshold for
a person to judge, and ``near_threshold`` raises it (on these car photos 4 gives about one false match per 10M
pairs, 8 about one per 300k: with 41k photos, 840M pairs, that is hundreds of false label conflicts).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from carclf.data.manifest import csv_text

DEFAULT_NEAR_THRESHOLD = 2  # calibrated on cars196: see the module docstring
MAX_THRESHOLD = 32  # half of the 64 bits: beyond this two random photos "match"


# --------------------------------------------------------------------------------------------- hash arithmetic


def phash_array(hexes: list[str]) -> np.ndarray:
    """64-bit phash hex strings -> uint64 array."""
    return np.array([int(h, 16) for h in hexes], dtype=np.uint64)


def popcount(x: np.ndarray) -> np.ndarray:
    """Set bits per uint64 element (numpy >= 2 has it built in; older numpy uses a byte lookup table)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x).astype(np.uint8)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    return table[np.ascontiguousarray(x).view(np.uint8)].reshape(*x.shape, 8).sum(-1, dtype=np.uint8)


def hamming(a: int | np.ndarray, b: int | np.ndarray) -> np.ndarray:
    return popcount(np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64)))


def near_pairs(hashes: np.ndarray, max_distance: int, block: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs i < j with Hamming distance <= ``max_distance``: (i, j, distance) arrays.

    Brute force in row blocks against the upper triangle (written by hand: about n^2/2 XOR+popcount, ~4 s for 41k
    hashes, far simpler than a BK-tree or multi-index hashing and exact).
    """
    n = len(hashes)
    ii, jj, dd = [], [], []
    for start in range(0, n, block):
        stop = min(start + block, n)
        d = popcount(hashes[start:stop, None] ^ hashes[None, start:])  # (rows, n - start)
        r, c = np.nonzero(d <= max_distance)
        keep = c > r  # upper triangle: column index start + c, row index start + r
        r, c = r[keep], c[keep]
        ii.append(r + start)
        jj.append(c + start)
        dd.append(d[r, c])
    if not ii:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.uint8)
    return np.concatenate(ii).astype(np.int64), np.concatenate(jj).astype(np.int64), np.concatenate(dd)


def nearest_distances(hashes: np.ndarray, block: int = 256) -> np.ndarray:
    """Distance from each hash to its nearest other hash (64 when alone); for the report's histogram."""
    n = len(hashes)
    out = np.full(n, 64, dtype=np.uint8)
    for start in range(0, n, block):
        stop = min(start + block, n)
        d = popcount(hashes[start:stop, None] ^ hashes[None, :])
        d[np.arange(stop - start), np.arange(start, stop)] = 64  # not yourself
        out[start:stop] = d.min(1) if n > 1 else 64
    return out


# ------------------------------------------------------------------------------------------------------ groups


@dataclass
class Member:
    path: str
    split: str  # "train" | "test"
    cls: str  # "" for test
    id: str  # test ID, "" for train
    distance: int  # phash distance to the group's first member


@dataclass
class DupGroup:
    """A connected component of duplicate edges; ``members[0]`` is the reference (train before test, then by path)."""

    id: int
    kind: str  # "exact": every member has the same bytes or pixels; "near": at least one only looks the same
    members: list[Member] = field(default_factory=list)

    @property
    def train(self) -> list[Member]:
        return [m for m in self.members if m.split == "train"]

    @property
    def test(self) -> list[Member]:
        return [m for m in self.members if m.split == "test"]

    @property
    def classes(self) -> list[str]:
        return sorted({m.cls for m in self.train})

    @property
    def within_class(self) -> bool:
        """Two or more training copies of one class (test copies may also be present: see ``train_test``)."""
        return len(self.train) >= 2 and len(self.classes) == 1

    @property
    def cross_class(self) -> bool:
        """Training copies under more than one class: a label conflict."""
        return len(self.classes) > 1

    @property
    def train_test(self) -> bool:
        """A test photo that is also in train: a leak."""
        return bool(self.train) and bool(self.test)


def find_groups(rows: list[dict], threshold: int) -> list[DupGroup]:
    """Duplicate groups (two or more members) among readable manifest rows, ids 0.. in order of first member."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    ok = [r for r in rows if r["status"] == "ok"]
    n = len(ok)
    if n < 2:
        return []
    hashes = phash_array([r["phash"] for r in ok])
    src: list[np.ndarray] = []
    dst: list[np.ndarray] = []
    for key in ("sha1", "pixel_hash"):  # exact: chain the members of each equal-key bucket
        buckets: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(ok):
            buckets[r[key]].append(i)
        for idx in buckets.values():
            if len(idx) > 1:
                src.append(np.array(idx[:-1]))
                dst.append(np.array(idx[1:]))
    exact_src = np.concatenate(src) if src else np.empty(0, np.int64)
    exact_dst = np.concatenate(dst) if dst else np.empty(0, np.int64)
    ni, nj, _ = near_pairs(hashes, threshold)

    def components(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
        return connected_components(graph, directed=False)[1]

    exact_label = components(exact_src, exact_dst)
    label = components(np.concatenate([exact_src, ni]), np.concatenate([exact_dst, nj]))
    by_label: dict[int, list[int]] = defaultdict(list)
    for i, lab in enumerate(label):
        by_label[int(lab)].append(i)
    comps = []
    for idx in by_label.values():
        if len(idx) < 2:
            continue
        idx.sort(key=lambda i: (ok[i]["split"] != "train", ok[i]["path"]))
        comps.append(idx)
    comps.sort(key=lambda idx: ok[idx[0]]["path"])
    groups = []
    for gid, idx in enumerate(comps):
        kind = "exact" if len({int(exact_label[i]) for i in idx}) == 1 else "near"
        dist = hamming(hashes[idx[0]], hashes[idx])
        members = [Member(ok[i]["path"], ok[i]["split"], ok[i]["class"], ok[i]["id"], int(d))
                   for i, d in zip(idx, dist, strict=True)]
        groups.append(DupGroup(gid, kind, members))
    return groups


# ------------------------------------------------------------------------------------------------------ CSV

DUPLICATE_COLUMNS = ["group_id", "kind", "path", "split", "class", "id", "distance_to_first",
                     "within_class", "cross_class", "train_test"]


def duplicates_csv(groups: list[DupGroup]) -> str:
    """One row per member of every group."""
    return csv_text(DUPLICATE_COLUMNS, (
        [g.id, g.kind, m.path, m.split, m.cls, m.id, m.distance, int(g.within_class), int(g.cross_class),
         int(g.train_test)]
        for g in groups for m in g.members
    ))


def conflicts_csv(groups: list[DupGroup], excluded: dict[str, str]) -> str:
    """One row per training member of every cross-class group: the same photo under different labels."""
    return csv_text(["group_id", "kind", "path", "class", "classes_in_group", "distance_to_first", "excluded"], (
        [g.id, g.kind, m.path, m.cls, " | ".join(g.classes), m.distance, int(m.path in excluded)]
        for g in groups if g.cross_class for m in g.train
    ))


def leak_rows(groups: list[DupGroup], hashes: dict[str, int]) -> list[dict]:
    """One row per test photo that has a copy in train: the train copies, their classes and the closest distance.

    ``label_hint`` is the train class when all copies agree (a test photo identical to a labelled one).
    """
    out = []
    for g in groups:
        if not g.train_test:
            continue
        for t in g.test:
            dists = [int(hamming(hashes[t.path], hashes[m.path])) for m in g.train]
            classes = sorted({m.cls for m in g.train})
            out.append({
                "group_id": g.id, "kind": g.kind, "test_id": t.id, "test_path": t.path,
                "train_paths": " | ".join(m.path for m in g.train), "train_classes": " | ".join(classes),
                "distance": min(dists), "label_hint": classes[0] if len(classes) == 1 else "",
            })
    return out


LEAK_COLUMNS = ["group_id", "kind", "test_id", "test_path", "train_paths", "train_classes", "distance", "label_hint"]


def leaks_csv(rows: list[dict]) -> str:
    return csv_text(LEAK_COLUMNS, ([r[c] for c in LEAK_COLUMNS] for r in rows))

