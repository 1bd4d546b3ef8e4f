"""The error-analysis report's plots (matplotlib, through ``Figure`` without pyplot: no global backend touched).

Class names in plots: a font with Hangul where one is installed (Noto Sans CJK, Nanum, ...), verified to hold the
glyphs; otherwise each class's ASCII alias (``classes.csv``), so a plot never shows empty boxes.
"""

from __future__ import annotations

import re
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np

from carclf.analyze.prepare_report import _save
from carclf.analyze.report_stats import Groups

# Family names of common fonts with Hangul, tried first; any other installed font whose name says CJK/KR is tried
# after them. Each is checked for the glyphs themselves before it is used.
HANGUL_FONTS = ("Noto Sans CJK KR", "Noto Sans CJK JP", "Noto Sans CJK SC", "Noto Sans KR", "Noto Serif CJK KR",
                "NanumGothic", "NanumBarunGothic", "Nanum Gothic", "Malgun Gothic", "Apple SD Gothic Neo",
                "AppleGothic", "Source Han Sans KR", "Source Han Sans", "UnDotum", "Baekmuk Gulim", "Gulim")
_HANGUL = re.compile(r"[\u1100-\u11ff\u3130-\u318f\uac00-\ud7a3]")
_PROBE = "가나다한글"


def _has_glyphs(path: str, text: str = _PROBE) -> bool:
    try:
        from matplotlib.ft2font import FT2Font

        font = FT2Font(path)
        return all(font.get_char_index(ord(ch)) != 0 for ch in text)
    except Exception:  # noqa: BLE001 - an unreadable font file simply does not count
        return False


def find_hangul_font() -> str | None:
    """The family name of an installed font that draws Hangul, or None."""
    from matplotlib import font_manager

    fonts = font_manager.fontManager.ttflist
    by_name: dict[str, list[str]] = {}
    for f in fonts:
        by_name.setdefault(f.name, []).append(f.fname)
    candidates = [n for n in HANGUL_FONTS if n in by_name]
    candidates += sorted(n for n in by_name if n not in candidates and re.search(r"CJK|KR\b|Korean|Hangul|Nanum", n))
    for name in candidates:
        if any(_has_glyphs(p) for p in by_name[name]):
            return name
    return None


class PlotNames:
    """How plots label classes: the names themselves when they are ASCII or a Hangul font is installed, else the
    ASCII aliases."""

    def __init__(self, names: list[str], aliases: dict[str, str], font: str | None) -> None:
        self.names, self.aliases, self.font = names, aliases, font
        self.use_names = font is not None or not any(_HANGUL.search(n) or not n.isascii() for n in names)

    def __call__(self, c: int) -> str:
        name = self.names[c]
        return name if self.use_names else self.aliases.get(name, name)

    @contextmanager
    def style(self):
        """matplotlib settings for one plot: the Hangul font first, DejaVu Sans behind it for other glyphs."""
        import matplotlib

        rc = {"font.family": [self.font, "DejaVu Sans"]} if self.font else {}
        with matplotlib.rc_context(rc):
            yield


def read_aliases(classes_csv: Path | None, names: list[str]) -> dict[str, str]:
    """{name: ASCII alias} from prepare's ``classes.csv`` where it exists, else made by the same rule
    (carclf.data.names)."""
    from carclf.data.names import class_aliases, read_classes_csv

    aliases = class_aliases(names)
    if classes_csv is not None and classes_csv.is_file():
        # A damaged classes.csv (a bad index, not UTF-8): the aliases made here follow the same rule.
        with suppress(OSError, KeyError, ValueError):
            aliases.update({name: alias for name, alias in read_classes_csv(classes_csv)[1].items() if alias})
    return aliases


# ------------------------------------------------------------------------------------------------ plots


def plot_curves(curves: list[tuple[str, list[dict]]], path: Path) -> bool:
    """Learning curves, one line per fold: train and validation log loss, validation accuracy."""
    from matplotlib.figure import Figure

    curves = [(name, rows) for name, rows in curves if rows]
    if not curves:
        return False
    fig = Figure(figsize=(11, 3.8))
    ax_loss, ax_acc = fig.subplots(1, 2)
    colours = [f"C{i % 10}" for i in range(len(curves))]
    for (name, rows), colour in zip(curves, colours, strict=True):
        ep = [r["epoch"] for r in rows]
        if any("train_loss" in r for r in rows):
            ax_loss.plot(ep, [r.get("train_loss", np.nan) for r in rows], "--", color=colour, alpha=0.7)
        ax_loss.plot(ep, [r.get("val_log_loss", np.nan) for r in rows], "-o", ms=3, color=colour, label=name)
        ax_acc.plot(ep, [r.get("val_accuracy", np.nan) for r in rows], "-o", ms=3, color=colour, label=name)
    ax_loss.set_title("log loss (solid: validation, dashed: training)")
    ax_acc.set_title("validation accuracy")
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=7)
    _save(fig, path)
    return True


def plot_calibration(raw_bins: list[dict], cal_bins: list[dict], path: Path) -> None:
    """Reliability diagram (raw and calibrated), confidence histogram, and each bin's share of the log loss."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 4))
    ax_rel, ax_hist, ax_share = fig.subplots(1, 3)
    centres = np.array([(b["lo"] + b["hi"]) / 2 for b in cal_bins])
    width = cal_bins[0]["hi"] - cal_bins[0]["lo"]
    ax_rel.plot([0, 1], [0, 1], ":", color="grey")
    for bins, label, colour in ((raw_bins, "raw", "#dd8452"), (cal_bins, "calibrated", "#4c72b0")):
        m = np.array([b["n"] > 0 for b in bins])
        ax_rel.plot(np.array([b["confidence"] for b in bins])[m], np.array([b["accuracy"] for b in bins])[m],
                    "-o", ms=3, color=colour, label=label)
    ax_rel.set_xlabel("confidence (top-1 probability)")
    ax_rel.set_ylabel("accuracy")
    ax_rel.set_title("reliability")
    ax_rel.legend(fontsize=8)
    for bins, label, colour in ((raw_bins, "raw", "#dd8452"), (cal_bins, "calibrated", "#4c72b0")):
        ax_hist.bar(centres, [b["n"] for b in bins], width=width * 0.9, alpha=0.5, color=colour, label=label)
    ax_hist.set_xlabel("confidence")
    ax_hist.set_ylabel("photos")
    ax_hist.set_title("confidence histogram")
    ax_hist.legend(fontsize=8)
    ax_share.bar(centres, [100 * b["loss_share"] for b in cal_bins], width=width * 0.9, color="#c44e52")
    ax_share.set_xlabel("confidence (calibrated)")
    ax_share.set_ylabel("% of the total log loss")
    ax_share.set_title("where the log loss comes from")
    for ax in (ax_rel, ax_hist, ax_share):
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
    _save(fig, path)


def plot_worst_classes(rows: list[dict], names: PlotNames, path: Path, top: int = 20) -> None:
    """Mean log loss of the worst classes, with their accuracy."""
    from matplotlib.figure import Figure

    rows = [r for r in rows if r["support"] > 0][:top]
    with names.style():
        fig = Figure(figsize=(9, 1 + 0.28 * len(rows)))
        ax = fig.subplots()
        y = np.arange(len(rows))[::-1]
        ax.barh(y, [r["log_loss"] for r in rows], color="#c44e52")
        ax.set_yticks(y, [f"{names(r['class'])}  ({100 * r['accuracy']:.0f}%)" for r in rows], fontsize=7)
        ax.set_xlabel("mean log loss of the class's photos (accuracy in brackets)")
        ax.set_title(f"the {len(rows)} worst classes")
        ax.grid(axis="x", alpha=0.3)
        _save(fig, path)


def plot_embedding(xy: np.ndarray, labels: np.ndarray, wrong: np.ndarray, groups: Groups, names: PlotNames,
                   path: Path, top: int = 12) -> None:
    """t-SNE map of the photos, coloured by the confusable group of their given class (the ``top`` largest groups;
    the rest grey); misclassified photos drawn as crosses."""
    import matplotlib
    from matplotlib.figure import Figure

    with names.style():
        fig = Figure(figsize=(11, 9))
        ax = fig.subplots()
        gid = groups.label[labels]
        # The largest groups get colours; each keeps its number from the report's table (G1: the closest).
        top_idx = sorted(sorted(range(len(groups.groups)), key=lambda i: -len(groups.groups[i]))[:top])
        shown = [groups.label[groups.groups[i][0]] for i in top_idx]
        rest = ~np.isin(gid, shown)
        ax.scatter(xy[rest & ~wrong, 0], xy[rest & ~wrong, 1], s=3, color="#c8c8c8", rasterized=True)
        ax.scatter(xy[rest & wrong, 0], xy[rest & wrong, 1], s=8, color="#a0a0a0", marker="x", lw=0.6,
                   rasterized=True)
        tab20 = matplotlib.colormaps["tab20"]
        colours = [tab20(2 * i) for i in range(10)] + [tab20(2 * i + 1) for i in range(10)]
        for j, (i, g) in enumerate(zip(top_idx, shown, strict=True)):
            m = gid == g
            members = groups.groups[i]
            label = " / ".join(names(c) for c in members[:3]) + (" ..." if len(members) > 3 else "")
            ax.scatter(xy[m & ~wrong, 0], xy[m & ~wrong, 1], s=8, color=colours[j % 20],
                       label=f"G{i + 1}: {label[:70]}", rasterized=True)
            ax.scatter(xy[m & wrong, 0], xy[m & wrong, 1], s=18, color=colours[j % 20], marker="x", lw=0.8,
                       rasterized=True)
            if m.any():
                ax.annotate(f"G{i + 1}", xy[m].mean(axis=0), fontsize=9, weight="bold")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title("out-of-fold photos, t-SNE of penultimate features (x: misclassified)")
        if shown:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), markerscale=2)
        _save(fig, path)
