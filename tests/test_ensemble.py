"""carclf ensemble: weights, spaces, TTA and calibration chosen on cross-validated out-of-fold evidence; the
Predictor and predict/evaluate on an ensemble folder."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from carclf.data.merges import build_merge_map, identity
from carclf.ensemble import fit as F
from carclf.errors import CarclfError
from carclf.metrics import combine, nll, softmax
from tests.conftest import tiny_overrides

C = 8  # classes of the synthetic problems


def _member(y, alpha, rng, noise=1.0, scale=1.0):
    """Logits that put ``alpha`` extra on the true class over N(0, noise) noise: larger alpha, better member."""
    z = rng.normal(0, noise, (len(y), C))
    z[np.arange(len(y)), y] += alpha
    return (z * scale).astype(np.float32)


def _problem(logits: list[dict[str, np.ndarray]], y, groups=None, names=None):
    classes = [f"c{i}" for i in range(C)]
    n = len(logits)
    return F.Problem(names or [f"m{i}" for i in range(n)], y, np.arange(len(y)) % 5 if groups is None else groups,
                     [identity(classes)] * n, [y] * n, logits)


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(0)


# ------------------------------------------------------------------------------------------- weights and spaces
@pytest.mark.parametrize("space", ["prob", "logit"])
@pytest.mark.parametrize("method", ["logloss", "greedy", "scipy"])
def test_the_better_member_gets_the_larger_weight(method, space):
    rng = np.random.default_rng(1)
    y = rng.integers(0, C, 1500)
    prob = _problem([{"none": _member(y, 3.0, rng)}, {"none": _member(y, 1.2, rng)}], y)
    # Without member temperatures: once each member is calibrated (its logits scaled by alpha / noise^2), equal
    # logit-space weights are already optimal for independent Gaussian noise, so there is nothing left to weigh.
    f = F.fit(F.Recipe(("none", "none"), method, space, member_temperature=False), prob, np.arange(len(y)))
    assert f.weights[0] > f.weights[1]
    assert f.weights.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("space", ["prob", "logit"])
def test_greedy_selection_gives_a_useless_member_weight_zero(space):
    rng = np.random.default_rng(2)
    y = rng.integers(0, C, 1500)
    useless = rng.normal(0, 3, (len(y), C)).astype(np.float32)  # confident and unrelated to the labels
    prob = _problem([{"none": _member(y, 2.5, rng)}, {"none": useless}, {"none": _member(y, 2.0, rng)}], y)
    f = F.fit(F.Recipe(("none",) * 3, "greedy", space, member_temperature=False), prob, np.arange(len(y)))
    assert f.weights[1] == 0.0
    assert f.weights[0] > 0
    assert f.weights[2] > 0


def test_logit_and_probability_averaging_differ_as_expected():
    p1 = np.array([[0.70, 0.20, 0.10], [0.98, 0.01, 0.01]])
    p2 = np.array([[0.10, 0.20, 0.70], [0.98, 0.01, 0.01]])
    arith = combine([p1, p2], [0.5, 0.5], "prob")
    geo = combine([p1, p2], [0.5, 0.5], "logit")
    np.testing.assert_allclose(arith, (p1 + p2) / 2)
    g = np.sqrt(p1 * p2)
    np.testing.assert_allclose(geo, g / g.sum(axis=1, keepdims=True))
    # Members that disagree: the arithmetic mean keeps both peaks, the geometric mean favours the class neither rules
    # out (class 1 gets 0.2 from both).
    assert arith[0, 0] == pytest.approx(0.4)
    assert geo[0, 1] > arith[0, 1]
    # A member that nearly rules a class out vetoes it in logit space, not in probability space.
    p3 = np.array([[1e-6, 0.5, 0.5 - 1e-6]])
    p4 = np.array([[0.9, 0.05, 0.05]])
    assert combine([p3, p4], [0.5, 0.5], "prob")[0, 0] == pytest.approx(0.45, abs=1e-5)
    assert combine([p3, p4], [0.5, 0.5], "logit")[0, 0] < 0.01
    # Identical members: both spaces give the member back.
    np.testing.assert_allclose(combine([p1, p1], [0.3, 0.7], "logit"), p1)


def test_members_with_other_merges_combine_in_the_submission_columns():
    classes = ["a", "b", "c", "d"]
    merged = build_merge_map(classes, [["a", "b"]])  # model classes a(+b), c, d
    plain = identity(classes)
    pm = np.array([[0.6, 0.3, 0.1]])  # over merged.classes
    pp = np.array([[0.1, 0.5, 0.3, 0.1]])
    out = combine([merged.expand(pm), plain.expand(pp)], [0.5, 0.5], "prob")
    np.testing.assert_allclose(out, [[(0.3 + 0.1) / 2, (0.3 + 0.5) / 2, (0.3 + 0.3) / 2, (0.1 + 0.1) / 2]])
    assert out.shape == (1, 4)


# ------------------------------------------------------------------------------------------------------ TTA
def test_a_tta_view_that_hurts_is_rejected_and_one_that_helps_is_kept():
    rng = np.random.default_rng(3)
    y = rng.integers(0, C, 1500)
    signal = np.zeros((len(y), C), np.float32)
    signal[np.arange(len(y)), y] = 2.0
    orig = signal + rng.normal(0, 1.5, signal.shape).astype(np.float32)
    bad_flip = rng.normal(0, 1.5, signal.shape).astype(np.float32)  # a view that lost the signal
    good_flip = signal + rng.normal(0, 1.5, signal.shape).astype(np.float32)  # same signal, its own noise
    prob = _problem([{"none": orig, "hflip": (orig + bad_flip) / 2},
                     {"none": orig, "hflip": (orig + good_flip) / 2}], y)
    sel = F.Selector(prob, F.make_splits(prob, np.arange(len(y))), calibrations=("none", "temperature"))
    chosen = sel.select()
    assert chosen.policies == ("none", "hflip")
    tta = {(c.stage, c.recipe.policies[int(c.stage.endswith("m1"))]): c for c in sel.candidates
           if c.stage.startswith("tta")}
    assert tta[("tta m0", "hflip")].loss > tta[("tta m0", "none")].loss
    assert not tta[("tta m0", "hflip")].chosen
    assert tta[("tta m1", "hflip")].chosen


# ---------------------------------------------------------------------------------------------------- honesty
def test_every_figure_comes_from_rows_its_fit_never_saw(monkeypatch):
    """Spy on fit/apply through a whole selection and a nested cross-validation: no fitted object ever predicts a
    row it was fitted on, and each cross-validation scores every row exactly once."""
    rng = np.random.default_rng(4)
    y = rng.integers(0, C, 400)
    prob = _problem([{"none": _member(y, 2.0, rng), "hflip": _member(y, 2.2, rng)},
                     {"none": _member(y, 1.5, rng)}], y)
    fitted_on: dict[int, set] = {}
    real_fit, real_apply, real_cv = F.fit, F.apply, F.cross_validate
    applied = []

    def spy_fit(recipe, p, rows):
        f = real_fit(recipe, p, rows)
        fitted_on[id(f)] = set(np.asarray(rows).tolist())
        return f

    def spy_apply(f, p, rows):
        rows_set = set(np.asarray(rows).tolist())
        assert not rows_set & fitted_on[id(f)], "a fit predicted rows it was fitted on"
        applied.append(rows_set)
        return real_apply(f, p, rows)

    def spy_cv(recipe, p, splits, fit_fn=None):
        start = len(applied)
        out = real_cv(recipe, p, splits, fit_fn)
        scored = [r for s in applied[start:] for r in s]
        assert sorted(scored) == sorted({r for _, test in splits for r in test.tolist()})  # each row once
        return out

    monkeypatch.setattr(F, "fit", spy_fit)
    monkeypatch.setattr(F, "apply", spy_apply)
    monkeypatch.setattr(F, "cross_validate", spy_cv)
    splits = F.make_splits(prob, np.arange(len(y)), 4)
    F.Selector(prob, splits, calibrations=("none", "temperature", "vector:3")).select()
    F.nested(prob, splits, 3, "grouped", 0, calibrations=("none", "temperature"))
    assert len(applied) > 50


def test_cross_validated_figures_do_not_reward_overfitting():
    """Noise members and a nearly unregularised matrix calibration: fitted and scored on the same rows it looks
    better than chance; cross-validated it does not."""
    rng = np.random.default_rng(5)
    y = rng.integers(0, C, 320)
    prob = _problem([{"none": rng.normal(0, 1, (len(y), C)).astype(np.float32)}], y)
    recipe = F.Recipe(("none",), "single:0", "prob", False, "matrix:0.001")
    rows = np.arange(len(y))
    f = F.fit(recipe, prob, rows)
    in_sample = nll(F.apply(f, prob, rows), y)
    cv = F.cross_validate(recipe, prob, F.make_splits(prob, rows, 4)).loss
    assert in_sample < np.log(C) - 0.05
    assert cv > np.log(C)
    sel = F.Selector(prob, F.make_splits(prob, rows, 4))
    assert sel.select().calibration in ("none", "temperature")  # the matrix is not kept on noise


def test_grouped_splits_hold_out_whole_run_folds():
    rng = np.random.default_rng(6)
    y = rng.integers(0, C, 300)
    groups = rng.integers(0, 5, 300)
    prob = _problem([{"none": _member(y, 2.0, rng)}], y, groups=groups)
    splits = F.make_splits(prob, np.arange(300), 5)
    assert len(splits) == 5
    for train, test in splits:
        assert not set(groups[train]) & set(groups[test])
    one_group = _problem([{"none": _member(y, 2.0, rng)}], y, groups=np.zeros(300, int))
    assert len(F.make_splits(one_group, np.arange(300), 5)) == 5  # stratified fallback


def torch_fit(logits, labels, max_iter=100):
    """An independent reference for carclf.metrics.fit_temperature (numpy Newton): torch's L-BFGS on log T, as
    ``carclf calibrate`` fitted it before both used the one numeric core."""
    import torch
    import torch.nn.functional as tF

    z, y = torch.as_tensor(logits, dtype=torch.float64), torch.as_tensor(labels, dtype=torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = tF.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(np.clip(log_t.exp().item(), 0.05, 20.0))


def test_fitted_temperature_matches_the_calibrate_step():
    rng = np.random.default_rng(7)
    y = rng.integers(0, C, 800)
    z = _member(y, 2.0, rng, scale=3.0)
    assert F.fit_temperature(z, y) == pytest.approx(torch_fit(z, y), rel=1e-3)
    p = softmax(z.astype(np.float64) / F.fit_temperature(z, y))
    assert nll(p, y) < nll(softmax(z.astype(np.float64)), y)


# ------------------------------------------------------------------------------------------ run folders (fake)
def _fake_run(root, name, classes, photos, labels, folds, rng, merges=None, with_views=True, incomplete=()):
    """A run directory with what the ensemble step reads (no trained model): marker, config, run.json and each
    fold's oof.npz; best.pt is a few bytes (only its checksum matters here)."""
    from carclf.artifacts.run import RunDir
    from carclf.config import Config

    rd = RunDir(root / name)
    rd.create(Config(name=name))
    merge = build_merge_map(classes, merges or [])
    rd.write_meta({"classes": merge.classes, "merge": merge.to_dict()})
    for k in sorted(set(folds.tolist())):
        fp = rd.fold(k)
        fp.dir.mkdir(parents=True)
        fp.best.write_bytes(f"{name}{k}".encode())
        if k in incomplete:
            continue
        m = folds == k
        orig = labels[m]
        model_labels = merge.label_map[orig]
        logits = rng.normal(0, 1, (int(m.sum()), len(merge.classes))).astype(np.float32)
        logits[np.arange(int(m.sum())), model_labels] += 2.0
        views = {"view_logits": np.stack([logits, logits + 0.1]).astype(np.float16),
                 "views": np.array(["orig", "flip"])} if with_views else {}
        np.savez(fp.oof, indices=np.flatnonzero(m), labels=model_labels, logits=logits, original_labels=orig,
                 paths=np.array([f"train/{classes[c]}/{p}" for c, p in zip(orig, photos[m], strict=True)]),
                 **views)
    return rd.path


@pytest.fixture
def fake_runs(tmp_path):
    rng = np.random.default_rng(8)
    classes = ["k5", "k5_hybrid", "rav4", "sonata"]
    n = 80
    labels = np.arange(n) % 4
    photos = np.array([f"{i:03d}.jpg" for i in range(n)])
    folds = np.arange(n) % 2
    a = _fake_run(tmp_path, "a", classes, photos, labels, folds, rng)
    b = _fake_run(tmp_path, "b", classes, photos, labels, folds, rng, merges=[["k5", "k5_hybrid"]])
    return {"tmp": tmp_path, "a": a, "b": b, "classes": classes, "photos": photos, "labels": labels, "folds": folds,
            "rng": rng}


def _build(members, out, **kw):
    from carclf.ensemble.build import build_ensemble

    logs = []
    doc = build_ensemble([str(m) for m in members], out, log=logs.append, **kw)
    return doc, "\n".join(logs)


def test_members_with_different_merges_share_the_submission_columns(fake_runs):
    from carclf.artifacts.oof import load_oof

    out = fake_runs["tmp"] / "ens"
    doc, log = _build([fake_runs["a"], fake_runs["b"]], out)
    assert doc["classes"] == fake_runs["classes"]
    assert "different model classes" in log
    assert [m["model_classes"] for m in doc["members"]] == [4, 3]
    assert doc["members"][1]["merged_groups"] == [["k5", "k5_hybrid"]]
    oof = load_oof(out)  # dispatches to carclf.ensemble.ensemble_oof
    assert oof.classes == fake_runs["classes"]
    assert oof.probs.shape == (80, 4)
    np.testing.assert_allclose(oof.probs.sum(axis=1), 1.0, atol=1e-5)
    assert sum(c["chosen"] for c in doc["candidates"] if c["stage"] == "combination") == 1
    assert "*" in log  # the printed table marks the chosen candidates


def test_different_class_folders_are_refused_with_the_difference_named(fake_runs, tmp_path):
    rng = fake_runs["rng"]
    other = _fake_run(tmp_path, "c", ["k5", "k5_hybrid", "rav4", "tucson"], fake_runs["photos"],
                      fake_runs["labels"], fake_runs["folds"], rng)
    with pytest.raises(CarclfError, match=r"only in a: sonata; only in c: tucson"):
        _build([fake_runs["a"], other], tmp_path / "ens")


def test_other_splits_subsets_and_unfinished_folds_are_reported(fake_runs, tmp_path):
    rng = fake_runs["rng"]
    n = len(fake_runs["photos"])
    shifted = _fake_run(tmp_path, "s", fake_runs["classes"], fake_runs["photos"], fake_runs["labels"],
                        (np.arange(n) // 2) % 2, rng)  # another split of the same photos
    doc, log = _build([fake_runs["a"], shifted], tmp_path / "e1")
    assert "another fold split" in log
    assert doc["selection"]["rows"] == n
    part = _fake_run(tmp_path, "p", fake_runs["classes"], fake_runs["photos"], fake_runs["labels"],
                     fake_runs["folds"], rng, incomplete=(1,), with_views=False)
    doc, log = _build([fake_runs["a"], part], tmp_path / "e2")
    assert "fold(s) 1" in log
    assert "not complete" in log
    assert "no per-view out-of-fold logits" in log
    assert f"figures on the {n // 2} photos every member saw" in log
    assert doc["selection"]["rows"] == n // 2
    assert doc["members"][1]["folds"] == [0]
    with pytest.raises(CarclfError, match="share no out-of-fold photo"):
        _build([f"{fake_runs['a']}:0", f"{fake_runs['a']}:1"], tmp_path / "e3")


def test_output_folder_is_never_silently_overwritten(fake_runs):
    tmp = fake_runs["tmp"]
    out = tmp / "ens"
    _build([fake_runs["a"]], out)
    with pytest.raises(CarclfError, match="--overwrite"):
        _build([fake_runs["a"]], out)
    _build([fake_runs["a"], fake_runs["b"]], out, overwrite=True)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CarclfError, match="notes.txt"):
        _build([fake_runs["a"]], out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    user = tmp / "user"
    user.mkdir()
    (user / "x.csv").write_text("1")
    with pytest.raises(CarclfError, match="not hold an ensemble made by carclf"):
        _build([fake_runs["a"]], user, overwrite=True)
    with pytest.raises(CarclfError, match="overlaps member"):
        _build([fake_runs["a"]], fake_runs["a"] / "ens")


def test_missing_runs_and_changed_weights_are_named(fake_runs):
    from carclf.infer.predictor import Predictor

    out = fake_runs["tmp"] / "ens"
    doc, _ = _build([fake_runs["a"], fake_runs["b"]], out, cv_folds=2)
    victim = next(m for m in doc["members"] if m["weight"] > 0)
    best = fake_runs[victim["name"]] / "fold1" / "best.pt"
    best.write_bytes(b"retrained")
    with pytest.raises(CarclfError, match=r"fold1/best\.pt' has changed since the ensemble was made"):
        Predictor.open(out, device="cpu")
    shutil.move(fake_runs[victim["name"]], fake_runs["tmp"] / "elsewhere")
    with pytest.raises(CarclfError, match=f"member {victim['name']}'s run is missing"):
        Predictor.open(out, device="cpu")


# --------------------------------------------------------------------------------------------- end to end (slow)
@pytest.fixture(scope="module")
def two_runs(synth_data, tmp_path_factory):
    from carclf.config import load_config
    from carclf.train.loop import train

    out = tmp_path_factory.mktemp("ens")
    runs = []
    for name, extra in (("a", {}), ("b", {"train.seed": 1, "data.img_size": 80})):
        cfg = load_config(None, tiny_overrides(synth_data, out, **{"name": name, "train.folds": "all", **extra}))
        runs.append(train(cfg, log=lambda s: None))
    return out, runs


@pytest.mark.slow
def test_ensemble_predict_and_evaluate_end_to_end(synth_data, two_runs, capsys):
    from carclf.cli import main

    out, (a, b) = two_runs
    ens = out / "ensemble"
    assert main(["ensemble", str(a), str(b), "-o", str(ens), "--cv-folds", "2"]) == 0
    printed = capsys.readouterr().out
    assert "chosen ensemble" in printed
    assert "cv log loss" in printed
    doc = json.loads(json.dumps(__import__("yaml").safe_load((ens / "ensemble.yaml").read_text(encoding="utf-8"))))
    assert [m["name"] for m in doc["members"]] == ["a", "b"]
    assert all(len(h) == 64 for m in doc["members"] for h in m["best_sha256"].values())
    sub = out / "submission.csv"
    assert main(["predict", str(ens), "--data", str(synth_data), "-o", str(sub)]) == 0
    with sub.open(encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    with (synth_data / "sample_submission.csv").open(encoding="utf-8") as fh:
        sample = list(csv.reader(fh))
    assert rows[0] == sample[0]
    assert [r[0] for r in rows[1:]] == [r[0] for r in sample[1:]]
    p = np.array([[float(v) for v in r[1:]] for r in rows[1:]])
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-6)
    assert p.min() >= doc["eps"] * 0.99
    assert main(["evaluate", str(ens)]) == 0
    table = capsys.readouterr().out
    assert " all " in table
    saved = json.loads((ens / "evaluation.json").read_text())
    assert saved[-1]["fold"] == "all"
    assert saved[-1]["log_loss"] == pytest.approx(
        min(c["cv_log_loss"] for c in doc["candidates"] if c["chosen"] and c["stage"] == "clipping"), abs=1e-3)


@pytest.mark.slow
def test_predictor_gives_what_the_ensemble_step_measured(synth_data, two_runs):
    """Single-fold members: the Predictor on fold 0's own photos reproduces the fitted ensemble's numpy
    post-processing of the stored out-of-fold logits (up to their float16 storage)."""
    import yaml

    from carclf.ensemble.build import load_problem
    from carclf.infer.predictor import Predictor

    out, (a, b) = two_runs
    ens = out / "ens-fold0"
    specs = [f"{a}:0", f"{b}:0"]
    _build(specs, ens, cv_folds=3, calibrations=("none", "temperature", "vector:3"))
    doc = yaml.safe_load((ens / "ensemble.yaml").read_text(encoding="utf-8"))
    _, prob, al, _ = load_problem(specs, log=lambda s: None)
    recipe = F.Recipe(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in doc["recipe"].items()})
    expected = F.apply(F.fit(recipe, prob, np.arange(len(prob))), prob, np.arange(len(prob)))
    predictor = Predictor.open(ens, device="cpu")
    assert len(predictor.engines) == sum(1 for m in doc["members"] if m["weight"] > 0)
    got, bad = predictor.predict_paths([synth_data / "train" / p for p in al.paths], num_workers=0)
    assert not bad
    assert predictor.output_classes == doc["classes"]
    np.testing.assert_allclose(got, expected, atol=5e-3)
