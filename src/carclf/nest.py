"""``carclf nest TEACHER``: the teacher's nested models, the honest targets of a distilled student.

Student fold k validates on fold k's photos, so the targets it learns from must come from models that never saw
them. The teacher's own out-of-fold rows do not qualify: fold j's rows came from the model trained on every other
fold, fold k among them. ``nest`` trains, for each fold k, the teacher's recipe again with fold k left out entirely
(``data.outer_fold=k``: a (K-1)-fold cross-validation over the other folds, which keep their numbers), into the
sibling run ``<teacher>-outer<k>``; its out-of-fold rows are student fold k's targets (``distill.targets=nested``).

* a run: K runs of K-1 models each (calibrated when the teacher is), resumed where they stopped;
* an ensemble: every member's nested runs (made or resumed as above), then per fold k the ensemble rebuilt on them
  with the ensemble's own selection settings, into ``<ensemble>-outer<k>``: its weights, TTA and calibration are
  chosen on rows of the other folds alone.

An entry point, not a step: it drives train, calibrate and ensemble, which never import one another.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from carclf.artifacts.ensemble import ENSEMBLE_FILE, member_run, read_ensemble
from carclf.artifacts.resolve import ENSEMBLE, RUN, kind_of, require
from carclf.artifacts.run import RunDir
from carclf.artifacts.teacher import nested_path
from carclf.data.splits import parse_folds
from carclf.errors import CarclfError

__all__ = ["nest"]


def _outers(spec: str, n_folds: int) -> list[int]:
    if "full" in str(spec).lower():
        raise CarclfError(f"--outer {spec}: the full-data fit has no validation fold to leave out; give fold numbers "
                          "or all")
    return parse_folds(spec, n_folds)


def nest_run(path: Path, outer: str = "all", overwrite: bool = False, log: Callable[[str], None] = print
             ) -> list[Path]:
    """The run's nested runs ``<run>-outer<k>``: its config with ``data.outer_fold=k``, every other fold trained
    (resumed where one stopped; ``overwrite``: trained again from scratch), calibrated when the run is."""
    from carclf.calibrate.temperature import calibrate_run
    from carclf.train.loop import train

    rd = RunDir.open(path)
    cfg = rd.read_config()
    if cfg.data.outer_fold >= 0:
        raise CarclfError(f"'{path}' is itself a nested run (data.outer_fold={cfg.data.outer_fold}): nest the "
                          "teacher it was made from")
    if cfg.distill.teacher:
        raise CarclfError(f"'{path}' is a distilled run: its nested runs would need its own teacher's nested models "
                          "for every pair of folds, which carclf does not make. Nest its teacher and distil from it")
    if cfg.data.n_folds < 3:
        raise CarclfError(f"'{path}' has data.n_folds={cfg.data.n_folds}: nested models need at least 3 folds (with "
                          "2, leaving one out leaves a single fold, to train on or to validate on but not both)")
    calibrated = any(rd.fold(k).calibration.is_file() for k in rd.completed_folds())
    made = []
    for k in _outers(outer, cfg.data.n_folds):
        n = nested_path(path, k)
        log(f"nest: '{n}': the recipe of '{path}' with fold {k} left out ({cfg.data.n_folds - 1} models)")
        cfg_k = replace(cfg, name=n.name, out_dir=str(n.parent), data=replace(cfg.data, outer_fold=k),
                        train=replace(cfg.train, folds="all"))
        _check_existing(n, path, cfg_k, k, overwrite)
        train(cfg_k, resume=not overwrite, overwrite=overwrite, log=log)
        if calibrated:
            calibrate_run(n, log=log)
        made.append(n)
    return made


def _check_existing(n: Path, teacher: Path, cfg_k, k: int, overwrite: bool) -> None:
    """A run already at ``n`` is resumed (or, ``overwrite``, trained again) only if it is fold k's nested run: an
    unrelated run of that name is never deleted, and one of an older recipe is named with the way out."""
    from carclf.train.teacher import nested_diffs

    rd = RunDir(n)
    if kind_of(n) != RUN or not rd.config_path.is_file():
        return  # nothing there (train makes it), or a folder train itself refuses
    there = rd.read_config()  # (a run interrupted before its first fold finished has no fold to open yet)
    if there.data.outer_fold != k:
        raise CarclfError(f"'{n}' is a run that is not the nested run of '{teacher}' for fold {k} (its "
                          f"data.outer_fold is {there.data.outer_fold}): carclf nest neither resumes nor deletes it; "
                          "move it away, then run carclf nest again")
    diffs = nested_diffs(cfg_k, there)
    if diffs and not overwrite:
        raise CarclfError(f"'{n}' was trained with other settings than '{teacher}' has now ({'; '.join(diffs[:3])}): "
                          f"train it again with carclf nest {shlex.quote(str(teacher))} --outer {k} --overwrite")


def nest_ensemble(path: Path, outer: str = "all", overwrite: bool = False, log: Callable[[str], None] = print
                  ) -> list[Path]:
    """The ensemble's nested ensembles ``<ensemble>-outer<k>``: every member's nested runs (made or resumed, never
    overwritten here), then the ensemble rebuilt on them with its own selection settings (CV parts, mode, seed,
    calibration candidates). One built on the current nested runs is kept; ``overwrite`` rebuilds it; without it,
    one built on other runs is refused by ``carclf ensemble``'s own check."""
    from carclf.ensemble.build import build_ensemble
    from carclf.ensemble.fit import CALIBRATIONS

    doc = read_ensemble(path)
    runs = [member_run(path, m) for m in doc["members"]]
    n_folds = RunDir.open(runs[0]).read_config().data.n_folds
    outers = _outers(outer, n_folds)
    for run in runs:
        nest_run(run, ",".join(map(str, outers)), overwrite=False, log=log)
    sel = doc.get("selection") or {}
    made = []
    for k in outers:
        specs = []
        for m, run in zip(doc["members"], runs, strict=True):
            folds = [f for f in m["folds"] if f != k]
            specs.append(f"{nested_path(run, k)}:{','.join(map(str, folds))}")
        out = nested_path(path, k)
        made.append(out)
        if not overwrite and _up_to_date(out, runs, k):
            log(f"nest: '{out}' is up to date (built on the current nested runs), skipping")
            continue
        log(f"nest: '{out}': the ensemble of '{path}' rebuilt on its members' fold-{k} nested runs")
        build_ensemble(specs, out, overwrite=overwrite, cv_folds=int(sel.get("cv_folds", 5)),
                       cv=sel.get("cv_mode", "grouped"), seed=int(sel.get("seed", 0)),
                       calibrations=tuple(sel.get("calibrations") or CALIBRATIONS), log=log)
    return made


def _up_to_date(out: Path, runs: list[Path], k: int) -> bool:
    """An earlier nested ensemble built on exactly the members' current nested runs (their checkpoints' SHA-256)."""
    if not (out / ENSEMBLE_FILE).is_file():
        return False
    members = read_ensemble(out)["members"]
    want = [nested_path(r, k).resolve() for r in runs]
    if [member_run(out, m).resolve() for m in members] != want:
        return False
    for m, n in zip(members, want, strict=True):
        fold_paths = RunDir.open(n).fold
        if {int(f): v for f, v in m["best_sha256"].items()} != {f: fold_paths(f).recorded_best_sha256()
                                                                 for f in m["folds"]}:
            return False
    return True


def nest(source: Path | str, outer: str = "all", overwrite: bool = False, log: Callable[[str], None] = print
         ) -> list[Path]:
    """``carclf nest``: the nested models of a run or an ensemble (see the module docstring)."""
    path = Path(source)
    if require(path, (RUN, ENSEMBLE), doing="nest") == RUN:
        return nest_run(path, outer, overwrite, log)
    return nest_ensemble(path, outer, overwrite, log)
