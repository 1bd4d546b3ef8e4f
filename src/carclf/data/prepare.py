"""The data-health step: read every photo once, find bad files and duplicates, decide what training leaves out.

``prepare(DATA, out_dir)`` writes into ``out_dir`` (e.g. ``runs/prepare/<data name>/``):

    manifest.csv     one row per file (carclf.data.manifest.COLUMNS) + ``group`` (duplicate or singleton group id,
                     for group K-fold) + ``excluded`` (why training leaves the file out; empty if used); OS and zip
                     leftovers (__MACOSX, .DS_Store, Thumbs.db...) last, as "ignored": no other file lists them
    duplicates.csv   one row per member of each duplicate group (exact / near; within_class, cross_class, train_test)
    conflicts.csv    training photos filed under more than one class
    leaks.csv        test photos that are also in train, with the train copies and their classes
    quarantine.csv   path, split, class, reason: every excluded training file and every unreadable test file
    classes.csv      index, name, alias, n_train, n_used
    summary.json     counts, threshold, policies, timings and images/s

Re-running reuses ``manifest.csv``: unchanged files are not read again.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from carclf.artifacts.prepare import PrepareDir
from carclf.data.dedup import (
    DEFAULT_NEAR_THRESHOLD,
    MAX_THRESHOLD,
    DupGroup,
    conflicts_csv,
    duplicates_csv,
    find_groups,
    leak_rows,
    leaks_csv,
)
from carclf.data.manifest import DEFAULT_MAX_PIXELS, IGNORED, build_manifest, csv_text, read_manifest, write_manifest
from carclf.data.names import write_classes_csv
from carclf.errors import CarclfError
from carclf.io import atomic_write_text

WITHIN_CLASS_POLICIES = ("keep_one", "keep_all")
CROSS_CLASS_POLICIES = ("exclude", "keep")
DERIVED_COLUMNS = ["group", "excluded"]


@dataclass
class Prepared:
    """What prepare found. Paths are manifest paths: relative to DATA, posix, NFC (``train/<class>/<file>``), i.e.
    ``"train/" + TrainSet.relpaths()[i]``."""

    dir: Path
    manifest: list[dict]  # manifest.csv rows (ints parsed) but ignored ones: train (by class, path), then test
    groups: list[DupGroup]  # duplicate groups with two or more members
    excluded: dict[str, str]  # train path -> reason training leaves it out (bad file, duplicate, label conflict)
    group_of: dict[str, int]  # train path -> duplicate group id; files without duplicates get ids of their own
    threshold: int  # phash Hamming distance used for near duplicates
    classes: list[str] = field(default_factory=list)  # NFC class names, label order
    aliases: dict[str, str] = field(default_factory=dict)  # class name -> ASCII alias
    summary: dict = field(default_factory=dict)  # summary.json


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise CarclfError(f"{name}={value!r} is not a valid policy: use one of {', '.join(map(repr, allowed))}")


def prepare(
    data_root: Path | str,
    out_dir: Path | str,
    near_threshold: int | None = None,
    within_class: str = "keep_one",
    cross_class: str = "exclude",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int = 0,
    log: Callable[[str], None] = print,
) -> Prepared:
    """Check the data set under ``data_root`` and write the artefacts listed in the module docstring to ``out_dir``.

    ``within_class``: "keep_one" trains on one copy (the first by path) of photos duplicated inside a class,
    "keep_all" on every copy. ``cross_class``: "exclude" leaves out every training copy of a photo filed under
    several classes, "keep" trains on them. ``max_pixels``: larger images are refused as decompression bombs
    (0 disables). ``workers``: processes for reading (0 = every core).
    """
    _check_choice("within_class", within_class, WITHIN_CLASS_POLICIES)
    _check_choice("cross_class", cross_class, CROSS_CLASS_POLICIES)
    threshold = DEFAULT_NEAR_THRESHOLD if near_threshold is None else int(near_threshold)
    if not 0 <= threshold <= MAX_THRESHOLD:
        raise CarclfError(f"near_threshold must be between 0 and {MAX_THRESHOLD} (bits of 64), got {threshold}")
    root = Path(data_root).resolve()
    out = Path(out_dir)
    pdir = PrepareDir(out)  # the file names: carclf.artifacts.prepare
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    previous = _previous_manifest(out, root, log)
    rows, classes, stats = build_manifest(root, previous, max_pixels=max_pixels, workers=workers, log=log)
    ignored = [{**r, "group": "", "excluded": ""} for r in rows if r["status"] == IGNORED]
    rows = [r for r in rows if r["status"] != IGNORED]  # listed in manifest.csv; to everything else, absent
    t_read = time.perf_counter()

    groups = find_groups(rows, threshold)
    excluded, reasons = _exclusions(rows, groups, within_class, cross_class)
    group_of = _assign_groups(rows, groups)
    t_dedup = time.perf_counter()

    for r in rows:
        r["group"] = group_of[r["path"]]
        r["excluded"] = excluded.get(r["path"], "")
    train_group_of = {r["path"]: r["group"] for r in rows if r["split"] == "train"}
    hashes = {r["path"]: int(r["phash"], 16) for r in rows if r["status"] == "ok"}
    leaks = leak_rows(groups, hashes)
    n_train = Counter(r["class"] for r in rows if r["split"] == "train" and r["status"] == "ok")
    index = {c: i for i, c in enumerate(classes)}
    in_class = [r for r in rows if r["split"] == "train" and r["class"] in index]
    used = usable_per_class([index[r["class"]] for r in in_class],
                            [r["status"] == "ok" and not r["excluded"] for r in in_class], len(classes))
    n_used = {c: int(n) for c, n in zip(classes, used, strict=True)}
    write_manifest(pdir.manifest, rows + ignored, DERIVED_COLUMNS)
    atomic_write_text(pdir.duplicates, duplicates_csv(groups))
    atomic_write_text(pdir.conflicts, conflicts_csv(groups, excluded))
    atomic_write_text(pdir.leaks, leaks_csv(leaks))
    atomic_write_text(pdir.quarantine, csv_text(["path", "split", "class", "reason"], (
        [r["path"], r["split"], r["class"], r["excluded"] or r["error"]]
        for r in rows if r["excluded"] or r["status"] != "ok"
    )))
    aliases = write_classes_csv(pdir.classes, classes, dict(n_train), n_used)
    t_write = time.perf_counter()

    empty = [c for c in classes if not n_used.get(c)]
    summary = _summary(root, rows, len(ignored), groups, leaks, excluded, reasons, stats, threshold, max_pixels,
                       within_class, cross_class, classes, empty,
                       {"read": t_read - t_start, "dedup": t_dedup - t_read, "write": t_write - t_dedup,
                        "total": t_write - t_start})
    atomic_write_text(pdir.summary, json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    c = summary["counts"]
    log(f"prepare: {c['files']} files ({c['bad']} bad, {c['ignored']} OS/zip leftovers ignored), {c['groups']} "
        f"duplicate groups ({c['exact_groups']} exact, {c['near_groups']} near; {c['cross_class_groups']} cross-class, "
        f"{c['train_test_groups']} train/test), {c['excluded']} training files excluded -> {out}")
    if empty:
        log(f"prepare: warning: {len(empty)} class(es) have no usable photo left: {', '.join(empty[:5])}")
    return Prepared(out, rows, groups, excluded, train_group_of, threshold, classes, aliases, summary)


def usable_per_class(
    labels: list[int] | np.ndarray, usable: list[bool] | np.ndarray, n_classes: int,
    groups: list[int] | np.ndarray | None = None,
) -> np.ndarray:
    """What training can use per class: its usable photos, or with ``groups`` the duplicate groups holding a usable
    photo of it. A group filed under two classes (``cross_class=keep``) counts once for each: group K-fold puts the
    whole group in one fold, and both classes have a photo there. Labels below 0 (a dropped class) count for none.

    The one count behind prepare's ``n_used`` and empty classes and train's empty classes and per-fold check, so the
    two never disagree about a class."""
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    keep = np.asarray(usable, dtype=bool).reshape(-1) & (y >= 0)
    if groups is None:
        return np.bincount(y[keep], minlength=n_classes)
    pairs = np.unique(np.stack([np.asarray(groups, dtype=np.int64)[keep], y[keep]], axis=1), axis=0)
    return np.bincount(pairs[:, 1], minlength=n_classes)


def _previous_manifest(out: Path, root: Path, log: Callable[[str], None]) -> list[dict]:
    pdir = PrepareDir(out)
    path = pdir.manifest
    if not path.is_file():
        return []
    try:
        old_root = json.loads(pdir.summary.read_text(encoding="utf-8")).get("data_root")
    except (OSError, json.JSONDecodeError):
        old_root = None
    if old_root != str(root):
        # Same relative paths under another data root say nothing about these files.
        log(f"prepare: {path} was made from {old_root or 'an unknown data root'}, not {root}: reading every file")
        return []
    return read_manifest(path)


def _exclusions(
    rows: list[dict], groups: list[DupGroup], within_class: str, cross_class: str
) -> tuple[dict[str, str], dict[str, str]]:
    """(train path -> reason, train path -> reason kind: bad | conflict | duplicate)."""
    excluded: dict[str, str] = {}
    kind: dict[str, str] = {}
    for r in rows:
        if r["split"] == "train" and r["status"] != "ok":
            excluded[r["path"]], kind[r["path"]] = f"bad file: {r['error']}", "bad"
    for g in groups:
        if g.cross_class and cross_class == "exclude":
            for m in g.train:
                excluded[m.path] = f"label conflict: duplicate group {g.id} ({g.kind}) spans {' | '.join(g.classes)}"
                kind[m.path] = "conflict"
        if within_class == "keep_one":
            # One copy per class and group: a kept cross-class group keeps one photo in each of its classes.
            kept: dict[str, str] = {}
            for m in sorted((m for m in g.train if m.path not in excluded), key=lambda m: m.path):
                if m.cls in kept:
                    excluded[m.path] = f"duplicate of {kept[m.cls]} (group {g.id}, {g.kind}, distance {m.distance})"
                    kind[m.path] = "duplicate"
                else:
                    kept[m.cls] = m.path
    return excluded, kind


def _assign_groups(rows: list[dict], groups: list[DupGroup]) -> dict[str, int]:
    """Duplicate groups keep their ids; every other file gets the next free id, in manifest order."""
    out = {m.path: g.id for g in groups for m in g.members}
    nxt = len(groups)
    for r in rows:
        if r["path"] not in out:
            out[r["path"]] = nxt
            nxt += 1
    return out


def _reason_kind(error: str) -> str:
    """A short label for counting bad files: the reason up to its first ':' or '('."""
    for sep in (":", "("):
        error = error.split(sep, 1)[0]
    return error.strip()


def _summary(root, rows, n_ignored, groups, leaks, excluded, reasons, stats, threshold, max_pixels, within_class,
             cross_class, classes, empty, timings) -> dict:
    import imagehash
    import PIL

    train = [r for r in rows if r["split"] == "train"]
    bad = [r for r in rows if r["status"] != "ok"]
    kinds = Counter(reasons.values())
    probe_s = stats["probe_s"]
    return {
        "data_root": str(root),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "threshold": threshold,
        "max_pixels": max_pixels,
        "within_class": within_class,
        "cross_class": cross_class,
        "counts": {
            "files": len(rows), "train_files": len(train), "test_files": len(rows) - len(train),
            "classes": len(classes), "ok": len(rows) - len(bad), "bad": len(bad), "ignored": n_ignored,
            "bad_train": sum(r["split"] == "train" for r in bad), "bad_test": sum(r["split"] == "test" for r in bad),
            "groups": len(groups), "exact_groups": sum(g.kind == "exact" for g in groups),
            "near_groups": sum(g.kind == "near" for g in groups),
            "within_class_groups": sum(g.within_class for g in groups),
            "cross_class_groups": sum(g.cross_class for g in groups),
            "train_test_groups": sum(g.train_test for g in groups), "leaked_test_images": len(leaks),
            "excluded": len(excluded), "excluded_bad": kinds["bad"], "excluded_duplicate": kinds["duplicate"],
            "excluded_conflict": kinds["conflict"], "used_train": sum(r["status"] == "ok" for r in train) -
            kinds["duplicate"] - kinds["conflict"],
        },
        "bad_reasons": dict(Counter(_reason_kind(r["error"]) for r in bad).most_common()),
        "empty_classes": empty,
        "n_probed": stats["n_probed"],
        "n_reused": stats["n_reused"],
        "workers": stats["workers"],
        "images_per_s": round(stats["n_probed"] / probe_s, 1) if stats["n_probed"] and probe_s > 0 else None,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "versions": {"Pillow": PIL.__version__, "imagehash": imagehash.__version__},
    }

