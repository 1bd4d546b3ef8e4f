"""The teacher of a distilled run (``distill.teacher``): its honest targets, checked, and its unlabeled photos.

Honesty, the rules this module enforces:

* a labeled training photo's target is the teacher's **out-of-fold** row for it (a k-fold run, or an ensemble of
  k-fold runs): predicted by the teacher model that did not train on that photo, never by a fold model on its own
  training photos (nearly one-hot, and a leak);
* the student's folds are the teacher's folds (refused otherwise, with the keys to set), so the photos a student fold
  validates on are the ones the teacher held out too, and their own teacher rows are never training targets;
* an unlabeled photo's target for student fold k comes from models that never saw fold k's photos (the nested
  teacher's, or with OOF targets the teacher's fold-k models); unlabeled photos only ever join training, never
  validation or the out-of-fold rows, and a byte-for-byte copy of a labeled photo is left out;
* ``distill.targets=nested`` (the default): student fold k's labeled targets are the out-of-fold rows of the
  teacher's nested models for fold k (``<teacher>-outer<k>``, trained with ``data.outer_fold=k``: no model behind
  them saw a photo of fold k, checked from their configs), so no target a student fold learns from was produced by a
  model that trained on the photos it validates on. ``distill.targets=oof`` uses the teacher's own OOF rows: those
  of fold j came from the model that trained on every other fold, fold k among them, so a little of what the
  teacher learnt from fold k reaches the student, and its OOF figure is optimistic (measured: benchmarks/RESULTS.md).
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from carclf.artifacts.ensemble import member_run, read_ensemble
from carclf.artifacts.oof import load_oof
from carclf.artifacts.prepare import PrepareDir
from carclf.artifacts.resolve import ENSEMBLE, EXPORT, RUN, kind_of, require
from carclf.artifacts.run import FULL, RunDir, fold_name
from carclf.artifacts.teacher import TeacherDir, nested_path, photo_sha1, teacher_checksum
from carclf.config import Config, config_diff
from carclf.data.manifest import read_manifest
from carclf.data.merges import MergeMap
from carclf.data.rundata import RunData, prepare_dir
from carclf.data.scan import IMAGE_EXTS, os_leftover, scan_test
from carclf.data.splits import parse_folds
from carclf.errors import CarclfError
from carclf.train.distill import DistillTargets

__all__ = ["Teacher", "fold_distill_targets", "load_teacher", "record_teacher", "to_student_classes",
           "unlabeled_photos"]


def _listed(names: list[str], n: int = 5) -> str:
    return ", ".join(f"'{c}'" for c in names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "")


def to_student_classes(probs: np.ndarray, columns: list[str], merge: MergeMap, source: str) -> np.ndarray:
    """Teacher probabilities over ``columns`` -> over the student's model classes. Columns that are the student's
    classes pass through; columns that are the student's original (pre-merge) classes are summed into its merged
    classes (a dropped class's mass is left out and the rows renormalised). Anything else is refused, by name."""
    if list(columns) == list(merge.classes):
        return np.asarray(probs, dtype=np.float64)
    if list(columns) == list(merge.original):
        out = np.zeros((len(probs), len(merge.classes)))
        keep = np.asarray(merge.label_map) >= 0
        np.add.at(out.T, np.asarray(merge.label_map)[keep], np.asarray(probs, dtype=np.float64).T[keep])
        total = out.sum(axis=1, keepdims=True)
        out[total[:, 0] <= 0] = 1.0  # all of a row's mass on dropped classes: the teacher says nothing (uniform)
        return out / np.where(total > 0, total, len(merge.classes))
    missing = [c for c in merge.classes if c not in columns]
    extra = [c for c in columns if c not in merge.classes and c not in merge.original]
    raise CarclfError(
        f"distill.teacher '{source}' predicts other classes than the student trains on: "
        + (f"missing from the teacher: {_listed(missing)}; " if missing else "")
        + (f"not in the student's data: {_listed(extra)}; " if extra else "")
        + ("the same names in another order or merged differently; " if not missing and not extra else "")
        + "distil on the data (and data.merges) the teacher was trained on"
    )


def _teacher_runs(path: Path, kind: str) -> list[tuple[str, RunDir]]:
    """The runs behind the teacher: the run itself, or every member of the ensemble (name, run)."""
    if kind == RUN:
        return [(str(path), RunDir.open(path))]
    return [(f"member {m['name']}", RunDir.open(member_run(path, m))) for m in read_ensemble(path)["members"]]


def _fold_hint(cfg: Config) -> str:
    d = cfg.data
    return f"data.n_folds={d.n_folds} data.fold_seed={d.fold_seed} data.fold_policy={d.fold_policy}"


def _check_merges(teacher: MergeMap, student: MergeMap, source: str) -> None:
    """A teacher that merged two classes the student keeps apart has no knowledge of how to tell them apart (its
    probability for them is a fixed share): refused, naming the pair."""
    if list(teacher.original) != list(student.original):
        return  # to_student_classes names the differing classes
    t_lab, s_lab = np.asarray(teacher.label_map), np.asarray(student.label_map)
    for m in np.unique(t_lab[t_lab >= 0]):
        members = np.where(t_lab == m)[0]
        if len(set(s_lab[members].tolist())) > 1:
            a, b = (student.original[i] for i in members[:2])
            raise CarclfError(
                f"{source} merges '{a}' and '{b}' (data.merges), which the student keeps apart: its "
                "probability for them is a fixed share, not knowledge. Train the student with the same data.merges, "
                "or leave that teacher out")


@dataclass
class Teacher:
    """The checked teacher: its targets over the student's classes and the unlabeled photos to predict."""

    path: Path
    kind: str  # run | ensemble
    checksum: str
    paths: np.ndarray  # relpaths of the training photos with a teacher row
    folds: np.ndarray  # the fold each row was held out in
    probs: np.ndarray  # (n, classes) calibrated teacher probabilities
    unlabeled: list[Path] = field(default_factory=list)
    unlabeled_sha1: list[str] = field(default_factory=list)  # as at the start: a resume trains on these photos
    skipped: dict[str, str] = field(default_factory=dict)  # unlabeled photos left out, with the reason
    info: dict = field(default_factory=dict)  # run.json's ``distill`` entry
    nested: dict[int, tuple[Path, str]] = field(default_factory=dict)  # fold -> nested teacher and its checksum
    pending: dict[int, tuple] = field(default_factory=dict)  # fold -> (paths, folds, probs) record_teacher writes


def _check_folds(oof_paths: np.ndarray, oof_folds: np.ndarray, data: RunData, who: str, hint: str) -> None:
    """Every teacher row's fold is the student's fold of that photo (``who``: the teacher, or its member)."""
    student = dict(zip(data.trainset.relpaths(), data.folds.tolist(), strict=True))
    wrong = [(p, int(f), student[p]) for p, f in zip(oof_paths, oof_folds, strict=True)
             if p in student and student[p] != int(f)]
    if wrong:
        p, tf, sf = wrong[0]
        raise CarclfError(
            f"{who}: the student's folds differ from the teacher's ({len(wrong)} photos are in "
            f"another fold, e.g. '{p}': teacher fold {tf}, student fold {sf}). A student fold must validate on the "
            f"photos the teacher held out: train on the teacher's data with {hint}"
        )


def _split_of(t_rd: RunDir, paths: np.ndarray, folds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A teacher run's fold of every photo it was split over (its ``folds.csv``: also the photos of folds it has no
    rows of yet), else of its OOF rows."""
    split = t_rd.read_folds()
    if not split:
        return paths, folds
    return np.array(list(split), dtype=object), np.array(list(split.values()))


def _incomplete(oof_folds: np.ndarray, data: RunData, cfg: Config, source: str, outer: int = -1) -> list[int]:
    """The student folds with no teacher row (but ``outer``, a nested teacher's left-out fold); refused (naming the
    folds and the photos that would fall back) unless ``distill.allow_partial``."""
    have = {int(f) for f in np.unique(oof_folds)}
    if outer in have:
        raise CarclfError(f"distill.teacher '{source}' has out-of-fold rows of fold {outer}, the fold it should have "
                          f"left out: remake it (carclf nest ... --outer {outer} --overwrite)")
    missing = [k for k in range(cfg.data.n_folds) if k not in have and k != outer]
    if missing and not cfg.distill.allow_partial:
        n = int(np.isin(data.folds[data.usable()], missing).sum())
        raise CarclfError(
            f"distill.teacher '{source}' has no out-of-fold rows for fold(s) {', '.join(map(str, missing))} (not "
            f"trained or not finished): {n} training photos would fall back to their hard labels. Finish the "
            + ("teacher's nested models (run carclf nest again)" if outer >= 0 else
               "teacher (carclf train ... train.folds=all --resume)") + ", or pass distill.allow_partial=true"
        )
    return missing


def _fresh_targets(cfg: Config, data: RunData, path: Path, kind: str,
                   rd: RunDir, outer: int = -1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The teacher's OOF rows for the student's photos, checked: every run behind it (an ensemble's every member)
    split as the student is and merges no class the student keeps apart, is not the student itself, and the teacher
    has rows for every fold (or ``distill.allow_partial``)."""
    from carclf.artifacts.oof import load_run_oof

    source = str(path)
    oof = load_oof(path)
    for name, t_rd in _teacher_runs(path, kind):
        who = f"distill.teacher '{source}'" + (f" ({name})" if kind != RUN else "")
        if t_rd.path.resolve() == rd.path.resolve():
            raise CarclfError(f"{who} is this run itself ('{rd.path}'), which training would replace: name another "
                              "run, or an ensemble without it")
        t_cfg = t_rd.read_config()
        if t_cfg.data.n_folds != cfg.data.n_folds:
            raise CarclfError(f"{who} was cross-validated in {t_cfg.data.n_folds} folds, the student in "
                              f"{cfg.data.n_folds}: train the student with {_fold_hint(t_cfg)}")
        _check_merges(t_rd.merge_map(), data.merge, who)
        rows = oof if kind == RUN else load_run_oof(t_rd.path)
        _check_folds(*_split_of(t_rd, rows.paths, rows.folds), data, who, _fold_hint(t_cfg))
    probs = to_student_classes(oof.probs, oof.classes, data.merge, source)
    _incomplete(oof.folds, data, cfg, source, outer)
    return oof.paths.astype(str), oof.folds.astype(np.int64), probs


# Keys a teacher's nested run may set otherwise than the teacher (carclf nest changes the first four).
NESTED_KEYS = {("name",), ("out_dir",), ("data", "outer_fold"), ("train", "folds"), ("train", "device"),
               ("train", "threads"), ("predict", "batch_size")}


def nested_diffs(teacher: Config, nested: Config) -> list[str]:
    """The settings a nested run has otherwise than its teacher, beyond what ``carclf nest`` sets (NESTED_KEYS), as
    ``key: teacher's -> nested run's`` lines."""
    return config_diff(teacher.to_dict(), nested.to_dict(), NESTED_KEYS)


def _nested_teacher(path: Path, kind: str, k: int, cfg: Config) -> Path:
    """The teacher's nested models for student fold k (``<teacher>-outer<k>``), checked: the same kind, every run
    behind it trained with ``data.outer_fold=k`` (so no model behind the fold's targets saw a photo of fold k), and
    made from the teacher (a run: the same settings; an ensemble: its members' nested runs)."""
    if cfg.data.n_folds < 3:
        raise CarclfError(f"distill.targets=nested needs data.n_folds >= 3 (nested models leave a fold out and "
                          f"cross-validate on the rest); with {cfg.data.n_folds}, set distill.targets=oof")
    n = nested_path(path, k)
    remake = f"carclf nest {shlex.quote(str(path))} --outer {k}"
    if not n.exists():
        raise CarclfError(
            f"distill.targets=nested: student {fold_name(k)} learns from the teacher's models that never saw fold "
            f"{k}, '{n}', which does not exist. Make them with `{remake}` ({cfg.data.n_folds - 1} models trained "
            "without fold k; without --outer, for every fold), or set distill.targets=oof (no extra models, but the "
            "student's out-of-fold figure is then optimistic)")
    got = kind_of(n)
    if got != kind:
        raise CarclfError(f"'{n}' is {f'an {got}' if got else 'not a carclf run or ensemble'}, not the nested {kind} "
                          f"of distill.teacher '{path}': move it away and run `{remake}`")
    configs = [(n_rd, n_rd.read_config()) for _, n_rd in _teacher_runs(n, kind)]
    for n_rd, n_cfg in configs:
        if n_cfg.data.outer_fold != k:
            raise CarclfError(f"'{n_rd.path}' was trained with data.outer_fold={n_cfg.data.outer_fold}, not {k}: it "
                              f"is not a nested run for fold {k}; move it away and run `{remake}`")
    if kind == RUN:
        diffs = nested_diffs(RunDir.open(path).read_config(), configs[0][1])
        if diffs:
            raise CarclfError(f"'{n}' was trained with other settings than distill.teacher '{path}' ("
                              f"{'; '.join(diffs[:3])}): remake it with `{remake} --overwrite`")
    else:
        want = [nested_path(member_run(path, m), k).resolve() for m in read_ensemble(path)["members"]]
        have = [member_run(n, m).resolve() for m in read_ensemble(n)["members"]]
        if want != have:
            raise CarclfError(f"'{n}' is not made of the nested runs of distill.teacher '{path}''s members "
                              f"({', '.join(map(str, want))}): rebuild it with `{remake} --overwrite`")
    return n


def _nested_targets(cfg: Config, data: RunData, path: Path, kind: str, rd: RunDir, td: TeacherDir,
                    teacher: Teacher, resume: bool) -> None:
    """distill.targets=nested: check the nested teacher of every student fold this call trains; its targets are
    computed now (``teacher.pending``, written by :func:`record_teacher`), or, for a fold that has trained an epoch,
    its checksum must be the one the fold started with."""
    for k in parse_folds(cfg.train.folds, cfg.data.n_folds, cfg.data.outer_fold):
        if k == FULL or (resume and rd.fold(k).complete):  # (a complete fold trains no more)
            continue  # the full-data fit has no validation photos: it learns from the teacher's OOF rows
        n = _nested_teacher(path, kind, k, cfg)
        teacher.nested[k] = (n, teacher_checksum(n))
        if resume and _started(rd, k):  # it keeps the targets it started with
            if not td.fold_targets(k).is_file():
                raise CarclfError(f"{fold_name(k)} of '{rd.path}' has started, but '{td.fold_targets(k)}', the "
                                  "targets it trains on, is gone: start a new run name")
            _resumed_fold(td, k, teacher.nested[k][1], n, rd, data.classes)
        else:
            teacher.pending[k] = _fresh_targets(cfg, data, n, kind, rd, outer=k)


def _started(rd: RunDir, k: int) -> bool:
    """Fold k has trained at least one epoch (its targets are then fixed; before, a remade teacher replaces them)."""
    return rd.fold(k).last.is_file() or rd.fold(k).complete


def _check_saved(saved: dict, file: Path, checksum: str, who: str, since: str, classes: list[str]) -> dict:
    """Targets read back from ``file``, refused when ``who`` (the teacher) changed since ``since`` started (its
    checksum) or the run's classes differ."""
    if saved["checksum"] != checksum:
        raise CarclfError(
            f"{who} changed since {since} started (its checksum was {saved['checksum'][:12]}, now {checksum[:12]}: "
            "retrained, recalibrated or rebuilt): resume needs the teacher it started with; put it back, or start a "
            "new run name")
    if saved["classes"] != list(classes):
        raise CarclfError(f"'{file}' holds other classes than the run: start a new run name")
    return saved


def _resumed_fold(td: TeacherDir, k: int, checksum: str, n: Path, rd: RunDir, classes: list[str]) -> dict:
    """Fold k's nested targets as the fold started with them."""
    return _check_saved(td.read_fold_targets(k), td.fold_targets(k), checksum, f"the nested teacher '{n}'",
                        f"{fold_name(k)} of '{rd.path}'", classes)


def _resumed_targets(td: TeacherDir, checksum: str, path: Path, rd: RunDir, classes: list[str]) -> dict:
    """The targets a run started with, refused when the teacher changed since (its checksum)."""
    return _check_saved(td.read_targets(), td.targets, checksum, f"distill.teacher '{path}'", f"'{rd.path}'",
                        classes)


def load_teacher(cfg: Config, data: RunData, rd: RunDir, log: Callable[[str], None] = print,
                 resume: bool = False) -> Teacher | None:
    """The run's teacher (None without ``distill.teacher``), checked before the run directory is made or touched
    (bad input leaves nothing behind). The first start computes its targets and lists the unlabeled photos
    (:func:`record_teacher` fixes both in ``teacher/targets.npz``); a resume checks that the teacher is unchanged
    (its checksum) and reads them back, so the resumed run trains on exactly the same targets and photos (photos
    added to the unlabeled folder since are not used)."""
    d = cfg.distill
    if not d.teacher:
        return None
    path = Path(d.teacher)
    if kind_of(path) == EXPORT:
        raise CarclfError(f"distill.teacher '{path}' is an export: it has no out-of-fold rows to learn from; give the "
                          "run or the ensemble it was exported from")
    kind = require(path, (RUN, ENSEMBLE), doing="train distill.teacher=")
    checksum = teacher_checksum(path)
    td = TeacherDir(rd.path)
    if resume and td.targets.is_file():  # (--overwrite: the old run's targets are about to go)
        saved = _resumed_targets(td, checksum, path, rd, data.classes)
        teacher = Teacher(path, kind, checksum, saved["paths"], saved["folds"], saved["probs"],
                          [Path(p) for p in saved["unlabeled"]], saved["unlabeled_sha1"], td.read_skipped())
    else:
        paths, folds, probs = _fresh_targets(cfg, data, path, kind, rd)
        if kind == RUN and not any(RunDir(path).fold(k).calibration.is_file() for k in RunDir(path).completed_folds()):
            log(f"warning: distill.teacher '{path}' is not calibrated (temperature 1): its targets are as over- or "
                f"under-confident as its raw softmax; run carclf calibrate {path} first, or distil from an ensemble")
        teacher = Teacher(path, kind, checksum, paths, folds, np.asarray(probs, dtype=np.float32))
        if d.unlabeled:
            teacher.unlabeled, teacher.unlabeled_sha1, teacher.skipped = unlabeled_photos(cfg, data, log)
    if d.targets == "nested":
        _nested_targets(cfg, data, path, kind, rd, td, teacher, resume)
    usable = np.array(data.trainset.relpaths(), dtype=object)[data.usable()]
    with_row = int(np.isin(usable, teacher.paths).sum())
    teacher.info = {
        "teacher": str(path), "teacher_abs": str(path.resolve()), "kind": kind, "checksum": checksum,
        "alpha": d.alpha, "temperature": d.temperature, "unlabeled": d.unlabeled,
        "unlabeled_weight": d.unlabeled_weight, "min_confidence": d.min_confidence,
        "photos_with_target": with_row, "photos_hard_only": int(len(usable) - with_row),
        "unlabeled_photos": len(teacher.unlabeled), "unlabeled_left_out_at_start": len(teacher.skipped),
        "targets": d.targets,
        "nested": {str(k): {"teacher": str(n), "teacher_abs": str(n.resolve()), "checksum": c}
                   for k, (n, c) in teacher.nested.items()},
        # oof: the teacher models behind fold j's targets trained on fold k, the student's validation (README)
        "oof_optimistic": d.targets == "oof",
    }
    if d.targets == "oof":
        log("note: distill.targets=oof: the run's out-of-fold figures are optimistic: the teacher models behind its "
            "targets trained on its validation photos (on cars196 by 0.2 log loss, benchmarks/RESULTS.md); judge it "
            "on photos no teacher model saw, or distil from nested models (distill.targets=nested, carclf nest)")
    log(f"distill: teacher {kind} '{path}' (alpha {d.alpha:g}, T {d.temperature:g}, {d.targets} targets): {with_row} "
        f"of {len(usable)} training photos have an out-of-fold target"
        + (f", {len(usable) - with_row} train on the hard label alone" if with_row < len(usable) else "")
        + (f"; {len(teacher.unlabeled)} unlabeled photos ({d.unlabeled})" if d.unlabeled else ""))
    return teacher


def record_teacher(teacher: Teacher | None, rd: RunDir, classes: list[str]) -> None:
    """With the run lock held: write ``teacher/targets.npz`` on the first start, or check that the one there (a
    process that started the run at the same time) comes from the same teacher; and list the unlabeled photos left
    out."""
    if teacher is None:
        return
    td = TeacherDir(rd.path)
    if td.targets.is_file():
        _resumed_targets(td, teacher.checksum, teacher.path, rd, classes)
    else:
        td.write_targets(teacher.checksum, classes, teacher.paths, teacher.folds, teacher.probs,
                         [str(p) for p in teacher.unlabeled], teacher.unlabeled_sha1)
    if teacher.skipped:
        td.write_skipped(teacher.skipped)
    for k, (paths, folds, probs) in teacher.pending.items():
        n, checksum = teacher.nested[k]
        if td.fold_targets(k).is_file() and _started(rd, k):  # another process started fold k meanwhile
            _resumed_fold(td, k, checksum, n, rd, classes)
        else:
            td.write_fold_targets(k, checksum, str(n), classes, paths, folds, probs)
    teacher.pending.clear()


def _folder_photos(folder: Path) -> list[Path]:
    """Photos under ``folder`` (recursively), OS and zip leftovers (``__MACOSX``, ``._x.jpg``) left out."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not os_leftover(d))
        out += [Path(root) / f for f in sorted(files)
                if Path(f).suffix.lower() in IMAGE_EXTS and not os_leftover(f)]
    return out


def _listed_photos(cfg: Config) -> list[Path]:
    spec = cfg.distill.unlabeled
    if spec == "test":
        try:
            photos = list(scan_test(cfg.data.root).paths)
        except CarclfError as exc:
            raise CarclfError(f"distill.unlabeled=test: {exc}") from None
    else:
        folder = Path(spec)
        if not folder.is_dir():
            raise CarclfError(f"distill.unlabeled='{spec}' is neither 'test' nor a folder of photos")
        photos = _folder_photos(folder)
    if not photos:
        raise CarclfError(f"distill.unlabeled='{spec}' holds no photos ({', '.join(sorted(IMAGE_EXTS))})")
    return photos


def unlabeled_photos(cfg: Config, data: RunData, log: Callable[[str], None] = print
                     ) -> tuple[list[Path], list[str], dict[str, str]]:
    """``distill.unlabeled``: the data's test photos (``test``) or a folder's, with each one's SHA-1; byte copies
    of a labeled photo are left out (they would carry a validation photo into training), listed with the reason."""
    photos = _listed_photos(cfg)
    labeled = {r["sha1"] for r in read_manifest(PrepareDir(prepare_dir(cfg)).manifest)
               if r.get("sha1") and r.get("split") == "train"}
    if not labeled:  # no manifest of this version: hash the labeled photos here
        labeled = {photo_sha1(p) for p in data.trainset.paths}
    keep, sha1, skipped = [], [], {}
    for p in photos:
        sha = photo_sha1(p)
        if not sha:
            skipped[str(p)] = "unreadable file"
        elif sha in labeled:
            skipped[str(p)] = "a copy of a labeled training photo"
        else:
            keep.append(p)
            sha1.append(sha)
    if not keep:
        copies = sum(why.startswith("a copy") for why in skipped.values())
        raise CarclfError(f"distill.unlabeled='{cfg.distill.unlabeled}': none of its {len(photos)} photos is usable "
                          f"({copies} are copies of labeled training photos, {len(photos) - copies} unreadable)")
    for line in _skipped_lines(skipped):
        log(line)
    return keep, sha1, skipped


def _skipped_lines(skipped: dict[str, str], limit: int = 5) -> list[str]:
    if not skipped:
        return []
    lines = [f"distill: leaving {len(skipped)} unlabeled photo(s) out:"]
    lines += [f"  {p}: {why}" for p, why in list(skipped.items())[:limit]]
    if len(skipped) > limit:
        lines.append(f"  ... and {len(skipped) - limit} more (all in teacher/unlabeled-skipped.csv)")
    return lines


def _check_unchanged(teacher: Teacher) -> list[str]:
    """The unlabeled photos' SHA-1 now, refused when one changed or is gone since the run started."""
    now = [photo_sha1(p) for p in teacher.unlabeled]
    for p, was, sha in zip(teacher.unlabeled, teacher.unlabeled_sha1, now, strict=True):
        if sha != was:
            raise CarclfError(f"unlabeled photo '{p}' {'is gone' if not sha else 'changed'} since the run started: "
                              "put it back, or start a new run name")
    return now


def unlabeled_targets(teacher: Teacher, cfg: Config, rd: RunDir, k: int, data: RunData,
                      log: Callable[[str], None] = print) -> tuple[list[Path], np.ndarray]:
    """Student fold k's unlabeled photos and their teacher probabilities (student classes), predicted by models
    that never saw fold k (:func:`_predict_unlabeled`), cached in ``teacher/unlabeled-fold<k>.npz`` by their
    checksum and photo SHA-1: a resumed fold predicts nothing again. Photos that fail to decode are left
    out and listed; ``distill.min_confidence`` leaves out the uncertain ones."""
    td = TeacherDir(rd.path)
    photos, sha = teacher.unlabeled, _check_unchanged(teacher)
    checksum = teacher.nested[k][1] if k in teacher.nested else teacher.checksum  # whose predictions they are
    cached = td.read_unlabeled(k, checksum)
    known = {} if cached is None else {s: i for i, s in enumerate(cached["sha1"])}
    todo = [i for i, s in enumerate(sha) if s not in known]
    probs = np.zeros((len(photos), len(data.classes)), dtype=np.float32)
    ok = np.ones(len(photos), dtype=bool)
    for i, s in enumerate(sha):
        if s in known:
            probs[i], ok[i] = cached["probs"][known[s]], cached["ok"][known[s]]
    if todo:
        who = (f"the nested teacher '{teacher.nested[k][0]}' predicts" if k in teacher.nested
               else f"the teacher's {fold_name(k)} models predict")
        log(f"distill: {who} {len(todo)} unlabeled photos")
        p, ok_todo, columns = _predict_unlabeled(teacher, cfg, k, [photos[i] for i in todo])
        p = to_student_classes(np.nan_to_num(p, nan=1.0), columns, data.merge, str(teacher.path))
        probs[todo], ok[todo] = p, ok_todo
        td.write_unlabeled(k, checksum, [str(x) for x in photos], sha, probs, ok)
    newly = {str(photos[i]): "failed to decode" for i in np.where(~ok)[0] if str(photos[i]) not in teacher.skipped}
    if newly:
        teacher.skipped.update(newly)
        td.write_skipped(teacher.skipped)
        for line in _skipped_lines(newly):
            log(line)
    confident = probs.max(axis=1) >= cfg.distill.min_confidence
    if cfg.distill.min_confidence and (ok & ~confident).any():
        log(f"distill: {int((ok & ~confident).sum())} unlabeled photos below distill.min_confidence="
            f"{cfg.distill.min_confidence:g} left out of {fold_name(k)}")
    keep = ok & confident
    return [photos[i] for i in np.where(keep)[0]], probs[keep]


def _predict_unlabeled(teacher: Teacher, cfg: Config, k: int, photos: list[Path]
                       ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Models that never saw student fold k's photos predict ``photos``: with nested targets, every model of the
    nested teacher ``<teacher>-outer<k>`` (whose temperatures, weights and calibration were fitted without fold k
    too); with OOF targets, the teacher's fold-k models (their calibration was fitted on fold k: a scalar or two);
    for the full-data fit, every cross-validated fold (never the teacher's own full-data fit, which its checksum
    does not cover). Returns probabilities (NaN rows for photos that failed to decode), ok flags, columns. The
    models are freed afterwards (on a GPU their memory goes back before the student's first epoch)."""
    from carclf.infer.predictor import Predictor

    if k in teacher.nested:  # every model of the nested teacher: trained, calibrated and combined without fold k
        predictor = Predictor.open(teacher.nested[k][0], device=cfg.train.device)
    else:
        folds = {int(f) for f in np.unique(teacher.folds)} if k == FULL else {k}
        predictor = (Predictor.from_run(teacher.path, device=cfg.train.device, folds=sorted(folds))
                     if teacher.kind == RUN else
                     Predictor.from_ensemble(teacher.path, device=cfg.train.device).only_folds(folds))
    probs, bad = predictor.predict(photos, progress=True, fill_bad=False)
    ok = np.ones(len(photos), dtype=bool)
    ok[bad] = False
    columns, device = list(predictor.output_classes), predictor.device
    del predictor
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()
    return probs, ok, columns


def fold_distill_targets(teacher: Teacher, cfg: Config, rd: RunDir, k: int, data: RunData, tr_idx: np.ndarray,
                         log: Callable[[str], None] = print) -> tuple[DistillTargets, list[Path]]:
    """Fold k's distillation targets: per training photo its teacher row (held out in another fold than k: the
    honesty rule, checked again here), then the unlabeled photos (:func:`unlabeled_targets`); none for a fold the
    teacher has no model of (``distill.allow_partial``)."""
    rel = np.array(data.trainset.relpaths(), dtype=object)[tr_idx]
    if cfg.distill.targets == "nested" and k != FULL and k not in teacher.nested:
        raise CarclfError(f"{fold_name(k)} has no nested targets (it looked complete when this call started): run "
                          "the same command again with --resume")
    if k in teacher.nested:  # distill.targets=nested: the rows of the models that never saw fold k
        saved = TeacherDir(rd.path).read_fold_targets(k)
        t_paths, t_folds, t_probs, source = saved["paths"], saved["folds"], saved["probs"], saved["source"]
    else:
        t_paths, t_folds, t_probs, source = teacher.paths, teacher.folds, teacher.probs, str(teacher.path)
    index = {p: i for i, p in enumerate(t_paths)}
    at = np.array([index.get(p, -1) for p in rel], dtype=np.int64)
    has = at >= 0
    if k != FULL and (t_folds[at[has]] == k).any():
        raise CarclfError(f"{fold_name(k)}: a teacher row held out in fold {k} is a training target of fold {k}: "
                          "the student's folds differ from the teacher's; start a new run name")
    probs = np.zeros((len(rel), t_probs.shape[1]), dtype=np.float64)
    probs[has] = t_probs[at[has]]
    unlabeled, unl_probs = [], np.zeros((0, probs.shape[1]))
    if teacher.unlabeled and (k == FULL or k in teacher.nested or k in set(teacher.folds.tolist())):
        unlabeled, unl_probs = unlabeled_targets(teacher, cfg, rd, k, data, log)
    elif teacher.unlabeled:
        log(f"distill {fold_name(k)}: the teacher has no {fold_name(k)} model (distill.allow_partial): no unlabeled "
            "photos in this fold")
    d = cfg.distill
    log(f"distill {fold_name(k)}: {int(has.sum())} photos learn from '{source}', {int((~has).sum())} from their "
        f"label alone, {len(unlabeled)} unlabeled photos from the teacher alone")
    targets = DistillTargets.build(data.labels[tr_idx], probs, has, np.asarray(unl_probs, dtype=np.float64), d.alpha,
                                   d.temperature, d.unlabeled_weight == "confidence")
    return targets, unlabeled
