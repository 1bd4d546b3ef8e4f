"""The error-analysis report (carclf report): its figures on synthetic out-of-fold rows with planted look-alike
classes and wrong labels, and the page of a tiny trained run in headless Chromium."""

from __future__ import annotations

import csv
import shutil
import sys

import numpy as np
import pytest
import yaml
from sklearn.metrics import accuracy_score, log_loss, top_k_accuracy_score

from carclf.analyze import report_stats as st
from carclf.artifacts.oof import OofSet
from carclf.data.merges import identity, read_merges
from carclf.errors import CarclfError
from carclf.metrics import softmax

LOOKALIKE = (2, 5)  # two classes the synthetic model cannot tell apart, and whose features share one centre


def synthetic_oof(n_classes: int = 9, per_class: int = 40, n_wrong: int = 8, seed: int = 0,
                  twins: bool = True) -> tuple[OofSet, dict]:
    """Out-of-fold rows of a fair model: confident on the photo's real class, torn between the two look-alike classes
    (``twins``), and ``n_wrong`` photos filed under a wrong class (the model still sees their real class)."""
    rng = np.random.default_rng(seed)
    real = np.repeat(np.arange(n_classes), per_class)
    n = len(real)
    labels = real.copy()
    wrong = rng.choice(np.where(~np.isin(real, LOOKALIKE))[0], n_wrong, replace=False)
    for i in wrong:  # filed under another class that is not a look-alike either
        labels[i] = rng.choice([c for c in range(n_classes) if c != real[i] and c not in LOOKALIKE])
    logits = rng.normal(0, 0.5, (n, n_classes))
    logits[np.arange(n), real] += 6 + rng.normal(0, 0.3, n)
    logits[wrong, real[wrong]] += 1.5  # clear cases: the model is as sure of their real class as of its best photos
    a, b = LOOKALIKE
    if twins:
        both = np.isin(real, LOOKALIKE)
        logits[both, a] = logits[both, b] = 6 + rng.normal(0, 0.5, (both.sum(),))
        logits[both, a] += rng.normal(0, 0.7, both.sum())
    centres = rng.normal(0, 1, (n_classes, 32))
    centres[b] = centres[a] + rng.normal(0, 0.05, 32)
    features = (centres[real] + rng.normal(0, 0.3, (n, 32))).astype(np.float32)
    folds = rng.integers(0, 2, n)
    temps = {0: 1.1, 1: 0.9}
    probs = np.vstack([softmax(logits[i : i + 1], temps[int(folds[i])]) for i in range(n)])
    classes = [f"class {c}" for c in range(n_classes)]
    oof = OofSet(
        source="synthetic", classes=classes, merge=identity(classes),
        paths=np.array([f"train/{classes[labels[i]]}/{i:04d}.jpg" for i in range(n)]), labels=labels,
        original_labels=labels.copy(), folds=folds, probs_raw=softmax(logits), probs=probs, features=features,
        temperatures=temps, eps=1e-15,
    )
    return oof, {"wrong": np.sort(wrong), "real": real}


# ------------------------------------------------------------------------------------------------ figures


def test_headline_scores_equal_scikit_learn():
    oof, _ = synthetic_oof()
    rows = st.headline_rows(oof.probs_raw, oof.probs, oof.labels, oof.original_labels, oof.folds, oof.merge,
                            oof.eps, oof.temperatures)
    assert {(r["fold"], r["probs"]) for r in rows} == {(f, k) for f in ("0", "1", "all")
                                                       for k in ("raw", "calibrated")}
    k = np.arange(len(oof.classes))
    for r in rows:
        m = np.ones(len(oof), bool) if r["fold"] == "all" else oof.folds == int(r["fold"])
        p = (oof.probs_raw if r["probs"] == "raw" else oof.probs)[m]
        y = oof.labels[m]
        assert r["n"] == m.sum()
        assert r["log_loss"] == pytest.approx(log_loss(y, p, labels=k), rel=1e-9)
        assert r["accuracy"] == pytest.approx(accuracy_score(y, p.argmax(axis=1)))
        assert r["top5"] == pytest.approx(top_k_accuracy_score(y, p, k=5, labels=k))
        srt = np.sort(p, axis=1)
        assert r["confidence"] == pytest.approx(srt[:, -1].mean())
        assert r["gap"] == pytest.approx((srt[:, -1] - srt[:, -2]).mean())
        assert r["entropy"] == pytest.approx(-(p * np.log(p)).sum(axis=1).mean())
        # No merged classes and no clipping to speak of: the submission's log loss is the model's.
        assert r["log_loss_submitted"] == pytest.approx(r["log_loss"], rel=1e-9)
    cal0 = next(r for r in rows if r["fold"] == "0" and r["probs"] == "calibrated")
    assert cal0["temperature"] == 1.1


def test_headline_refuses_probabilities_with_nan():
    """What predict refuses to write (NaN, infinity) the report refuses to score, naming the cause."""
    oof, _ = synthetic_oof()
    broken = oof.probs.copy()
    broken[3, 0] = np.nan
    with pytest.raises(CarclfError, match="NaN or infinity"):
        st.headline_rows(oof.probs_raw, broken, oof.labels, oof.original_labels, oof.folds, oof.merge, oof.eps,
                         oof.temperatures)


def test_plot_aliases_come_from_prepares_classes_csv(tmp_path):
    from carclf.analyze.report_plots import read_aliases
    from carclf.data.names import class_aliases, write_classes_csv

    names = ["그랜저_6세대", "싼타페_TM"]
    path = tmp_path / "classes.csv"
    write_classes_csv(path, names)
    text = path.read_text(encoding="utf-8").replace(class_aliases(names)[names[0]], "grandeur_six")
    path.write_text(text, encoding="utf-8")  # an alias a person edited is what the plots show
    assert read_aliases(path, names) == {names[0]: "grandeur_six", names[1]: class_aliases(names)[names[1]]}
    path.write_bytes(b"index,name,alias\nx,\xff\xfe,bad\n")  # damaged: the aliases made by the same rule
    assert read_aliases(path, names) == class_aliases(names)
    assert read_aliases(None, names) == class_aliases(names)


def test_log_loss_shares_add_up_and_bins_count_every_photo():
    oof, _ = synthetic_oof()
    bins = st.confidence_bins(oof.probs, oof.labels)
    assert sum(b["n"] for b in bins) == len(oof)
    assert sum(b["loss_share"] for b in bins) == pytest.approx(1.0)
    nll = -np.log(oof.probs[np.arange(len(oof)), oof.labels])
    top = max(bins, key=lambda b: b["loss_share"])
    m = (oof.probs.max(axis=1) > top["lo"]) & (oof.probs.max(axis=1) <= top["hi"])
    assert top["loss_share"] == pytest.approx(nll[m].sum() / nll.sum())


def test_per_class_table_names_the_look_alike_as_the_usual_mistake():
    oof, _ = synthetic_oof()
    rows = {r["class"]: r for r in st.per_class(oof.probs, oof.labels, len(oof.classes))}
    a, b = LOOKALIKE
    assert rows[a]["wrong_class"] == b
    assert rows[b]["wrong_class"] == a
    worst = [r["class"] for r in st.worst_first(list(rows.values()))[:2]]
    assert set(worst) == set(LOOKALIKE)
    pairs = st.confused_pairs(oof.probs, oof.labels, len(oof.classes))
    assert (pairs[0]["a"], pairs[0]["b"]) == LOOKALIKE


def test_clustering_puts_the_look_alikes_in_one_group():
    oof, _ = synthetic_oof()
    for groups in (st.confusion_groups(oof.probs, oof.labels, len(oof.classes)),
                   st.feature_groups(oof.features, oof.labels, len(oof.classes))):
        assert groups.groups[0] == list(LOOKALIKE), groups.method
        assert groups.label[LOOKALIKE[0]] == groups.label[LOOKALIKE[1]]
        # Every other class stays alone: none of them looks like another.
        assert all(set(g) <= set(LOOKALIKE) for g in groups.groups), groups.method
    scores = st.group_scores(oof.probs, oof.labels,
                             st.confusion_groups(oof.probs, oof.labels, len(oof.classes)).label)
    assert scores["accuracy"] > accuracy_score(oof.labels, oof.probs.argmax(axis=1))


def test_confusable_yaml_is_a_usable_merges_file(tmp_path):
    """With 'class 9' already merged into 'class 2', the suggested group of the look-alikes brings both names, and
    the file passes the same validation as DATA/merges.yaml."""
    from carclf.analyze.report import write_confusable
    from carclf.data.merges import build_merge_map

    oof, _ = synthetic_oof()
    original = [f"class {c}" for c in range(10)]
    oof.merge = build_merge_map(original, [["class 2", "class 9"]])
    assert oof.merge.classes == oof.classes
    cg = st.confusion_groups(oof.probs, oof.labels, len(oof.classes))
    write_confusable(tmp_path / "confusable.yaml", oof, cg, None, None, "synthetic")
    groups = read_merges(tmp_path / "confusable.yaml")
    assert groups == [["class 2", "class 9", "class 5"]]
    merged = build_merge_map(original, groups)
    assert merged.label_map[5] == merged.label_map[2] == merged.label_map[9]


def test_an_ensembles_member_runs_are_found_for_their_curves(tmp_path):
    from carclf.analyze.report import member_runs

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / ".carclf-run").write_text("{}")
    ens = tmp_path / "ens"
    ens.mkdir()
    from carclf.artifacts.ensemble import FORMAT, KIND

    def write(members):  # ensemble.yaml as carclf ensemble writes it (members' runs relative to the folder)
        doc = {"kind": KIND, "format": FORMAT, "classes": [], "members": members, "space": "prob",
               "calibration": {"kind": "temperature"}, "eps": 1e-6}
        (ens / "ensemble.yaml").write_text(yaml.safe_dump(doc))

    write([{"name": "a", "run": "../a", "folds": [0, 2]},
           {"name": "b", "run": "moved/b", "run_abs": str(tmp_path / "b")},  # found by its absolute path
           {"name": "gone", "run": "../gone"}])
    runs, note = member_runs(ens)
    assert runs == [tmp_path / "a", tmp_path / "b"]
    assert note == ""
    write([{"name": "gone", "run": "../gone"}])
    runs, note = member_runs(ens)
    assert runs == []
    assert "could not be found" in note


@pytest.mark.parametrize("method", ["cleanlab", "by hand"])
def test_planted_wrong_labels_are_found(method, monkeypatch):
    oof, truth = synthetic_oof(twins=False)  # look-alike photos are ambiguous, and rightly flagged too
    if method == "by hand":
        monkeypatch.setitem(sys.modules, "cleanlab.filter", None)  # as if cleanlab were not installed
    else:
        pytest.importorskip("cleanlab")
    found, used = st.find_label_issues(oof.probs, oof.labels)
    assert ("by hand" in used) if method == "by hand" else used.startswith("cleanlab")
    assert set(truth["wrong"]) <= set(found.tolist())
    assert len(found) <= len(truth["wrong"]) + 2  # hardly any correct label flagged
    suggested = st.suggested_labels(oof.probs, oof.labels)
    assert (suggested[truth["wrong"]] == truth["real"][truth["wrong"]]).all()


def test_plots_fall_back_to_ascii_aliases_without_a_hangul_font(monkeypatch):
    from matplotlib import font_manager

    from carclf.analyze.report_plots import PlotNames, find_hangul_font
    from carclf.data.names import class_aliases

    names = ["아반떼_CN7_2021_2023", "K5_3세대_2020_2023"]
    aliases = class_aliases(names)
    assert PlotNames(names, aliases, None)(0) == aliases[names[0]]
    assert aliases[names[0]].isascii()
    assert PlotNames(names, aliases, "NanumGothic")(0) == names[0]
    assert PlotNames(["Audi A5 Coupe 2012"], {}, None)(0) == "Audi A5 Coupe 2012"
    # A font that calls itself NanumGothic but has no Hangul glyphs (DejaVu's file) is not used: no empty boxes.
    dejavu = font_manager.findfont("DejaVu Sans")
    fake = font_manager.FontEntry(fname=dejavu, name="NanumGothic")
    monkeypatch.setattr(font_manager.fontManager, "ttflist", [fake])
    assert find_hangul_font() is None


# ------------------------------------------------------------------------------------------------ a trained run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, synth_data):
    from carclf.config import load_config
    from carclf.train.loop import train
    from tests.conftest import tiny_overrides

    out = tmp_path_factory.mktemp("report-runs")
    return train(load_config(None, tiny_overrides(synth_data, out, **{"train.folds": "all"})))


@pytest.fixture(scope="module")
def report(tiny_run, tmp_path_factory):
    from carclf.cli import main

    out = tmp_path_factory.mktemp("report") / "rep"
    assert main(["report", str(tiny_run), "-o", str(out)]) == 0
    return out


@pytest.mark.slow
def test_report_page_opens_in_chromium(report, tmp_path):
    from tests.browser import chromium_page

    with chromium_page(1280, 900) as (page, errors):
        page.goto((report / "report.html").as_uri())
        page.wait_for_load_state("load")
        for section in ("headline", "calibration", "classes", "pairs", "embedding", "groups", "label-issues"):
            assert page.locator(f"#{section}").count() == 1, section
        # Thumbnails load lazily: load them all, then list any that failed.
        broken = page.evaluate("""() => Promise.all(Array.from(document.images).map(i => {
            i.loading = 'eager';
            return i.complete ? null : new Promise(r => { i.onload = r; i.onerror = r; });
          })).then(() => Array.from(document.images).filter(i => i.naturalWidth === 0).map(i => i.getAttribute('src')))
        """)
        assert broken == []
        assert page.locator("img[src='embedding.png']").count() == 1
        assert page.locator("img[src^='thumbs/']").count() > 0
        assert page.locator("table.headline tbody tr").count() == 6  # 2 folds + all, raw and calibrated
        # The class table sorts by a clicked column: photos ascending, then descending.
        table = page.locator("#classes ~ table.sortable").first
        col = 2

        def column() -> list[float]:
            return [float(v) for v in table.locator(f"tbody tr td:nth-child({col + 1})").evaluate_all(
                "cells => cells.map(c => c.dataset.v)")]

        table.locator("thead th").nth(col).click()
        assert column() == sorted(column())
        table.locator("thead th").nth(col).click()
        assert column() == sorted(column(), reverse=True)
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        assert errors == []
    assert (tmp_path / "report.png").stat().st_size > 10_000


@pytest.mark.slow
def test_report_files_a_person_acts_on(report, tiny_run):
    from carclf.artifacts.run import RunDir

    classes = RunDir.open(tiny_run).read_meta()["classes"]
    groups = read_merges(report / "confusable.yaml")  # the merges.yaml format
    assert all(n in classes for g in groups for n in g)
    doc = yaml.safe_load((report / "confusable.yaml").read_text(encoding="utf-8"))
    assert "merges" in doc
    with open(report / "label_issues.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    with open(report / "label_issues.csv", encoding="utf-8") as fh:
        header = next(csv.reader(fh))
    assert header[:6] == ["rank", "path", "given_label", "suggested_label", "p_given", "p_suggested"]
    for r in rows:
        assert r["suggested_label"] in classes
        assert r["given_label"] != r["suggested_label"]
        assert r["path"].split("/")[-2] == r["given_label"]  # the folder the photo is filed under
        assert 0 <= float(r["p_given"]) <= 1
        assert 0 <= float(r["p_suggested"]) <= 1
    with open(report / "per_class.csv", encoding="utf-8") as fh:
        assert {r["class"] for r in csv.DictReader(fh)} == set(classes)


@pytest.mark.slow
def test_report_refuses_to_overwrite_without_the_flag(report, tiny_run, capsys):
    from carclf.cli import main

    before = (report / "report.html").stat().st_mtime_ns
    assert main(["report", str(tiny_run), "-o", str(report)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (report / "report.html").stat().st_mtime_ns == before
    mine = report / "notes.txt"
    mine.write_text("mine")
    try:
        assert main(["report", str(tiny_run), "-o", str(report), "--overwrite"]) == 2
        assert "notes.txt" in capsys.readouterr().err
        assert mine.read_text() == "mine"
        assert (report / "report.html").is_file()
    finally:
        mine.unlink()
    # A folder that is not a report is never written into.
    other = report.parent / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    assert main(["report", str(tiny_run), "-o", str(other), "--overwrite"]) == 2
    assert sorted(p.name for p in other.iterdir()) == ["keep.txt"]


def _copy_without_features(run, dest):
    shutil.copytree(run, dest)
    stored = {}
    for oof in dest.glob("fold*/oof.npz"):
        with np.load(oof) as z:
            arrays = {k: z[k] for k in z.files}
        stored[oof.parent.name] = arrays.pop("features")
        np.savez(oof, **arrays)  # as a run trained before features were kept
    return stored


@pytest.mark.slow
def test_features_are_computed_once_and_cached_for_older_runs(tiny_run, tmp_path):
    from carclf.analyze.report import write_report
    from carclf.artifacts.oof import load_oof

    old = tmp_path / "old"
    stored = _copy_without_features(tiny_run, old)
    oof = load_oof(old)
    assert oof.features is None
    logs: list[str] = []
    write_report(old, tmp_path / "rep", log=logs.append)
    with np.load(tmp_path / "rep" / "features.npz") as z:
        computed = z["features"].astype(np.float32)
    expected = np.concatenate([stored[f"fold{k}"] for k in sorted(set(oof.folds.tolist()))]).astype(np.float32)
    np.testing.assert_allclose(computed, expected, rtol=2e-2, atol=2e-2)  # same model, view and size; float16
    assert "embedding.png" in (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")
    logs.clear()
    write_report(old, tmp_path / "rep", overwrite=True, log=logs.append)
    assert any("from the cache" in m for m in logs)
    assert (tmp_path / "rep" / "features.npz").is_file()


@pytest.mark.slow
def test_missing_photos_are_named_in_the_page(tiny_run, tmp_path):
    from carclf.analyze.report import write_report

    moved = tmp_path / "moved"
    _copy_without_features(tiny_run, moved)
    cfg = yaml.safe_load((moved / "config.yaml").read_text(encoding="utf-8"))
    cfg["data"]["root"] = str(tmp_path / "gone")
    (moved / "config.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    page = write_report(moved, tmp_path / "rep").read_text(encoding="utf-8")
    assert "photos are not at data.root" in page
    assert "thumbs/" not in page
    assert "embedding.png" not in page
