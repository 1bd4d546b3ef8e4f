"""Ensemble members: a run (every completed fold) or some of its folds (``runs/a:0,2``), their out-of-fold logits per
TTA view, aligned across members by photo path."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from carclf.artifacts.oof import read_fold_oof
from carclf.artifacts.run import RunDir
from carclf.data.merges import MergeMap
from carclf.errors import CarclfError
from carclf.io import file_sha256
from carclf.tta import POLICIES, parse_policy, policy_views

# The TTA policies the ensemble step tries, cheapest first; each is measured wherever a member's stored views allow.
POLICY_CANDIDATES = ("none", "hflip", "multiscale", "hflip+multiscale", "fivecrop", "hflip+fivecrop")
_FOLDS_SUFFIX = re.compile(r"^(?P<run>.+):(?P<folds>\d+(?:,\d+)*)$")


def policy_name(views: list[str]) -> str:
    """The name of a view list: one of POLICY_CANDIDATES when it is one, else the comma-joined views."""
    for name in (*POLICY_CANDIDATES, *POLICIES):
        if parse_policy(name) == list(views):
            return name
    return ",".join(views)


@dataclass
class MemberSpec:
    text: str  # as the user wrote it
    run: Path
    folds: list[int] | None  # None: every completed fold


def parse_member(text: str) -> MemberSpec:
    """``runs/a`` (all completed folds) or ``runs/a:0,2`` (folds 0 and 2)."""
    m = _FOLDS_SUFFIX.match(text)
    if m and not Path(text).exists():
        return MemberSpec(text, Path(m["run"]), sorted({int(k) for k in m["folds"].split(",")}))
    return MemberSpec(text, Path(text), None)


@dataclass
class Member:
    """One member's out-of-fold rows (in its own order) and everything needed to rebuild it at prediction time."""

    name: str
    spec: MemberSpec
    run: RunDir
    folds: list[int]
    classes: list[str]  # the model's classes
    merge: MergeMap
    paths: np.ndarray  # (n,) photo path relative to the data root
    labels: np.ndarray  # (n,) model-class label
    original_labels: np.ndarray  # (n,) submission-class label
    row_folds: np.ndarray  # (n,) the fold that validated each photo
    views: list[str]  # views with stored logits ([] for runs trained before views were kept)
    view_logits: np.ndarray | None  # (views, n, classes) float32
    run_views: list[str]  # the run's own TTA policy (what its `logits` average)
    run_logits: np.ndarray  # (n, classes) float32, averaged over run_views
    features: np.ndarray | None
    checksums: dict[int, str] = field(default_factory=dict)  # fold -> sha256 of best.pt
    eval_sizes: dict[int, int] = field(default_factory=dict)  # fold -> input height it predicts at (0: training)

    def policies(self) -> dict[str, list[str]]:
        """Policy name -> views, for every policy the stored views allow (the run's own policy always)."""
        out = {}
        if self.view_logits is not None:
            have = set(self.views)
            for name in POLICY_CANDIDATES:
                views = parse_policy(name)
                if set(views) <= have:
                    out[name] = views
        out.setdefault(policy_name(self.run_views), self.run_views)
        return dict(sorted(out.items(), key=lambda kv: len(kv[1])))

    def policy_logits(self, views: list[str]) -> np.ndarray:
        """(n, classes) float32 logits averaged over ``views`` (in logit space, as the Predictor's engines do)."""
        if list(views) == list(self.run_views):
            return self.run_logits
        if self.view_logits is None:
            raise CarclfError(f"member {self.name}: no per-view logits stored, only the run's policy "
                              f"{','.join(self.run_views)}")
        idx = [self.views.index(v) for v in views]
        return self.view_logits[idx].mean(axis=0, dtype=np.float32)


def load_member(spec: MemberSpec, name: str, log: Callable[[str], None] = print) -> Member:
    if not spec.run.exists():
        raise CarclfError(f"ensemble member '{spec.text}': '{spec.run}' does not exist (give a run directory, "
                          "optionally with :FOLDS, e.g. runs/lite0:0,2)")
    rd = RunDir.open(spec.run)
    cfg = rd.read_config()
    meta = rd.read_meta()
    classes = meta["classes"]
    merge = rd.merge_map(meta)
    completed = rd.completed_folds()
    wanted = completed if spec.folds is None else spec.folds
    unfinished = [k for k in wanted if k not in completed]
    if spec.folds is None and rd.incomplete_folds():
        unfinished = rd.incomplete_folds()
    if unfinished:
        log(f"member {name}: fold(s) {', '.join(map(str, unfinished))} of '{rd.path}' not complete (no oof.npz or "
            f"best.pt): using the finished fold(s) {', '.join(str(k) for k in wanted if k in completed) or '-'}")
    folds = [k for k in wanted if k in completed]
    if not folds:
        raise CarclfError(f"ensemble member '{spec.text}': none of its folds {wanted} is complete in '{rd.path}': "
                          f"completed folds are {completed or 'none'}")
    parts: dict[str, list] = {k: [] for k in ("paths", "labels", "orig", "fold", "run", "views", "feat")}
    view_sets = []
    no_views = []
    for k in folds:
        z = read_fold_oof(rd.fold(k), ("paths", "labels", "original_labels", "logits"))
        parts["paths"].append(z["paths"].astype(str))
        parts["labels"].append(z["labels"])
        parts["orig"].append(z["original_labels"])
        parts["fold"].append(np.full(len(z["labels"]), k))
        parts["run"].append(z["logits"].astype(np.float32))
        if "view_logits" in z and "views" in z:
            views = [str(v) for v in z["views"]]
            view_sets.append(views)
            parts["views"].append((views, z["view_logits"]))
        else:
            no_views.append(k)
        parts["feat"].append(z["features"].astype(np.float32) if "features" in z else None)
    run_views = policy_views(cfg.predict)
    views: list[str] = []
    view_logits = None
    if no_views:
        log(f"member {name}: fold(s) {', '.join(map(str, no_views))} have no per-view out-of-fold logits (trained "
            f"before carclf kept them): its TTA stays the run's own policy ({','.join(run_views)})")
    else:
        views = [v for v in view_sets[0] if all(v in s for s in view_sets[1:])]
        view_logits = np.concatenate([vl[[vs.index(v) for v in views]].astype(np.float32)
                                      for vs, vl in parts["views"]], axis=1)
    paths = np.concatenate(parts["paths"])
    if len(set(paths.tolist())) != len(paths):
        raise CarclfError(f"ensemble member '{spec.text}': a photo appears in two folds' oof.npz of '{rd.path}': "
                          "the folds come from different splits; retrain the run")
    feats = None if any(f is None for f in parts["feat"]) else np.concatenate(parts["feat"])
    return Member(
        name=name, spec=spec, run=rd, folds=folds, classes=classes, merge=merge, paths=paths,
        labels=np.concatenate(parts["labels"]), original_labels=np.concatenate(parts["orig"]),
        row_folds=np.concatenate(parts["fold"]), views=views, view_logits=view_logits, run_views=run_views,
        run_logits=np.concatenate(parts["run"]), features=feats,
        checksums={k: file_sha256(rd.fold(k).best) for k in folds}, eval_sizes={k: rd.eval_size(k) for k in folds},
    )


def member_names(specs: list[MemberSpec]) -> list[str]:
    """Short unique names: the run folder's name, with the folds when given (``lite0:0,2``)."""
    names = []
    for s in specs:
        base = s.run.name + (f":{','.join(map(str, s.folds))}" if s.folds is not None else "")
        name, i = base, 2
        while name in names:
            name, i = f"{base}#{i}", i + 1
        names.append(name)
    return names


def check_classes(members: list[Member]) -> list[str]:
    """The submission's classes, shared by every member; refuse members whose original class lists differ."""
    first = members[0]
    for m in members[1:]:
        if m.merge.original != first.merge.original:
            a, b = set(first.merge.original), set(m.merge.original)
            only_a, only_b = sorted(a - b), sorted(b - a)
            if not only_a and not only_b:
                detail = "the same names in another order"
            else:
                detail = (f"only in {first.name}: {', '.join(only_a[:5]) or '-'}{' ...' if len(only_a) > 5 else ''}; "
                          f"only in {m.name}: {', '.join(only_b[:5]) or '-'}{' ...' if len(only_b) > 5 else ''}")
            raise CarclfError(
                f"members {first.name} and {m.name} were trained on different class folders ({detail}): their "
                "predictions cannot share the submission's columns. Ensemble runs trained on the same data.")
    return list(first.merge.original)


@dataclass
class Aligned:
    """The photos every member saw: member i's row for aligned photo j is ``index[i][j]``."""

    paths: np.ndarray
    labels: np.ndarray  # submission-class label
    folds: np.ndarray  # the first member's fold of each photo (CV groups)
    index: list[np.ndarray]
    notes: list[str]


def align(members: list[Member]) -> Aligned:
    """Align the members' out-of-fold rows by photo path (never by position)."""
    common = set(members[0].paths.tolist())
    for m in members[1:]:
        common &= set(m.paths.tolist())
    if not common:
        raise CarclfError(
            "the members share no out-of-fold photo: single folds of one run validate different photos, and runs "
            "on different data share none. Give whole runs (or the same folds of runs with the same split).")
    paths = np.array(sorted(common))
    index = []
    for m in members:
        pos = {p: i for i, p in enumerate(m.paths.tolist())}
        index.append(np.array([pos[p] for p in paths], dtype=np.int64))
    labels = members[0].original_labels[index[0]]
    for m, idx in zip(members[1:], index[1:], strict=True):
        bad = np.flatnonzero(m.original_labels[idx] != labels)
        if len(bad):
            raise CarclfError(
                f"members {members[0].name} and {m.name} disagree on the label of {len(bad)} photo(s), e.g. "
                f"'{paths[bad[0]]}': the data changed between the runs; retrain on the same data")
    notes = []
    dropped = {m.name: len(m.paths) - len(paths) for m in members if len(m.paths) != len(paths)}
    if dropped:
        notes.append(f"figures on the {len(paths)} photos every member saw (left out: "
                     + ", ".join(f"{n} {c}" for n, c in dropped.items()) + ")")
    first = members[0].row_folds[index[0]]
    for m, idx in zip(members[1:], index[1:], strict=True):
        theirs = m.row_folds[idx]
        same = all(len(set(theirs[first == k].tolist())) == 1 for k in np.unique(first))
        if not same:
            notes.append(f"{m.name} was trained on another fold split than {members[0].name}: its out-of-fold rows "
                         f"are aligned by photo; cross-validation groups follow {members[0].name}'s folds")
    return Aligned(paths, labels, first, index, notes)
