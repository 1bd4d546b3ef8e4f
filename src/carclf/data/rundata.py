"""The data a run trains on: prepare's verdicts, class merges, dropped classes and the fold split.

Data-level only (no torch, no timm): ``carclf prepare`` and ``carclf train`` both start here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from carclf.artifacts.prepare import PrepareDir
from carclf.config import Config
from carclf.data.merges import MergeMap, build_merge_map, identity, read_merges
from carclf.data.scan import TrainSet, scan_train
from carclf.errors import CarclfError


def prepare_dir(cfg: Config) -> Path:
    """Data-level artefacts (manifest, duplicate groups, folds) shared by every run on the same data
    (:class:`carclf.artifacts.prepare.PrepareDir`)."""
    return PrepareDir.for_data(cfg.out_dir, cfg.data.root).path


def run_prepare(cfg: Config, log: Callable[[str], None] = print):
    """The data-health step with the config's policies (incremental: unchanged files are not read again). One
    process at a time per prepare folder: others wait, then find the files unchanged."""
    from filelock import FileLock

    from carclf.data.prepare import prepare

    out = prepare_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    with FileLock(PrepareDir(out).lock):
        return prepare(
            cfg.data.root, out,
            near_threshold=None if cfg.data.near_threshold < 0 else cfg.data.near_threshold,
            within_class=cfg.data.within_class, cross_class=cfg.data.cross_class, max_pixels=cfg.data.max_pixels,
            log=log,
        )


@dataclass
class RunData:
    """Everything a fold needs to know about the data, computed once per ``train`` call."""

    trainset: TrainSet
    folds: np.ndarray
    merge: MergeMap
    folds_file: Path
    bad: dict[str, str] = field(default_factory=dict)  # path -> reason for photos left out of training
    outer: int = -1  # data.outer_fold: a fold no model of the run trains or validates on (nested CV)

    @property
    def classes(self) -> list[str]:
        """The model's classes (merged groups count once, dropped classes not at all)."""
        return self.merge.classes

    @property
    def labels(self) -> np.ndarray:
        """Model label per photo; -1 for a photo of a dropped class (none of which is usable)."""
        return self.merge.label_map[np.asarray(self.trainset.labels)]

    def usable(self) -> np.ndarray:
        return usable_mask(self.trainset, self.bad, self.labels)

    def split(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        good = self.usable() & (self.folds != self.outer)
        return np.where(good & (self.folds != k))[0], np.where(good & (self.folds == k))[0]

    def skipped_lines(self, listed_in: Path | str, limit: int = 10) -> list[str]:
        """What train prints about the photos it leaves out: a count, the first ``limit`` with their reasons, and how
        many more ``listed_in`` (skipped.csv) holds."""
        if not self.bad:
            return []
        lines = [f"leaving {len(self.bad)} photo(s) out of training (bad files, duplicates, label conflicts), "
                 f"listed in {listed_in}:"]
        lines += [f"  {p}: {reason}" for p, reason in list(self.bad.items())[:limit]]
        if len(self.bad) > limit:
            lines.append(f"  ... and {len(self.bad) - limit} more (all of them in {listed_in})")
        return lines


def usable_mask(trainset: TrainSet, bad: dict[str, str], labels: np.ndarray) -> np.ndarray:
    """True for the photos training may use: not quarantined, not a left-out copy or conflict, not of a dropped
    class."""
    return np.array([str(p) not in bad for p in trainset.paths], dtype=bool) & (labels >= 0)


def merge_map_for(cfg: Config, trainset: TrainSet) -> MergeMap:
    spec = cfg.data.merges
    if spec == "auto":
        auto = Path(cfg.data.root) / "merges.yaml"
        spec = str(auto) if auto.is_file() else ""
    if not spec:
        return identity(trainset.classes)
    counts = np.bincount(np.asarray(trainset.labels), minlength=len(trainset.classes))
    return build_merge_map(trainset.classes, read_merges(spec), cfg.data.merge_split, counts, source=spec)


def _drop_empty(cfg: Config, merge: MergeMap, photos: np.ndarray, log: Callable[[str], None]) -> MergeMap:
    """Apply ``data.empty_class`` to model classes with no usable photo at all (``photos``: usable photos per model
    class, counted as prepare counts them)."""
    empty = [c for c, n in zip(merge.classes, photos, strict=True) if n == 0]
    if not empty:
        return merge
    listed = ", ".join(f"'{c}'" for c in empty[:5]) + (" ..." if len(empty) > 5 else "")
    if cfg.data.empty_class == "error":
        raise CarclfError(
            f"{len(empty)} class(es) have no usable photo left (every file bad, a duplicate or a label conflict): "
            f"{listed}. See quarantine.csv in {prepare_dir(cfg)}; fix or add photos, merge the class with its twin "
            f"(merges.yaml), or pass data.empty_class=drop to train without it (its submission column then gets "
            f"data.dropped_class_prob={cfg.data.dropped_class_prob:g})."
        )
    log(f"warning: training without {len(empty)} class(es) that have no usable photo: {listed}; their submission "
        f"column(s) get probability {cfg.data.dropped_class_prob:g} (data.dropped_class_prob)")
    return merge.drop(empty, cfg.data.dropped_class_prob)


def load_run_data(cfg: Config, log: Callable[[str], None] = print) -> RunData:
    """Scan, prepare (bad files, duplicates), merge classes, drop empty ones and split into folds; writes only the
    prepare folder."""
    from carclf.data.prepare import usable_per_class
    from carclf.data.splits import check_fold_counts, load_or_make_folds

    trainset = scan_train(cfg.data.root)
    merge = merge_map_for(cfg, trainset)
    prepared = run_prepare(cfg, log)
    keys = ["train/" + r for r in trainset.relpaths()]
    bad = {
        str(p): prepared.excluded[key] for p, key in zip(trainset.paths, keys, strict=True) if key in prepared.excluded
    }
    groups = [prepared.group_of[key] for key in keys] if cfg.data.fold_policy == "group" else None

    def units_per_class(m: MergeMap, by_group: bool) -> np.ndarray:
        """What training can use per model class (prepare's count, through the merges): usable photos, or with
        ``by_group`` the duplicate groups that hold one (the units group K-fold deals out)."""
        labels = m.label_map[np.asarray(trainset.labels)]
        return usable_per_class(labels, usable_mask(trainset, bad, labels), len(m.classes),
                                groups if by_group else None)

    merge = _drop_empty(cfg, merge, units_per_class(merge, by_group=False), log)
    units = units_per_class(merge, by_group=groups is not None)
    check_fold_counts(merge.classes, np.repeat(np.arange(len(units)), units).tolist(), cfg.data.n_folds,
                      counted="usable photos" + (" (a photo and its copies count once)" if groups is not None else ""))
    labels = merge.label_map[np.asarray(trainset.labels)]
    folds, folds_file = load_or_make_folds(
        trainset, cfg.data.n_folds, cfg.data.fold_seed, prepare_dir(cfg), groups, labels.tolist(), merge.classes
    )
    return RunData(trainset, folds, merge, folds_file, bad, cfg.data.outer_fold)
