"""``carclf report``: the error-analysis report of a run or an ensemble, from its out-of-fold predictions.

One HTML page (``report.html``) with PNG plots and JPEG thumbnails beside it (no CDN, no network: the page opens
from disk): headline scores per fold, learning curves, calibration, a sortable per-class table, the most confused
class pairs with photos, a t-SNE map of the penultimate features, suggested confusable groups (``confusable.yaml``,
in the format of ``merges.yaml``) and likely label errors (``label_issues.csv``). The figures are computed in
:mod:`carclf.analyze.report_stats`, the plots drawn in :mod:`carclf.analyze.report_plots`.

The report folder carries a ``.carclf-report`` marker; ``--overwrite`` replaces only what carclf wrote there, and
keeps ``features.npz`` (features computed for a run that predates stored features) while it is current.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from carclf.analyze import report_stats as st
from carclf.analyze.prepare_report import _CSS
from carclf.analyze.report_features import compute_features, tsne_map
from carclf.artifacts.metrics_csv import read_metrics
from carclf.artifacts.oof import OofSet, load_oof
from carclf.artifacts.photos import DataDisk
from carclf.artifacts.report import REPORT_FEATURE_CACHE as FEATURE_CACHE
from carclf.artifacts.report import REPORT_FOLDER, report_dir
from carclf.artifacts.report import REPORT_PLOTS as PLOTS
from carclf.artifacts.resolve import ENSEMBLE, RUN, kind_of
from carclf.errors import CarclfError
from carclf.io import atomic_write, atomic_write_text

# The file names written here (REPORT_FILES) live in carclf.artifacts: `train --overwrite` of a run deletes its
# report/ folder only when it holds nothing else
TOP_PAIRS = 15  # confused pairs shown with photos
PAIR_PHOTOS = 3  # misclassified photos per direction of a pair
TYPICAL = 2  # typical photos of the other class beside them
TOP_ISSUES = 50  # likely label errors shown with photos (the CSV has them all)
WORST = 20
THUMB = 112

_EXTRA_CSS = """
.thumbs{display:flex;flex-wrap:wrap;align-items:flex-start;gap:2px}.sep{border-left:3px solid #4c72b0;margin:0 6px}
figure img{max-width:112px;max-height:112px}.miss{width:112px;height:60px;background:#eee;color:#777;font-size:.8em;
display:flex;align-items:center;justify-content:center}table.sortable th{cursor:pointer;user-select:none}
table.sortable th:after{content:" \\2195";color:#aaa}tr.worst td{background:#fff4f0}.alias{color:#777;font-size:.85em}
td.num{text-align:right;font-variant-numeric:tabular-nums}nav a{margin-right:1em}.pair{border:1px solid #ddd;
margin:.6em 0;padding:.4em}.pair .head{font-size:.9em;margin-bottom:.3em}
"""
# Sorting by header click, written by hand: a dozen lines do not warrant a library (and the page must not fetch).
_SORT_JS = """
document.querySelectorAll('table.sortable').forEach(function(t){
  t.querySelectorAll('thead th').forEach(function(th,i){
    th.addEventListener('click',function(){
      var body=t.tBodies[0], rows=Array.prototype.slice.call(body.rows), asc=th.dataset.dir!=='asc';
      rows.sort(function(a,b){
        var x=a.cells[i].dataset.v!==undefined?a.cells[i].dataset.v:a.cells[i].textContent;
        var y=b.cells[i].dataset.v!==undefined?b.cells[i].dataset.v:b.cells[i].textContent;
        var nx=parseFloat(x), ny=parseFloat(y);
        var c=(!isNaN(nx)&&!isNaN(ny))?nx-ny:String(x).localeCompare(String(y));
        return asc?c:-c;});
      rows.forEach(function(r){body.appendChild(r);});
      t.querySelectorAll('thead th').forEach(function(h){delete h.dataset.dir;});
      th.dataset.dir=asc?'asc':'desc';});});});
"""


def _e(text: object) -> str:
    return html.escape(str(text))


def _f(v: float | None, digits: int = 4) -> str:
    return "" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{digits}f}"


def _pct(v: float) -> str:
    return "" if np.isnan(v) else f"{100 * v:.1f}%"


# ------------------------------------------------------------------------------------------------ the folder


def prepare_out(out: Path, overwrite: bool) -> None:
    """Make the report folder, or make room in it: an existing report is replaced only with ``overwrite``, and
    only when carclf made the folder and every entry in it is a report file (the features cache stays)."""
    if not REPORT_FOLDER.make_room(out, overwrite):
        REPORT_FOLDER.mark(out, {"kind": "report", "created": _now()})


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------------ the source


def member_runs(source: Path) -> tuple[list[Path], str]:
    """The run folders behind ``source`` (itself, or an ensemble's members, found as the Predictor finds them) and a
    note when they cannot be told."""
    from carclf.artifacts.ensemble import ENSEMBLE_FILE, member_run, read_ensemble

    kind = kind_of(source)
    if kind != ENSEMBLE:
        return ([source], "") if kind == RUN else ([], f"'{source}' is not a run directory")
    try:
        members = read_ensemble(source)["members"]
    except (OSError, CarclfError) as exc:
        return [], f"{ENSEMBLE_FILE} could not be read ({exc})"
    runs = []
    for m in members:
        try:
            path = member_run(source, m)
        except (CarclfError, KeyError, TypeError):  # a missing run, or a member entry without one
            continue
        if kind_of(path) == RUN:
            runs.append(path)
    return runs, "" if runs else "the ensemble's member runs could not be found from ensemble.yaml"


def read_curves(run: Path) -> list[tuple[str, list[dict]]]:
    """Each completed fold's per-epoch rows of metrics.csv (the weights scored every epoch; not the final
    candidates such as raw or SWA weights)."""
    from carclf.artifacts.run import RunDir

    rd = RunDir.open(run)
    out = []
    for k in rd.completed_folds():
        path = rd.fold(k).metrics
        if not path.is_file():
            continue
        rows = read_metrics(path)
        if not rows:
            continue
        primary = rows[0].get("weights")
        keep = []
        for r in rows:
            if primary is not None and r.get("weights") != primary:
                continue
            parsed = {}
            for key, v in r.items():
                try:
                    parsed[key] = float(v)
                except (TypeError, ValueError):
                    continue
            if "epoch" in parsed:
                keep.append(parsed)
        out.append((f"fold {k}", keep))
    return out


# ------------------------------------------------------------------------------------------------ thumbnails


class Thumbs:
    """Small JPEGs in ``thumbs/``, named by the photo's path; a photo that is gone gets none (and is counted)."""

    def __init__(self, folder: Path, data_root: Path | None) -> None:
        self.folder = folder
        self.disk = DataDisk(data_root) if data_root is not None and data_root.is_dir() else None
        self.missing: set[str] = set()
        self.made = 0

    def src(self, rel: str) -> str:
        if self.disk is None:
            return ""
        name = f"{hashlib.sha1(rel.encode()).hexdigest()[:20]}.jpg"
        out = self.folder / name
        if not out.is_file():
            from carclf.data.imageio import load_rgb

            try:
                img = load_rgb(self.disk.photo(rel), target=THUMB // 2)
            except Exception:  # noqa: BLE001 - a photo moved, deleted or broken since training: no thumbnail
                self.missing.add(rel)
                return ""
            img.thumbnail((THUMB, THUMB))
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write(out, lambda fh: img.save(fh, "JPEG", quality=80), "wb")
            self.made += 1
        return f"{self.folder.name}/{name}"

    def fig(self, rel: str, caption: str) -> str:
        src = self.src(rel)
        img = (f'<img src="{_e(src)}" alt="{_e(rel)}" loading="lazy">' if src
               else "<div class='miss'>photo not found</div>")
        return f"<figure title='{_e(rel)}'>{img}<figcaption>{caption}</figcaption></figure>"


# ------------------------------------------------------------------------------------------------ HTML pieces


def _table(header: list[str], rows: list[list[tuple[str, object] | str]], cls: str = "",
           row_cls: list[str] | None = None) -> str:
    """A table whose cells are HTML strings, or (html, sort value) pairs for the sortable tables."""
    head = "<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr></thead>"
    body = []
    for i, r in enumerate(rows):
        cells = []
        for c in r:
            if isinstance(c, tuple):
                cells.append(f"<td class='num' data-v='{_e(c[1])}'>{c[0]}</td>")
            else:
                cells.append(f"<td>{c}</td>")
        rc = f" class='{row_cls[i]}'" if row_cls and row_cls[i] else ""
        body.append(f"<tr{rc}>{''.join(cells)}</tr>")
    return f"<table class='{cls}'>{head}<tbody>{''.join(body)}</tbody></table>"


def _num(v: float, fmt: Callable[[float], str] = _f) -> tuple[str, object]:
    return fmt(v), ("" if v is None or np.isnan(v) else f"{v:.6g}")


class _Names:
    """Display names of the model's classes (a merged class lists its names) with their ASCII aliases."""

    def __init__(self, oof: OofSet, aliases: dict[str, str]) -> None:
        self.classes, self.aliases = oof.classes, aliases
        lm = np.asarray(oof.merge.label_map)
        self.members = [[oof.merge.original[i] for i in np.where(lm == c)[0]] or [name]
                        for c, name in enumerate(oof.classes)]

    def html(self, c: int) -> str:
        if c < 0:
            return ""
        names = self.members[c]
        text = _e(" + ".join(names))
        alias = self.aliases.get(self.classes[c], "")
        # The alias only where the name is not plain ASCII (e.g. Hangul): it is what the plots may show instead.
        return f"{text} <span class='alias'>{_e(alias)}</span>" if alias and not self.classes[c].isascii() else text

    def plain(self, c: int) -> str:
        return " + ".join(self.members[c])


# ------------------------------------------------------------------------------------------------ the report


@dataclass
class _Inputs:
    """What the report reads: the out-of-fold rows, the runs behind them and how classes are named."""

    source: Path  # as given on the command line (confusable.yaml names it)
    oof: OofSet
    out: Path
    runs: list[Path]
    runs_note: str  # why the runs' learning curves cannot be drawn ("" when they can)
    data_root: Path | None
    font: str | None
    pnames: Any  # report_plots.PlotNames (matplotlib is imported lazily)
    names: _Names


@dataclass
class _Figures:
    """Everything the page, the plots and the files show, computed from the out-of-fold rows."""

    rows: list[dict]
    raw_bins: list[dict]
    cal_bins: list[dict]
    classes_rows: list[dict]
    pairs: list[dict]
    cgroups: st.Groups
    issues: np.ndarray
    issue_method: str
    suggested: np.ndarray
    features: np.ndarray | None = None
    feat_note: str = ""
    fgroups: st.Groups | None = None
    xy: np.ndarray | None = None  # the t-SNE map of the rows ``xy_rows``
    xy_rows: np.ndarray | None = None


class _Clock:
    """Seconds per step of the report (report.json's ``timings_s``)."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.timings: dict[str, float] = {}

    def lap(self, step: str) -> None:
        now = time.perf_counter()
        self.timings[step], self.last = now - self.last, now

    def total(self) -> float:
        self.timings["total"] = time.perf_counter() - self.start
        return self.timings["total"]


def write_report(source: Path | str, out_dir: Path | str | None = None, overwrite: bool = False,
                 device: str = "auto", log: Callable[[str], None] = print) -> Path:
    """Write the error-analysis report of a run or an ensemble folder; returns the path of report.html."""
    clock = _Clock()
    inp = _load(Path(source), out_dir, overwrite)
    clock.lap("load")
    fig = _scores(inp.oof)
    clock.lap("scores")
    fig.features, fig.feat_note = _features(inp, device, log)
    clock.lap("features")
    _maps(fig, inp.oof.labels, len(inp.oof.classes))
    clock.lap("tsne")
    has_curves = _plots(inp, fig)
    clock.lap("plots")
    issue_rows = _write_files(inp, fig)
    clock.lap("files")
    thumbs = Thumbs(inp.out / "thumbs", inp.data_root)
    sections = _sections(inp, fig, has_curves, issue_rows, thumbs)
    clock.lap("page")
    seconds = clock.total()
    summary = _summary(inp, fig, issue_rows, len(thumbs.missing), clock.timings)
    atomic_write_text(inp.out / "report.json", json.dumps(summary, ensure_ascii=False, indent=1,
                                                          default=_json_default))
    atomic_write_text(inp.out / "report.html", _page(inp.oof, sections, seconds))  # last: marks a finished report
    log(f"report: {len(inp.oof)} photos, {len(inp.oof.classes)} classes, {len(fig.cgroups.groups)} confusable "
        f"group(s), {len(issue_rows)} likely label error(s), {seconds:.1f} s")
    return inp.out / "report.html"


def _load(source: Path, out_dir: Path | str | None, overwrite: bool) -> _Inputs:
    """Read the out-of-fold rows, make the report folder, find the runs, the photos and the class aliases."""
    from carclf.analyze.report_plots import PlotNames, find_hangul_font, read_aliases
    from carclf.artifacts.run import RunDir

    if not source.is_dir():
        raise CarclfError(f"'{source}' is not a folder: give a run directory (runs/<name>) or an ensemble folder")
    oof = load_oof(source)
    out = Path(out_dir) if out_dir else report_dir(oof.source)
    prepare_out(out, overwrite)
    runs, runs_note = member_runs(Path(oof.source))
    cfg = RunDir.open(runs[0]).read_config() if runs else None
    data_root = Path(cfg.data.root) if cfg is not None and cfg.data.root else None
    classes_csv = None
    if cfg is not None:
        from carclf.artifacts.prepare import PrepareDir

        classes_csv = PrepareDir.for_data(cfg.out_dir, cfg.data.root).classes
    aliases = read_aliases(classes_csv, oof.merge.original)
    font = find_hangul_font()
    return _Inputs(source, oof, out, runs, runs_note, data_root, font, PlotNames(oof.classes, aliases, font),
                   _Names(oof, aliases))


def _scores(oof: OofSet) -> _Figures:
    """The scores and tables (report_stats) of the out-of-fold rows."""
    labels, probs, eps, n_classes = oof.labels, oof.probs, oof.eps, len(oof.classes)
    issues, issue_method = st.find_label_issues(probs, labels)
    return _Figures(
        rows=st.headline_rows(oof.probs_raw, probs, labels, oof.original_labels, oof.folds, oof.merge, eps,
                              oof.temperatures),
        raw_bins=st.confidence_bins(oof.probs_raw, labels, eps), cal_bins=st.confidence_bins(probs, labels, eps),
        classes_rows=st.worst_first(st.per_class(probs, labels, n_classes, eps)),
        pairs=st.confused_pairs(probs, labels, n_classes, TOP_PAIRS),
        cgroups=st.confusion_groups(probs, labels, n_classes),
        issues=issues, issue_method=issue_method, suggested=st.suggested_labels(probs, labels),
    )


def _features(inp: _Inputs, device: str, log: Callable[[str], None]) -> tuple[np.ndarray | None, str]:
    """(penultimate features, a note on where they come from): stored with the OOF rows, or computed once from the
    fold models and cached."""
    oof, data_root = inp.oof, inp.data_root
    if oof.features is not None:
        return oof.features, "stored with the out-of-fold predictions"
    if kind_of(oof.source) == ENSEMBLE:
        return None, "not stored by every member run, and an ensemble has no single feature space: map skipped"
    if data_root is None or not data_root.is_dir():
        return None, f"not stored (the run predates them) and the photos are not at data.root '{data_root}'"
    features, n_bad = compute_features(Path(oof.source), oof, data_root, inp.out / FEATURE_CACHE, device, log)
    if n_bad == len(oof):
        return None, f"not stored, and none of the photos could be read under '{data_root}'"
    return features, (f"computed from the fold models (the run predates stored features) and cached in "
                      f"{FEATURE_CACHE}" + (f"; {n_bad} photo(s) could not be read" if n_bad else ""))


def _maps(fig: _Figures, labels: np.ndarray, n_classes: int) -> None:
    """The feature groups and the t-SNE map, where there are features (and enough photos for a map)."""
    if fig.features is None:
        return
    fig.fgroups = st.feature_groups(fig.features, labels, n_classes)
    if np.isfinite(fig.features).all(axis=1).sum() >= 5:
        fig.xy, fig.xy_rows = tsne_map(fig.features, labels)


def _plots(inp: _Inputs, fig: _Figures) -> bool:
    """Draw the PNG plots beside the page; whether there were learning curves to draw."""
    from carclf.analyze.report_plots import plot_calibration, plot_curves, plot_embedding, plot_worst_classes

    out, labels = inp.out, inp.oof.labels
    curves = []
    for r in inp.runs:
        curves += read_curves(r) if len(inp.runs) == 1 else [(f"{r.name} {n}", c) for n, c in read_curves(r)]
    has_curves = plot_curves(curves, out / PLOTS["curves"])
    plot_calibration(fig.raw_bins, fig.cal_bins, out / PLOTS["calibration"])
    plot_worst_classes(fig.classes_rows, inp.pnames, out / PLOTS["worst"], WORST)
    if fig.xy is not None:
        wrong = inp.oof.probs.argmax(axis=1) != labels
        plot_embedding(fig.xy, labels[fig.xy_rows], wrong[fig.xy_rows], fig.cgroups, inp.pnames,
                       out / PLOTS["embedding"])
    return has_curves


def _write_files(inp: _Inputs, fig: _Figures) -> list[dict]:
    """The files a person acts on (per_class.csv, label_issues.csv, confusable.yaml); the label-issue rows."""
    per_class_csv(inp.out / "per_class.csv", fig.classes_rows, inp.names)
    issue_rows = label_issue_rows(inp.oof, fig.issues, fig.suggested, inp.data_root)
    write_issues_csv(inp.out / "label_issues.csv", issue_rows)
    write_confusable(inp.out / "confusable.yaml", inp.oof, fig.cgroups, fig.fgroups, fig.features, str(inp.source))
    return issue_rows


def _sections(inp: _Inputs, fig: _Figures, has_curves: bool, issue_rows: list[dict], thumbs: Thumbs) -> list[str]:
    """The page's sections, in order (drawing the thumbnails they show)."""
    oof, data_root, names = inp.oof, inp.data_root, inp.names
    photo_note = ""
    if data_root is None or not data_root.is_dir():
        photo_note = (f"<p class='flag'>The photos are not at data.root '{_e(data_root)}' any more: thumbnails are "
                      "left out.</p>")
    ctx = {"oof": oof, "names": names, "thumbs": thumbs, "labels": oof.labels, "probs": oof.probs}
    sections = [
        _headline_html(oof, fig.rows, inp.runs_note, has_curves, fig.feat_note, fig.issue_method, inp.font,
                       inp.pnames),
        _calibration_html(fig.cal_bins),
        _classes_html(fig.classes_rows, names),
        _pairs_html(fig.pairs, ctx, photo_note),
        _embedding_html(fig.xy is not None, fig.feat_note, fig.cgroups),
        _groups_html(fig.cgroups, fig.fgroups, oof.probs, oof.labels, names, fig.features),
        _issues_html(issue_rows, fig.issue_method, ctx, photo_note),
    ]
    if thumbs.missing:
        sections.insert(1, f"<p class='flag'>{len(thumbs.missing)} photo(s) could not be read under "
                           f"'{_e(data_root)}' (moved or deleted since training): shown as 'photo not found'.</p>")
    return sections


def _page(oof: OofSet, sections: list[str], seconds: float) -> str:
    title = f"carclf report: {Path(oof.source).name}"
    nav = "".join(f"<a href='#{k}'>{v}</a>" for k, v in (
        ("headline", "Headline"), ("calibration", "Calibration"), ("classes", "Classes"), ("pairs", "Confused pairs"),
        ("embedding", "Embedding map"), ("groups", "Confusable groups"), ("label-issues", "Likely label errors")))
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<link rel='icon' href='data:,'><style>{_CSS}{_EXTRA_CSS}</style></head><body>"
            f"<h1>{_e(title)}</h1><nav>{nav}</nav>{''.join(sections)}"
            f"<p class='note'>Written {_now()} by carclf in {seconds:.1f} s from {_e(oof.source)}.</p>"
            f"<script>{_SORT_JS}</script></body></html>\n")


def _summary(inp: _Inputs, fig: _Figures, issue_rows: list[dict], photos_missing: int,
             timings: dict[str, float]) -> dict:
    """report.json: the headline table, the groups and the first label issues, for scripts."""
    oof, names = inp.oof, inp.names
    return {
        "source": oof.source, "n": len(oof), "classes": len(oof.classes), "headline": fig.rows, "timings_s": timings,
        "features": fig.feat_note, "label_issue_method": fig.issue_method, "label_issues": len(issue_rows),
        "plot_font": inp.font, "confusion_groups": _groups_json(fig.cgroups, names),
        "feature_groups": _groups_json(fig.fgroups, names) if fig.fgroups else None,
        "group_scores": _group_level(oof.probs, oof.labels, fig.cgroups, fig.fgroups),
        "confused_pairs": [{**p, "a": names.plain(p["a"]), "b": names.plain(p["b"])} for p in fig.pairs],
        "top_label_issues": issue_rows[:20], "photos_missing": photos_missing,
    }


def _json_default(v: object) -> object:
    if isinstance(v, np.integer | np.floating):
        return v.item()
    raise TypeError(type(v).__name__)


def _groups_json(g: st.Groups | None, names: _Names) -> list[dict]:
    if g is None:
        return []
    return [{"classes": [names.plain(c) for c in m], "distance": d} for m, d in zip(g.groups, g.distances,
                                                                                    strict=True)]


def _group_level(probs: np.ndarray, labels: np.ndarray, cg: st.Groups, fg: st.Groups | None) -> dict:
    out = {"classes": st.group_scores(probs, labels, np.arange(probs.shape[1])),  # each class its own group
           "confusion_groups": st.group_scores(probs, labels, cg.label)}
    if fg is not None:
        out["feature_groups"] = st.group_scores(probs, labels, fg.label)
    return out


# ------------------------------------------------------------------------------------------------ sections


def _headline_html(oof: OofSet, rows: list[dict], runs_note: str, has_curves: bool, feat_note: str,
                   issue_method: str, font: str | None, pnames) -> str:
    cols = [("log_loss_submitted", "log loss (as submitted)"), ("log_loss", "log loss (model classes)"),
            ("accuracy", "accuracy"), ("top5", "top-5"), ("ece", "ECE"), ("confidence", "mean confidence"),
            ("entropy", "mean entropy (nats)"), ("gap", "confidence gap (top-1 - top-2)")]
    body = []
    for r in rows:
        cells = [_e(r["fold"]), _e(r["probs"]), (_f(r["temperature"], 3) if r["temperature"] else "", ""),
                 (str(r["n"]), r["n"])]
        cells += [_num(r[k]) for k, _ in cols]
        body.append(cells)
    folds = sorted(set(oof.folds.tolist()))
    info = [
        f"{len(oof)} out-of-fold photos, {len(oof.classes)} model classes"
        + (f" ({len(oof.merge.original)} submission columns)" if len(oof.merge.original) != len(oof.classes) else "")
        + f", fold(s) {', '.join(map(str, folds))}.",
        "Calibrated: each fold's temperature from <code>carclf calibrate</code> (1.0 where it has not run). "
        "'As submitted' scores what <code>predict</code> writes: the submission's columns, clipped to predict.eps; "
        "the other figures are over the model's classes.",
        f"Features: {_e(feat_note)}. Likely label errors: {_e(issue_method)}.",
        "Plots name classes " + (f"in the font '{_e(font)}'." if font else
                                 "by their ASCII aliases (no font with Hangul is installed)." if not pnames.use_names
                                 else "by their names."),
    ]
    if len(folds) == 1:
        info.append("Only one fold is complete: every figure comes from that fold's validation photos.")
    curves = (f"<h3>Learning curves</h3><img src='{PLOTS['curves']}' alt='learning curves'>" if has_curves
              else f"<p class='note'>No learning curves: {_e(runs_note or 'no metrics.csv found')}.</p>")
    if runs_note and has_curves:
        curves += f"<p class='note'>{_e(runs_note)}</p>"
    header = ["fold", "probabilities", "T", "photos"] + [c for _, c in cols]
    return (f"<h2 id='headline'>Headline</h2><p class='note'>{' '.join(info)}</p>"
            + _table(header, body, "headline") + curves)


def _calibration_html(bins: list[dict]) -> str:
    rows = [[_e(f"{b['lo']:.2f}-{b['hi']:.2f}"), (str(b["n"]), b["n"]), _num(b["confidence"]),
             _num(b["accuracy"]), _num(b["mean_nll"]), _num(b["loss_share"], _pct)] for b in bins if b["n"]]
    return ("<h2 id='calibration'>Calibration</h2><p class='note'>Left: accuracy against confidence (on the "
            "diagonal when the probabilities can be trusted). Middle: how confident the model is. Right: the share "
            "of the total log loss from each confidence bin (calibrated): confident mistakes cost the most per "
            "photo.</p>"
            f"<img src='{PLOTS['calibration']}' alt='reliability diagram'>"
            + _table(["confidence bin", "photos", "mean confidence", "accuracy", "mean log loss", "share of log loss"],
                     rows, "bins"))


def _classes_html(rows: list[dict], names: _Names) -> str:
    body, cls = [], []
    for rank, r in enumerate(rows):
        body.append([(str(rank + 1), rank + 1), names.html(r["class"]), (str(r["support"]), r["support"]),
                     _num(r["accuracy"], _pct), _num(r["log_loss"]), _num(r["p_true"]),
                     names.html(r["wrong_class"]), (str(r["wrong_count"]), r["wrong_count"])])
        cls.append("worst" if rank < WORST else "")
    return (f"<h2 id='classes'>Classes</h2><p class='note'>Worst first (mean log loss of the class's photos); the "
            f"{WORST} worst are shaded. Click a column header to sort. Also in per_class.csv.</p>"
            f"<img src='{PLOTS['worst']}' alt='worst classes'>"
            + _table(["rank", "class", "photos", "accuracy", "log loss", "mean p(true)", "most often mistaken for",
                      "times"], body, "sortable", cls))


def _typical(ctx: dict, c: int, k: int) -> list[int]:
    """Rows of class ``c`` the model gets right most confidently."""
    cache = ctx.setdefault("typical", {})
    if c not in cache:
        labels, probs = ctx["labels"], ctx["probs"]
        rows = np.where((labels == c) & (probs.argmax(axis=1) == c))[0]
        if not len(rows):
            rows = np.where(labels == c)[0]
        cache[c] = rows[np.argsort(-probs[rows, c], kind="stable")][:TYPICAL].tolist()
    return cache[c][:k]


def _photo(ctx: dict, i: int, typical: bool = False) -> str:
    """A thumbnail with a short caption: file, fold, p(its label) and p(the class it was taken for)."""
    oof, probs = ctx["oof"], ctx["probs"]
    lab, pred = int(ctx["labels"][i]), int(probs[i].argmax())
    if typical:
        cap = f"<i>typical</i>, p {probs[i, lab]:.2f}"
    else:
        cap = f"{_e(str(oof.paths[i]).split('/')[-1])} (fold {oof.folds[i]})<br>p(label) {probs[i, lab]:.2f}"
        if pred != lab:
            cap += f", p(taken for) {probs[i, pred]:.2f}"
    return ctx["thumbs"].fig(str(oof.paths[i]), cap)


def _pairs_html(pairs: list[dict], ctx: dict, photo_note: str) -> str:
    if not pairs:
        return "<h2 id='pairs'>Most confused class pairs</h2><p>No photo is misclassified.</p>"
    labels, probs, names = ctx["labels"], ctx["probs"], ctx["names"]
    pred = probs.argmax(axis=1)
    parts = []
    for n, p in enumerate(pairs):
        rows_html = []
        for a, b in ((p["a"], p["b"]), (p["b"], p["a"])):
            wrong = np.where((labels == a) & (pred == b))[0]
            n_wrong = len(wrong)
            if not n_wrong:
                continue
            wrong = wrong[np.argsort(-probs[wrong, b], kind="stable")][:PAIR_PHOTOS]
            figs = "".join(_photo(ctx, int(i)) for i in wrong)
            typ = "".join(_photo(ctx, int(i), typical=True) for i in _typical(ctx, b, TYPICAL))
            rows_html.append(f"<div class='head'>{names.html(a)} &rarr; taken for {names.html(b)}: "
                             f"{n_wrong} photo(s) | typical {names.html(b)}</div>"
                             f"<div class='thumbs'>{figs}<span class='sep'></span>{typ}</div>")
        parts.append(f"<div class='pair'><div class='head'><b>{n + 1}.</b> {p['a_as_b'] + p['b_as_a']} "
                     f"misclassified ({p['a_as_b']} / {p['b_as_a']}), mean probability swapped "
                     f"{100 * p['rate']:.1f}%</div>{''.join(rows_html)}</div>")
    return (f"<h2 id='pairs'>Most confused class pairs (top {len(pairs)})</h2>{photo_note}"
            "<p class='note'>Pairs by the number of photos of one class predicted as the other, both ways. Each row: "
            f"up to {PAIR_PHOTOS} misclassified photos (most confident mistakes first), then typical photos of the "
            "class they were taken for.</p>" + "".join(parts))


def _embedding_html(has_map: bool, feat_note: str, groups: st.Groups) -> str:
    if not has_map:
        return f"<h2 id='embedding'>Embedding map</h2><p class='note'>No map: features {_e(feat_note)}.</p>"
    return ("<h2 id='embedding'>Embedding map</h2><p class='note'>Penultimate features of the out-of-fold photos, "
            "PCA to 50 dimensions, then t-SNE (scikit-learn). Colours: the largest confusable groups (by confusion, "
            "below); grey: the rest; crosses: misclassified photos. Classes that overlap here look alike to the "
            f"model.</p><img src='{PLOTS['embedding']}' alt='t-SNE map'>")


def _group_table(g: st.Groups, probs: np.ndarray, labels: np.ndarray, names: _Names, feat_dist: np.ndarray | None,
                 limit: int = 60) -> str:
    pred = probs.argmax(axis=1)
    rows = []
    for i, (members, d) in enumerate(zip(g.groups[:limit], g.distances[:limit], strict=True)):
        m = np.isin(labels, members)
        fine = float((pred[m] == labels[m]).mean()) if m.any() else float("nan")
        coarse = float(np.isin(pred[m], members).mean()) if m.any() else float("nan")
        fd = float("nan")
        if feat_dist is not None and len(members) > 1:
            sub = feat_dist[np.ix_(members, members)]
            fd = float(sub[np.triu_indices(len(members), 1)].mean())
        rows.append([(f"G{i + 1}", i + 1), "<br>".join(names.html(c) for c in members), (str(len(members)),
                     len(members)), _num(d, lambda v: _f(v, 3)), _num(fd, lambda v: _f(v, 3)),
                     (str(int(m.sum())), int(m.sum())), _num(fine, _pct), _num(coarse, _pct)])
    more = f"<p class='note'>{len(g.groups) - limit} more groups in confusable.yaml.</p>" if len(g.groups) > limit \
        else ""
    return _table(["group", "classes", "size", "distance", "feature distance", "photos", "accuracy (classes)",
                   "accuracy (group)"], rows, "sortable") + more


def _groups_html(cg: st.Groups, fg: st.Groups | None, probs: np.ndarray, labels: np.ndarray, names: _Names,
                 features: np.ndarray | None) -> str:
    feat_dist = None
    if features is not None:
        from scipy.spatial.distance import cdist

        cent, _ = st.class_centroids(features, labels, probs.shape[1])
        feat_dist = cdist(cent, cent, metric="cosine")
    lv = _group_level(probs, labels, cg, fg)
    level = [["classes", (str(len(names.classes)), len(names.classes)), _num(lv["classes"]["accuracy"], _pct),
              _num(lv["classes"]["log_loss"])],
             ["confusion groups", (str(int(cg.label.max()) + 1), int(cg.label.max()) + 1),
              _num(lv["confusion_groups"]["accuracy"], _pct), _num(lv["confusion_groups"]["log_loss"])]]
    if fg is not None:
        level.append(["feature groups", (str(int(fg.label.max()) + 1), int(fg.label.max()) + 1),
                      _num(lv["feature_groups"]["accuracy"], _pct), _num(lv["feature_groups"]["log_loss"])])
    html_ = ["<h2 id='groups'>Confusable groups</h2><p class='note'>Agglomerative clustering (scipy, average linkage)"
             f" of the classes. <b>By confusion</b>: distance 1 - 2s, where s is the mean share of probability one "
             f"class's photos give the other (both ways averaged; 0: indistinguishable), cut at {cg.cut:.2f}. "
             "<b>By features</b>: cosine distance between class centroids of the penultimate features, cut at half "
             "the median distance between two classes. The confusion groups are written to <code>confusable.yaml"
             "</code> in the format of merges.yaml (the feature groups under <code>feature_groups</code>): review "
             "them; only classes that really are one car model belong in DATA/merges.yaml. Accuracy at the group "
             "level counts a prediction anywhere in the photo's group as right.</p>",
             _table(["level", "groups", "accuracy", "log loss"], level, "level"),
             f"<h3>By confusion ({len(cg.groups)} groups)</h3>",
             _group_table(cg, probs, labels, names, feat_dist) if cg.groups else "<p>None.</p>"]
    if fg is not None:
        html_ += [f"<h3>By features ({len(fg.groups)} groups, cut at cosine distance {fg.cut:.3f})</h3>",
                  _group_table(fg, probs, labels, names, feat_dist) if fg.groups else "<p>None.</p>"]
    else:
        html_.append("<p class='note'>No groups by features: no features.</p>")
    return "".join(html_)


def _issues_html(rows: list[dict], method: str, ctx: dict, photo_note: str) -> str:
    head = (f"<h2 id='label-issues'>Likely label errors ({len(rows)})</h2>{photo_note}<p class='note'>Photos whose "
            "given label gets a low out-of-fold probability while another class is confident, least self-confident "
            f"first, by {_e(method)}. The first {TOP_ISSUES} are shown with a typical photo of the given class and "
            "of the suggested one; all are in label_issues.csv (path, given and suggested label, probabilities) "
            "to check and fix by hand.</p>")
    if not rows:
        return head + "<p>None found.</p>"
    names, thumbs = ctx["names"], ctx["thumbs"]
    body = []
    for r in rows[:TOP_ISSUES]:
        i, g, s = r["row"], r["given"], r["suggested"]
        photo = thumbs.fig(r["path"], f"{_e(r['path'].split('/')[-1])}")
        typ_g = "".join(_photo(ctx, j, typical=True) for j in _typical(ctx, g, 1) if j != i)
        typ_s = "".join(_photo(ctx, j, typical=True) for j in _typical(ctx, s, 1))
        body.append([(str(r["rank"]), r["rank"]), photo, names.html(g), _num(r["p_given"], lambda v: _f(v, 3)),
                     typ_g, names.html(s), _num(r["p_suggested"], lambda v: _f(v, 3)), typ_s,
                     (str(r["fold"]), r["fold"])])
    return head + _table(["rank", "photo", "given label", "p(given)", "typical of given", "suggested",
                          "p(suggested)", "typical of suggested", "fold"], body, "sortable issues")


# ------------------------------------------------------------------------------------------------ files


def per_class_csv(path: Path, rows: list[dict], names: _Names) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["class", "photos", "accuracy", "log_loss", "mean_p_true", "most_often_mistaken_for", "times"])
    for r in rows:
        w.writerow([names.plain(r["class"]), r["support"], _f(r["accuracy"]), _f(r["log_loss"]), _f(r["p_true"]),
                    names.plain(r["wrong_class"]) if r["wrong_class"] >= 0 else "", r["wrong_count"]])
    atomic_write_text(path, buf.getvalue())


def label_issue_rows(oof: OofSet, issues: np.ndarray, suggested: np.ndarray, data_root: Path | None) -> list[dict]:
    disk = DataDisk(data_root) if data_root is not None and data_root.is_dir() else None
    out = []
    for rank, i in enumerate(issues.tolist()):
        g, s = int(oof.labels[i]), int(suggested[i])
        rel = str(oof.paths[i])
        file = disk.photo(rel) if disk is not None else None
        out.append({
            "rank": rank + 1, "row": i, "path": rel, "file": str(file) if file is not None and file.is_file() else "",
            "given": g, "suggested": s, "given_label": oof.merge.original[int(oof.original_labels[i])],
            "suggested_label": oof.classes[s], "p_given": float(oof.probs[i, g]),
            "p_suggested": float(oof.probs[i, s]), "fold": int(oof.folds[i]),
        })
    return out


def write_issues_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    cols = ["rank", "path", "given_label", "suggested_label", "p_given", "p_suggested", "fold", "file"]
    w.writerow(cols)
    for r in rows:
        w.writerow([r[c] if not isinstance(r[c], float) else f"{r[c]:.6f}" for c in cols])
    atomic_write_text(path, buf.getvalue())


def write_confusable(path: Path, oof: OofSet, cg: st.Groups, fg: st.Groups | None, features: np.ndarray | None,
                     source: str) -> None:
    """The suggested groups in merges.yaml's format (``carclf.data.merges.read_merges`` reads it). A model class
    that is already a merge of several names brings all of them, and existing merges no suggestion touches are kept,
    so the file can replace merges.yaml once a person has struck out what is not one car model."""
    lm = np.asarray(oof.merge.label_map)

    def expand(members: list[int]) -> list[str]:
        return [oof.merge.original[i] for c in members for i in np.where(lm == c)[0]] or [oof.classes[c]
                                                                                            for c in members]

    def q(name: str) -> str:
        return json.dumps(name, ensure_ascii=False)  # a JSON string is a YAML flow scalar

    soft = st.soft_confusion(oof.probs, oof.labels, len(oof.classes))
    lines = [
        f"# Confusable groups suggested by `carclf report` from {source} ({_now()}).",
        "# merges: classes the model confuses with one another (agglomerative clustering, average linkage, of the",
        f"# symmetrised soft confusion; distance 1 - 2s, cut at {cg.cut:.2f}). Review every group: only classes that",
        "# really are one car model belong in DATA/merges.yaml. Groups merges.yaml already holds are kept, so this",
        "# file can replace it. feature_groups (not read by carclf): class centroids close in feature space.",
        "merges:",
    ]
    covered: set[int] = set()
    for n, (members, d) in enumerate(zip(cg.groups, cg.distances, strict=True)):
        covered.update(members)
        s = soft[np.ix_(members, members)]
        rate = float((s.sum() - np.trace(s)) / max(len(members) * (len(members) - 1), 1))
        lines.append(f"  - [{', '.join(q(x) for x in expand(members))}]   # G{n + 1}: distance {d:.3f}, "
                     f"mean probability swapped {100 * rate:.1f}%")
    for c in range(len(oof.classes)):
        if c not in covered and (lm == c).sum() > 1:
            lines.append(f"  - [{', '.join(q(x) for x in expand([c]))}]   # already merged (merges.yaml)")
    if len(lines) == 6:
        lines[-1] = "merges: []"
    if fg is not None and fg.groups:
        lines.append("feature_groups:")
        for members, d in zip(fg.groups, fg.distances, strict=True):
            lines.append(f"  - [{', '.join(q(x) for x in expand(members))}]   # distance {d:.3f}")
    atomic_write_text(path, "\n".join(lines) + "\n")
