"""The data-health report: one HTML page with PNG plots and JPEG thumbnails written beside it.

Plots label classes with their ASCII aliases (a missing CJK font would turn Hangul into boxes); the HTML shows the
original names, escaped. matplotlib is imported here only, and drawn through ``Figure`` (Agg) without pyplot, so no
global backend or display is touched.
"""

from __future__ import annotations

import html
from collections import Counter
from pathlib import Path

import numpy as np

from carclf.artifacts.photos import DataDisk
from carclf.data.dedup import DupGroup, hamming, near_pairs, nearest_distances, phash_array
from carclf.data.imageio import load_rgb
from carclf.data.prepare import Prepared
from carclf.io import atomic_write, atomic_write_text

MAX_GROUPS = 100  # per section; the CSV files hold them all
MAX_MEMBERS = 8  # thumbnails per group
MAX_PAIRS = 60
BORDERLINE = 6  # list unmatched pairs up to threshold + this many bits
THUMB = 128

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ddd;padding:3px 6px;text-align:left;
vertical-align:top}th{background:#f3f3f3}.num{text-align:right}
.group{border:1px solid #ddd;margin:.5em 0;padding:.4em}.group .head{font-size:.85em;margin-bottom:.3em}
figure{display:inline-block;margin:2px 4px;font-size:.7em;max-width:140px;word-break:break-all;vertical-align:top}
figure img{display:block;max-width:128px;max-height:128px}.flag{background:#fde2e1;padding:0 4px;border-radius:3px}
.note{color:#555;font-size:.9em}
"""


class _Thumbs:
    """Small JPEGs in ``thumbs/``, named by the photo's SHA-1, so a changed photo gets a new thumbnail."""

    def __init__(self, folder: Path, disk: DataDisk, rows: dict[str, dict]):
        self.folder, self.disk, self.rows = folder, disk, rows
        folder.mkdir(parents=True, exist_ok=True)

    def src(self, rel: str) -> str:
        row = self.rows.get(rel)
        if row is None or row["status"] != "ok":
            return ""
        name = f"{row['sha1'][:20]}.jpg"
        out = self.folder / name
        if not out.is_file():
            try:
                img = load_rgb(self.disk.path(rel), target=THUMB // 2)
            except Exception:  # noqa: BLE001 - the photo changed or vanished since prepare; show no thumbnail
                return ""
            img.thumbnail((THUMB, THUMB))
            atomic_write(out, lambda fh: img.save(fh, "JPEG", quality=80), "wb")
        return f"{self.folder.name}/{name}"


def _e(text: object) -> str:
    return html.escape(str(text))


def _table(header: list[str] | None, rows: list[list[object]], raw: bool = False) -> str:
    """An HTML table; cells are escaped unless ``raw`` (then the caller escaped them)."""
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join(
        "<tr>" + "".join(f"<td>{c if raw else _e(c)}</td>" for c in r) + "</tr>" for r in rows
    )
    return f"<table>{head}{body}</table>"


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=100, bbox_inches="tight"), "wb")


# ------------------------------------------------------------------------------------------------------ plots


def _plot_classes(p: Prepared, path: Path) -> None:
    from matplotlib.figure import Figure

    train = [r for r in p.manifest if r["split"] == "train" and r["status"] == "ok" and r["class"]]
    n_all = Counter(r["class"] for r in train)
    n_used = Counter(r["class"] for r in train if r["path"] not in p.excluded)
    order = sorted(p.classes, key=lambda c: (n_all[c], c))
    if len(order) <= 60:
        fig = Figure(figsize=(8, 1 + 0.22 * len(order)))
        ax = fig.subplots()
        shown = order
    else:  # too many to label: the distribution, and the smallest classes by name
        fig = Figure(figsize=(13, 8))
        ax_hist, ax = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.3]})
        ax_hist.hist([n_all[c] for c in p.classes], bins=30, color="#4c72b0")
        ax_hist.set_xlabel("photos per class")
        ax_hist.set_ylabel("classes")
        ax_hist.set_title(f"{len(p.classes)} classes")
        shown = order[:40]
        ax.set_title("the 40 smallest classes")
    y = np.arange(len(shown))
    ax.barh(y, [n_all[c] for c in shown], color="#c8d4e8", label="readable")
    ax.barh(y, [n_used[c] for c in shown], color="#4c72b0", label="used for training")
    ax.set_yticks(y, [p.aliases.get(c, c) for c in shown], fontsize=7)
    ax.set_xlabel("photos")
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)


def _plot_sizes(p: Prepared, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5))
    ax, ax2 = fig.subplots(1, 2)
    for split, colour in (("train", "#4c72b0"), ("test", "#dd8452")):
        ok = [r for r in p.manifest if r["split"] == split and r["status"] == "ok"]
        if not ok:
            continue
        w = np.array([r["width"] for r in ok])
        h = np.array([r["height"] for r in ok])
        ax.scatter(w, h, s=4, alpha=0.3, color=colour, label=f"{split} ({len(ok)})", rasterized=True)
        ax2.hist(np.minimum(w, h), bins=40, alpha=0.6, color=colour, label=split)
    ax.set_xlabel("width (px, as displayed)")
    ax.set_ylabel("height (px)")
    ax.set_title("photo sizes")
    ax.legend(fontsize=8)
    ax2.set_xlabel("shorter side (px)")
    ax2.set_ylabel("photos")
    ax2.set_title("shorter side")
    ax2.legend(fontsize=8)
    _save(fig, path)


def _plot_nearest(nn: np.ndarray, threshold: int, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.5))
    ax = fig.subplots()
    ax.hist(nn, bins=np.arange(0, 34) - 0.5, color="#4c72b0")
    ax.axvline(threshold + 0.5, color="#c44e52", linestyle="--", label=f"near-duplicate threshold ({threshold})")
    ax.set_yscale("log")
    ax.set_xlabel("phash distance to the closest other photo (bits of 64)")
    ax.set_ylabel("photos")
    ax.legend(fontsize=8)
    _save(fig, path)


# ------------------------------------------------------------------------------------------------------ HTML


def _fig(th: _Thumbs, rel: str, caption: str) -> str:
    src = th.src(rel)
    img = f'<img src="{_e(src)}" alt="{_e(rel)}" loading="lazy">' if src else "<div>(no preview)</div>"
    return f"<figure>{img}<figcaption>{caption}</figcaption></figure>"


def _flags(g: DupGroup) -> str:
    out = []
    if g.within_class:
        out.append("within class")
    if g.cross_class:
        out.append('<span class="flag">cross-class (label conflict)</span>')
    if g.train_test:
        out.append('<span class="flag">train/test (leak)</span>')
    return ", ".join(out) or "test only"


def _group_html(g: DupGroup, th: _Thumbs, excluded: dict[str, str]) -> str:
    figs = []
    for m in g.members[:MAX_MEMBERS]:
        label = f"{_e(m.id)} (test)" if m.split == "test" else _e(m.cls)
        state = " <b>excluded</b>" if m.path in excluded else ""
        figs.append(_fig(th, m.path, f"{_e(m.path)}<br>{label}<br>d={m.distance}{state}"))
    extra = len(g.members) - MAX_MEMBERS
    more = f"<div class='note'>... and {extra} more</div>" if extra > 0 else ""
    head = f"group {g.id} ({g.kind}, {len(g.members)} photos): {_flags(g)}"
    return f"<div class='group'><div class='head'>{head}</div>{''.join(figs)}{more}</div>"


def _groups_section(title: str, groups: list[DupGroup], th: _Thumbs, excluded: dict[str, str], note: str) -> str:
    if not groups:
        return f"<h2>{_e(title)}</h2><p>None.</p>"
    shown = "".join(_group_html(g, th, excluded) for g in groups[:MAX_GROUPS])
    more = f"<p class='note'>{len(groups) - MAX_GROUPS} more in duplicates.csv.</p>" if len(groups) > MAX_GROUPS else ""
    return f"<h2>{_e(title)} ({len(groups)})</h2><p class='note'>{note}</p>{shown}{more}"


def _pairs_section(title: str, pairs: list[tuple[str, str, int]], th: _Thumbs, rows: dict[str, dict], note: str) -> str:
    if not pairs:
        return f"<h2>{_e(title)}</h2><p class='note'>{note}</p><p>None.</p>"
    body = []
    for a, b, d in pairs[:MAX_PAIRS]:
        ca = [_fig(th, x, f"{_e(x)}<br>{_e(rows[x]['class'] or rows[x]['id'])}") for x in (a, b)]
        body.append(f"<div class='group'><div class='head'>distance {d}</div>{''.join(ca)}</div>")
    more = f"<p class='note'>{len(pairs) - MAX_PAIRS} more not shown.</p>" if len(pairs) > MAX_PAIRS else ""
    return f"<h2>{_e(title)} ({len(pairs)})</h2><p class='note'>{note}</p>{''.join(body)}{more}"


def write_report(prepared: Prepared, data_root: Path | str, out_html: Path | str) -> Path:
    """Write the data-health report to ``out_html`` (PNG plots and ``thumbs/`` beside it) and return its path."""
    p = prepared
    out_html = Path(out_html)
    folder = out_html.parent
    folder.mkdir(parents=True, exist_ok=True)
    stem = out_html.stem
    rows = {r["path"]: r for r in p.manifest}
    th = _Thumbs(folder / "thumbs", DataDisk(data_root), rows)
    ok = [r for r in p.manifest if r["status"] == "ok"]
    hashes = phash_array([r["phash"] for r in ok])
    plots = {"classes": f"{stem}_classes.png", "sizes": f"{stem}_sizes.png", "nearest": f"{stem}_nearest.png"}
    _plot_classes(p, folder / plots["classes"])
    _plot_sizes(p, folder / plots["sizes"])
    _plot_nearest(nearest_distances(hashes) if len(ok) > 1 else np.array([64]), p.threshold, folder / plots["nearest"])
    joined, borderline = _near_pairs(p, ok, hashes)

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>carclf prepare report</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>Data health: {_e(p.summary.get('data_root', data_root))}</h1>",
             _summary_html(p), _overview_html(p, ok, plots)]
    exact = [g for g in p.groups if g.kind == "exact"]
    near = [g for g in p.groups if g.kind == "near"]
    parts.append(_groups_section("Exact duplicate groups", exact, th, p.excluded,
                                 "Same bytes or same decoded pixels. d = phash distance to the first photo."))
    parts.append(_groups_section("Near-duplicate groups", near, th, p.excluded,
                                 f"Perceptual hashes within {p.threshold} bits: re-encoded, resized or lightly edited "
                                 "copies. Check that each group really is one photo."))
    parts.append(_pairs_section("Near-duplicate pairs", joined, th, rows,
                                "Each pair the threshold joined (not pixel-identical), largest distance first: if a "
                                "pair is two different photos, lower near_threshold."))
    parts.append(_pairs_section(
        f"Pairs just above the threshold ({p.threshold + 1}-{p.threshold + BORDERLINE} bits, not grouped)",
        borderline, th, rows,
        "Closest first. Mostly look-alike photos; if many are copies (e.g. crops), raise near_threshold."))
    conflicts = [g for g in p.groups if g.cross_class]
    parts.append(_groups_section("Label conflicts (same photo under different classes)", conflicts, th, p.excluded,
                                 "Decide which class is right and move or delete the other copies; with "
                                 "cross_class='exclude' they are left out of training meanwhile."))
    parts += [_leaks_html(p, th, rows), _quarantine_html(p), "</body></html>\n"]
    atomic_write_text(out_html, "\n".join(parts))
    return out_html


def _near_pairs(p: Prepared, ok: list[dict], hashes: np.ndarray) -> tuple[list, list]:
    """(joined, borderline) pairs of photo paths with their distance. Joined: within near groups, every pair the
    threshold joined (what a person should confirm); borderline: pairs just above the threshold in different groups
    (what a person might want joined)."""
    group_id = {m.path: g.id for g in p.groups for m in g.members}
    ii, jj, dd = near_pairs(hashes, p.threshold + BORDERLINE)
    near_kind = {g.id for g in p.groups if g.kind == "near"}
    joined, borderline = [], []
    for i, j, d in zip(ii, jj, dd, strict=True):
        a, b = ok[i], ok[j]
        same = group_id.get(a["path"], -1) == group_id.get(b["path"], -2)
        if same and group_id[a["path"]] in near_kind and d <= p.threshold and a["pixel_hash"] != b["pixel_hash"]:
            joined.append((a["path"], b["path"], int(d)))
        elif not same and d > p.threshold:
            borderline.append((a["path"], b["path"], int(d)))
    joined.sort(key=lambda t: (-t[2], t[0]))
    borderline.sort(key=lambda t: (t[2], t[0]))
    return joined, borderline


def _summary_html(p: Prepared) -> str:
    """The counts table of summary.json, and the classes left without a usable photo."""
    s = p.summary
    c = s.get("counts", {})
    summary_rows = [
        ["files", c.get("files")], ["train files / test files", f"{c.get('train_files')} / {c.get('test_files')}"],
        ["classes", c.get("classes")], ["bad files (train / test)", f"{c.get('bad_train')} / {c.get('bad_test')}"],
        ["duplicate groups (exact / near)", f"{c.get('exact_groups')} / {c.get('near_groups')}"],
        ["within-class / cross-class / train-test groups",
         f"{c.get('within_class_groups')} / {c.get('cross_class_groups')} / {c.get('train_test_groups')}"],
        ["training files excluded (bad / duplicate / conflict)",
         f"{c.get('excluded')} ({c.get('excluded_bad')} / {c.get('excluded_duplicate')} / "
         f"{c.get('excluded_conflict')})"],
        ["training files used", c.get("used_train")],
        ["near-duplicate threshold (phash bits of 64)", p.threshold],
        ["policies", f"within_class={s.get('within_class')}, cross_class={s.get('cross_class')}"],
        ["reading speed",
         f"{s.get('images_per_s')} images/s ({s.get('n_probed')} read, {s.get('n_reused')} unchanged)"],
    ]
    out = _table(None, [[k, "" if v is None else v] for k, v in summary_rows])
    if s.get("empty_classes"):
        out += f"\n<p class='flag'>Classes with no usable photo: {_e(', '.join(s['empty_classes']))}</p>"
    return out


def _overview_html(p: Prepared, ok: list[dict], plots: dict[str, str]) -> str:
    """Images per class (plot and table), photo sizes and the distances to the closest other photo."""
    n_all = Counter(r["class"] for r in ok if r["split"] == "train")
    n_used = Counter(r["class"] for r in ok if r["split"] == "train" and r["path"] not in p.excluded)
    class_rows = [[i, _e(name), _e(p.aliases.get(name, "")), n_all[name], n_used[name]]
                  for i, name in enumerate(p.classes)]
    return "\n".join([
        f"<h2>Images per class</h2><img src='{plots['classes']}' alt='images per class'>",
        "<details><summary>all classes</summary>"
        + _table(["index", "name", "alias", "readable", "used"], class_rows, raw=True) + "</details>",
        f"<h2>Photo sizes</h2><img src='{plots['sizes']}' alt='photo sizes'>",
        "<h2>Closest other photo</h2><p class='note'>A gap between the bars left of the threshold line "
        "(copies) and the bulk (distinct photos) means the threshold separates them.</p>"
        f"<img src='{plots['nearest']}' alt='nearest distances'>",
    ])


def _leaks_html(p: Prepared, th: _Thumbs, rows: dict[str, dict]) -> str:
    """Test photos that are also in train, beside their train copies."""
    leak_html = []
    for g in (g for g in p.groups if g.train_test):
        for t in g.test:
            dists = [int(hamming(int(rows[t.path]["phash"], 16), int(rows[m.path]["phash"], 16))) for m in g.train]
            classes = sorted({m.cls for m in g.train})
            train_figs = "".join(_fig(th, m.path, f"{_e(m.path)}<br>{_e(m.cls)}") for m in g.train[:MAX_MEMBERS])
            leak_html.append([_e(t.id), _fig(th, t.path, _e(t.path)), train_figs, _e(" | ".join(classes)),
                              str(min(dists))])
    return (f"<h2>Train/test leaks ({len(leak_html)})</h2><p class='note'>Test photos that are also in train "
            "(leaks.csv): their label is known, and validation scores on such photos overstate the model.</p>"
            + (_table(["test ID", "test photo", "train copies", "train classes", "distance"], leak_html, raw=True)
               if leak_html else "<p>None.</p>"))


def _quarantine_html(p: Prepared) -> str:
    quarantine = [[r["path"], r["split"], r["class"], r["excluded"] or r["error"]]
                  for r in p.manifest if r["status"] != "ok" or (r["split"] == "train" and r["path"] in p.excluded)]
    return (f"<h2>Quarantined files ({len(quarantine)})</h2><p class='note'>Left out of training "
            "(quarantine.csv); unreadable test files cannot be predicted from the photo.</p>"
            + (_table(["path", "split", "class", "reason"], quarantine) if quarantine else "<p>None.</p>"))
