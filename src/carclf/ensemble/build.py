"""``carclf ensemble``: members' out-of-fold logits -> candidates scored by cross-validation -> ensemble.yaml."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from carclf.artifacts.ensemble import (
    ENSEMBLE_FILE,
    ENSEMBLE_FOLDER,
    FORMAT,
    KIND,
    relative_run,
    save_calibration,
)
from carclf.artifacts.oof import write_ensemble_oof
from carclf.ensemble.fit import (
    CALIBRATIONS,
    EPS_GRID,
    Problem,
    Recipe,
    Selector,
    fit,
    make_splits,
    nested,
)
from carclf.ensemble.members import Member, align, check_classes, load_member, member_names, parse_member
from carclf.errors import CarclfError
from carclf.io import atomic_write


def _check_out(out: Path, overwrite: bool, members: list[Member]) -> None:
    """Refuse an output folder that holds anything but an earlier carclf ensemble (and that only with --overwrite);
    never one inside a member's run, or one holding a member's run."""
    o = out.resolve()
    for m in members:
        r = m.run.path.resolve()
        if o == r or r in o.parents or o in r.parents:
            raise CarclfError(f"-o '{out}' overlaps member {m.name}'s run '{m.run.path}': write the ensemble to a "
                              "folder of its own, e.g. runs/ensembles/<name>")
    ENSEMBLE_FOLDER.check(out, overwrite)


def load_problem(specs: list[str], log: Callable[[str], None] = print) -> tuple[list[Member], Problem, Any, list[str]]:
    """Load and align the members; the fitting problem over the photos every member saw."""
    parsed = [parse_member(s) for s in specs]
    names = member_names(parsed)
    members = [load_member(p, n, log) for p, n in zip(parsed, names, strict=True)]
    classes = check_classes(members)
    models = {tuple(m.classes) for m in members}
    if len(models) > 1:
        log("members have different model classes (merges or dropped classes): "
            + "; ".join(f"{m.name} {len(m.classes)}" for m in members)
            + f"; each is shared out over the submission's {len(classes)} columns before they are combined")
    al = align(members)
    for note in al.notes:
        log(note)
    logits = []
    for m, idx in zip(members, al.index, strict=True):
        logits.append({name: m.policy_logits(views)[idx] for name, views in m.policies().items()})
    prob = Problem(
        names=names, labels=al.labels, groups=al.folds, merges=[m.merge for m in members],
        model_labels=[m.labels[idx] for m, idx in zip(members, al.index, strict=True)], logits=logits,
    )
    return members, prob, al, classes


def _variant(recipe: Recipe, base: tuple[str, ...], tta: bool, cal: bool) -> Recipe:
    r = recipe if tta else replace(recipe, policies=base)
    return r if cal else replace(r, member_temperature=False, calibration="none")


def build_ensemble(
    specs: list[str], out: Path | str, overwrite: bool = False, cv_folds: int = 5, cv: str = "grouped",
    nested_cv: bool = False, seed: int = 0, threads: int = 1, calibrations: tuple[str, ...] = CALIBRATIONS,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Choose and fit an ensemble of ``specs`` (runs, or ``run:folds``) on their out-of-fold logits; write
    ``out/ensemble.yaml``; return its content."""
    from threadpoolctl import threadpool_limits

    if cv not in ("grouped", "stratified"):
        raise CarclfError(f"--cv {cv!r}: use grouped (by the runs' own folds) or stratified")
    if cv_folds < 2:
        raise CarclfError(f"--cv-folds {cv_folds}: cross-validation needs at least 2 parts")
    start = time.perf_counter()
    out = Path(out)
    members, prob, al, classes = load_problem(specs, log=log)
    _check_out(out, overwrite, members)  # before the slow part
    rows = np.arange(len(prob))
    splits = make_splits(prob, rows, cv_folds, cv, seed)
    grouped = cv == "grouped" and len(np.unique(prob.groups)) >= 2
    cv_text = (f"{len(splits)} parts grouped by {members[0].name}'s training folds" if grouped
               else f"{len(splits)} stratified parts (seed {seed})")
    log(f"{len(prob)} out-of-fold photos seen by every member ({', '.join(f'{m.name} {len(m.paths)}' for m in members)}"
        f"); every figure is cross-validated over them: {cv_text}")
    # BLAS threads beyond one only fight each other (and whatever else runs) on these small matrices.
    with threadpool_limits(threads):
        sel = Selector(prob, splits, log, calibrations)
        chosen = sel.select()
        base = tuple(next(iter(prob.logits[m])) for m in range(prob.n_members))
        singles = [c for c in sel.candidates if c.stage == "combination" and c.recipe.method.startswith("single:")]
        best_single = min(singles, key=lambda c: c.loss).recipe
        equal = replace(chosen, method="equal", space="prob")
        cal_single = replace(best_single, calibration=chosen.calibration, eps=chosen.eps)
        figures: dict[str, dict[str, float]] = {}
        for key, rec in (("best_single", cal_single), ("equal_prob", equal), ("chosen", chosen)):
            figures[key] = {}
            for label, tta, cal in (("plain", False, False), ("tta", True, False), ("calibrated", False, True),
                                    ("tta+calibrated", True, True)):
                figures[key][label] = sel.score(_variant(rec, base, tta, cal)).loss
        figures["best_single"]["member"] = prob.names[int(best_single.method.split(":")[1])]
        nested_doc = None
        if nested_cv:
            log("nested cross-validation of the whole selection (every stage re-chosen inside each part) ...")
            loss, picked = nested(prob, splits, max(2, cv_folds - 1), cv, seed, calibrations)
            nested_doc = {"log_loss": loss, "picked": [r.label(prob.names) for r in picked]}
            log(f"nested CV log loss of the selection procedure: {loss:.4f}")
        final = fit(chosen, prob, rows)
        result = sel.score(chosen)
        raw = sel.score(_variant(chosen, chosen.policies, True, False))
    seconds = time.perf_counter() - start

    table = [{"stage": c.stage, "candidate": c.recipe.label(prob.names), "cv_log_loss": round(float(c.loss), 6),
              "chosen": c.chosen} for c in sel.candidates]
    doc = _document(members, al, prob, classes, chosen, final, out, table, figures, nested_doc, cv_text, cv_folds,
                    cv, seed, seconds)
    doc["selection"]["calibrations"] = list(calibrations)  # the candidates; carclf nest rebuilds with the same
    ENSEMBLE_FOLDER.make_room(out, overwrite)  # checked above: only an earlier ensemble's own files
    doc["calibration"] = save_calibration(out, final.calibration)  # vector / matrix arrays: calibration.npz
    feats = members[0].features[al.index[0]] if members[0].features is not None else None
    write_ensemble_oof(out, paths=al.paths.astype(str), labels=prob.labels, folds=prob.groups,
                 probs=result.probs, probs_raw=raw.probs,
                 **({"features": feats.astype(np.float16)} if feats is not None else {}))
    atomic_write(out / ENSEMBLE_FILE, lambda fh: yaml.safe_dump(doc, fh, allow_unicode=True, sort_keys=False,
                                                                   width=120), "w", encoding="utf-8")
    log(format_candidates(table))
    log(format_figures(figures, nested_doc))
    log(f"wrote {out / ENSEMBLE_FILE} ({seconds:.1f} s)")
    return doc


def _document(members, al, prob, classes, chosen, final, out, table, figures, nested_doc, cv_text, cv_folds, cv,
              seed, seconds) -> dict[str, Any]:
    from carclf import __version__

    mdocs = []
    for i, m in enumerate(members):
        policy = chosen.policies[i]
        mdocs.append({
            "name": m.name, "run": relative_run(out, m.run.path), "run_abs": str(m.run.path.resolve()),
            "folds": [int(k) for k in m.folds],
            "best_sha256": {int(k): v for k, v in m.checksums.items()},
            "eval_sizes": {int(k): int(v) for k, v in m.eval_sizes.items()},
            "weight": float(final.weights[i]),
            "temperature": float(final.temperatures[i]),
            "tta": policy, "views": list(m.policies()[policy]),
            "model_classes": len(m.classes), "merged_groups": m.merge.groups,
            "oof_log_loss": None if final.member_loss[i] is None else float(final.member_loss[i]),
        })
    return {
        "kind": KIND, "format": FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "carclf": __version__,
        "classes": list(classes),
        "space": chosen.space,
        "eps": float(final.eps),
        "calibration": None,  # build_ensemble: save_calibration, once the folder is ready for its arrays
        "members": mdocs,
        "chosen": chosen.label(prob.names),
        "recipe": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(chosen).items()},
        "weights_note": "members' probabilities are shared out over the submission's columns (each member's merge "
                        "map) before the weights apply; logit space averages their log-probabilities there",
        "selection": {
            "rows": int(len(prob)), "rows_per_member": {m.name: int(len(m.paths)) for m in members},
            "cv": cv_text, "cv_folds": int(cv_folds), "cv_mode": cv, "seed": int(seed), "notes": al.notes,
            "eps_grid": list(EPS_GRID), "seconds": round(seconds, 1),
            "honesty": "each figure: fitted on K-1 parts of the OOF rows, scored on the held-out part; the choice "
                       "among candidates is made on those figures (see 'nested' for a figure that re-makes it)",
            "nested": nested_doc,
        },
        "figures": figures,
        "candidates": table,
    }


def format_candidates(table: list[dict]) -> str:
    width = max(len(r["candidate"]) for r in table)
    stage_w = max(len(r["stage"]) for r in table)
    lines = [f"  {'stage'.ljust(stage_w)}  {'candidate'.ljust(width)}  cv log loss"]
    for r in table:
        mark = "*" if r["chosen"] else " "
        lines.append(f"{mark} {r['stage'].ljust(stage_w)}  {r['candidate'].ljust(width)}  {r['cv_log_loss']:.4f}")
    lines.append("* chosen at its stage (a costlier candidate is kept only if it wins by more than one standard error "
                 "of the per-photo differences); every figure is scored on OOF rows its fit did not see")
    return "\n".join(lines)


def format_figures(figures: dict, nested_doc: dict | None) -> str:
    cols = ["plain", "tta", "calibrated", "tta+calibrated"]
    lines = ["cross-validated OOF log loss    " + "  ".join(c.rjust(14) for c in cols)]
    for key, label in (("best_single", f"best single ({figures['best_single']['member']})"),
                       ("equal_prob", "equal weights (prob)"), ("chosen", "chosen ensemble")):
        lines.append(label[:30].ljust(32) + "  ".join(f"{figures[key][c]:14.4f}" for c in cols))
    if nested_doc:
        lines.append(f"nested CV of the whole selection: {nested_doc['log_loss']:.4f}")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- read side
