"""Knowledge distillation (distill.*): the loss, Mixup-consistent targets, the honesty rules, resume, bad input."""

import csv
import json
import shutil

import numpy as np
import pytest
import torch

from carclf.artifacts.oof import load_oof
from carclf.artifacts.run import RunDir
from carclf.config import load_config
from carclf.data.merges import MergeMap
from carclf.errors import CarclfError
from carclf.train.distill import DistillLoss, DistillTargets, batch_targets, soften
from carclf.train.losses import ClassificationLoss
from carclf.train.state import RecordingMixup
from carclf.train.teacher import to_student_classes
from tests.conftest import tiny_overrides

K = 6


def _quiet(_):
    pass


# ------------------------------------------------------------------------------------------------ the loss itself
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_a_teacher_whose_targets_are_the_labels_gives_the_plain_loss(alpha):
    torch.manual_seed(0)
    logits = torch.randn(8, K, requires_grad=True)
    labels = np.array([0, 1, 2, 3, 4, 5, 0, 1])
    base = ClassificationLoss("ce", label_smoothing=0.0)
    plain = base(logits, torch.from_numpy(labels))
    (g_plain,) = torch.autograd.grad(plain, logits)
    targets = DistillTargets.build(labels, np.eye(K)[labels], np.ones(8, bool), np.zeros((0, K)), alpha, 1.0)
    batch = batch_targets(targets, torch.arange(8), base, None, torch.device("cpu"))
    distilled = DistillLoss(base, 1.0)(logits, batch)
    (g_dist,) = torch.autograd.grad(distilled, logits)
    assert torch.allclose(distilled, plain, atol=1e-6)
    assert torch.allclose(g_dist, g_plain, atol=1e-6)


def test_the_soft_term_is_hinton_kl_scaled_by_t_squared():
    torch.manual_seed(1)
    logits = torch.randn(4, K)
    teacher = torch.softmax(torch.randn(4, K), 1).numpy()
    t = 3.0
    targets = DistillTargets.build(np.zeros(4, int), teacher, np.ones(4, bool), np.zeros((0, K)), 1.0, t)
    batch = batch_targets(targets, torch.arange(4), ClassificationLoss("ce"), None, torch.device("cpu"))
    got = DistillLoss(ClassificationLoss("ce"), t)(logits, batch)
    p = torch.from_numpy(soften(teacher, t)).float()
    want = t * t * torch.nn.functional.kl_div(torch.log_softmax(logits / t, 1), p, reduction="batchmean")
    assert torch.allclose(got, want, atol=1e-5)
    assert np.allclose(soften(teacher, 1.0), teacher)


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mixup_and_cutmix_mix_the_teacher_targets_as_they_mix_the_images(kind):
    torch.manual_seed(2)
    mix = RecordingMixup(mixup_alpha=1.0 if kind == "mixup" else 0.0, cutmix_alpha=1.0 if kind == "cutmix" else 0.0,
                         prob=1.0, label_smoothing=0.1, num_classes=K)
    n = 6
    x = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 1, 16, 16).clone()  # photo i = value i
    labels = np.array([0, 1, 2, 3, 4, 5])
    teacher = torch.softmax(torch.randn(n, K), 1).numpy()
    targets = DistillTargets.build(labels, teacher, np.ones(n, bool), np.zeros((0, K)), 0.5, 2.0)
    mixed, timm_target = mix(x, torch.from_numpy(labels))
    lam = mix.lam
    assert lam < 1
    # the image of photo i is lam of itself and (1 - lam) of photo n-1-i: read it back from the pixels
    own = (mixed[0] == 0).float().mean() if kind == "cutmix" else 1 - mixed[0].mean() / (n - 1)
    assert float(own) == pytest.approx(lam, abs=1e-5)
    batch = batch_targets(targets, torch.arange(n), ClassificationLoss("ce"), mix, torch.device("cpu"))
    assert torch.equal(batch.hard, timm_target * 0.5)  # timm's own mixed hard target, weighted by 1 - alpha
    soft = targets.soft * 0.5
    assert torch.allclose(batch.soft, soft * lam + soft.flip(0) * (1 - lam))


def test_unlabeled_rows_have_no_hard_term_and_weigh_by_confidence():
    unl = np.array([[0.9, 0.1, 0, 0, 0, 0], [0.4, 0.3, 0.3, 0, 0, 0]])
    t = DistillTargets.build(np.array([2]), np.zeros((1, K)), np.array([False]), unl, 0.5, 1.0,
                             confidence_weight=True)
    assert t.hard_weight.tolist() == [1.0, 0.0, 0.0]  # no teacher row: the label alone; unlabeled: no label
    assert t.soft_weight.tolist() == pytest.approx([0.0, 0.45, 0.2])
    b = batch_targets(t, torch.arange(3), ClassificationLoss("ce"), None, torch.device("cpu"))
    assert b.hard[1:].abs().sum() == 0
    assert b.soft[0].abs().sum() == 0


def test_teacher_columns_are_folded_into_the_students_merged_classes_or_refused_by_name():
    merge = MergeMap(["a", "b", "c"], ["a", "b"], np.array([0, 1, 1]), np.array([1.0, 0.5, 0.5]))
    p = np.array([[0.2, 0.3, 0.5]])
    assert np.allclose(to_student_classes(p, ["a", "b", "c"], merge, "T"), [[0.2, 0.8]])
    assert np.allclose(to_student_classes(np.array([[0.4, 0.6]]), ["a", "b"], merge, "T"), [[0.4, 0.6]])
    with pytest.raises(CarclfError, match=r"missing from the teacher: 'b'.*not in the student's data: 'zz'"):
        to_student_classes(p, ["a", "c", "zz"], merge, "T")


def test_every_file_of_the_teacher_folder_is_one_overwrite_may_delete_and_no_other(tmp_path):
    from carclf.artifacts.run import FULL, is_teacher_file
    from carclf.artifacts.teacher import TeacherDir, unlabeled_file

    td = TeacherDir(tmp_path)
    for name in (td.targets.name, td.skipped_csv.name, unlabeled_file(0), unlabeled_file(12), unlabeled_file(FULL),
                 td.fold_targets(0).name, td.fold_targets(11).name):
        assert is_teacher_file(name), name
    for name in ("notes.txt", "unlabeled-foldx.npz", "targets.npz.bak", "targets-fold.npz", "targets-fold1.npz.tmp"):
        assert not is_teacher_file(name), name


# ------------------------------------------------------------------------------------------------ real runs

@pytest.fixture(scope="module")
def teacher(synth_data, tmp_path_factory):
    from carclf.train.loop import train

    out = tmp_path_factory.mktemp("teacher")
    return train(load_config(None, tiny_overrides(synth_data, out, name="teacher", **{"train.folds": "all"})),
                 log=_quiet)


def _train(synth_data, out, log=_quiet, **extra):
    from carclf.train.loop import train

    if extra.get("distill.teacher"):  # 2 folds: the OOF targets (test_nest.py: the nested ones)
        extra.setdefault("distill.targets", "oof")
    return train(load_config(None, tiny_overrides(synth_data, out, **extra)), log=log)


def _weights(run, k=0):
    return torch.load(run / f"fold{k}" / "last.pt", weights_only=False)


def _losses(run, k=0):
    with (run / f"fold{k}" / "metrics.csv").open() as fh:
        return [r["train_loss"] for r in csv.DictReader(fh) if r["train_loss"]]


@pytest.mark.slow
def test_alpha_zero_is_the_plain_run_bit_for_bit(synth_data, teacher, tmp_path):
    over = {"aug.mixup": 0.4, "train.epochs": 2}
    plain = _train(synth_data, tmp_path / "p", **over)
    student = _train(synth_data, tmp_path / "s", **over, **{"distill.teacher": teacher, "distill.alpha": 0})
    a, b = _weights(plain), _weights(student)
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs with distill.alpha=0"
    assert _losses(plain) == _losses(student)
    # and the teacher does change the student when it counts
    taught = _train(synth_data, tmp_path / "t", **over, **{"distill.teacher": teacher, "distill.alpha": 0.7})
    assert _losses(taught) != _losses(plain)


@pytest.mark.slow
def test_no_student_fold_gets_a_target_from_a_model_that_trained_on_its_validation_photos(synth_data, teacher,
                                                                                        tmp_path):
    from carclf.config import load_config as lc
    from carclf.data.rundata import load_run_data
    from carclf.infer.predictor import Predictor
    from carclf.train.teacher import fold_distill_targets, load_teacher

    cfg = lc(None, tiny_overrides(synth_data, tmp_path, name="s", **{"distill.teacher": teacher,
                                                                     "distill.unlabeled": "test",
                                                                     "distill.temperature": 1.0,
                                                                     "distill.targets": "oof"}))
    data = load_run_data(cfg, _quiet)
    rd = RunDir(cfg.run_dir)
    rd.path.mkdir(parents=True)
    t = load_teacher(cfg, data, rd, _quiet)
    oof = load_oof(teacher)
    row_of = {p: i for i, p in enumerate(oof.paths)}
    rel = np.array(data.trainset.relpaths(), dtype=object)
    for k in (0, 1):
        tr_idx, va_idx = data.split(k)
        targets, unlabeled = fold_distill_targets(t, cfg, rd, k, data, tr_idx, _quiet)
        # labeled targets: each photo's own out-of-fold row, held out in a fold other than k
        rows = [row_of[p] for p in rel[tr_idx]]
        assert (oof.folds[rows] != k).all()
        assert np.allclose(targets.soft[: len(tr_idx)].numpy(), oof.probs[rows], atol=1e-5)
        assert not set(rel[va_idx]) & set(rel[tr_idx])
        # unlabeled targets: the teacher's fold-k model alone, which never saw fold k's photos
        own = Predictor.from_run(teacher, device="cpu", folds=[k]).predict(unlabeled)[0]
        other = Predictor.from_run(teacher, device="cpu", folds=[1 - k]).predict(unlabeled)[0]
        got = targets.soft[len(tr_idx):].numpy()
        assert np.allclose(got, own, atol=1e-5)
        assert not np.allclose(got, other, atol=1e-3)
    # distill.min_confidence leaves the uncertain unlabeled photos out (from the cache: nothing predicted again)
    cut = float(np.median(own.max(axis=1)))
    cfg.distill.min_confidence = cut
    _, kept = fold_distill_targets(t, cfg, rd, 1, data, data.split(1)[0], _quiet)
    assert 0 < len(kept) < len(unlabeled)
    assert {str(p) for p in kept} == {str(p) for p, q in zip(unlabeled, own, strict=True) if q.max() >= cut}


@pytest.mark.slow
def test_unlabeled_photos_never_reach_validation_or_the_oof_rows(synth_data, teacher, tmp_path):
    plain = _train(synth_data, tmp_path / "p", **{"train.folds": "all"})
    student = _train(synth_data, tmp_path / "s", **{"train.folds": "all", "distill.teacher": teacher,
                                                     "distill.unlabeled": "test"})
    a, b = load_oof(plain), load_oof(student)
    assert sorted(a.paths) == sorted(b.paths)
    assert not any(p.startswith("test") for p in b.paths)
    meta = RunDir(student).read_meta()["distill"]
    assert meta["unlabeled_photos"] == 18
    assert meta["kind"] == "run"
    assert meta["photos_hard_only"] == 0
    # a normal run: calibrate and the Predictor take it unchanged
    from carclf.calibrate.temperature import calibrate_run
    from carclf.infer.predictor import Predictor

    calibrate_run(student, log=_quiet)
    probs, bad = Predictor.from_run(student, device="cpu").predict(list((synth_data / "test").glob("*.jpg"))[:3])
    assert probs.shape == (3, K)
    assert not bad


@pytest.mark.slow
def test_resume_of_a_distilled_run_is_bit_exact(synth_data, teacher, tmp_path):
    from carclf.train.loop import train

    folder = tmp_path / "unlabeled photos"
    folder.mkdir()
    tests = sorted((synth_data / "test").glob("*.jpg"))
    for p in tests[:12]:
        shutil.copy(p, folder / p.name)
    over = {"train.epochs": 2, "aug.cutmix": 1.0, "distill.teacher": teacher, "distill.targets": "oof",
            "distill.unlabeled": folder,
            "distill.unlabeled_weight": "confidence"}
    full = _train(synth_data, tmp_path / "a", **over)

    class Stop(Exception):
        pass

    def stop(k, epoch, row):
        if epoch == 0:
            raise Stop

    cfg = load_config(None, tiny_overrides(synth_data, tmp_path / "b", **over))
    with pytest.raises(Stop):
        train(cfg, on_epoch_end=stop, log=_quiet)
    shutil.copy(tests[12], folder / "added later.jpg")  # not used by the resumed run: it trains on its start's photos
    resumed = train(cfg, resume=True, log=_quiet)
    a, b = _weights(full), _weights(resumed)
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"
    assert _losses(full) == _losses(resumed)
    # a photo the run started with, changed: the next fold refuses it instead of training on other data
    with (folder / tests[0].name).open("ab") as fh:
        fh.write(b"changed")
    more = load_config(None, tiny_overrides(synth_data, tmp_path / "b", **{**over, "train.folds": "all"}))
    with pytest.raises(CarclfError, match=f"unlabeled photo '.*{tests[0].name}' changed since the run started"):
        train(more, resume=True, log=_quiet)


@pytest.mark.slow
def test_an_ensemble_teacher_predicts_unlabeled_photos_with_its_fold_models_only(synth_data, teacher, tmp_path):
    from carclf.ensemble.build import build_ensemble

    ens = tmp_path / "ens"
    build_ensemble([str(teacher)], ens, cv_folds=2, calibrations=("none", "temperature"), log=_quiet)
    student = _train(synth_data, tmp_path / "s", **{"distill.teacher": ens, "distill.unlabeled": "test"})
    meta = RunDir(student).read_meta()["distill"]
    assert meta["kind"] == "ensemble"
    assert meta["photos_hard_only"] == 0
    z = np.load(student / "teacher" / "unlabeled-fold0.npz")
    assert z["probs"].shape == (18, K)
    assert z["ok"].all()
    # an ensemble holding the student's own run, or a member split otherwise, is refused before anything is touched
    other = _train(synth_data, tmp_path / "o", **{"train.folds": "all", "data.fold_seed": 7})
    both = tmp_path / "both"
    build_ensemble([str(teacher), str(other)], both, cv_folds=2, calibrations=("none",), log=_quiet)
    with pytest.raises(CarclfError, match=r"\(member .*\): the student's folds differ from the teacher's"):
        _train(synth_data, tmp_path / "x", **{"distill.teacher": both})
    mine = tmp_path / "mine"
    build_ensemble([str(teacher), str(student)], mine, cv_folds=2, calibrations=("none",), log=_quiet)
    from carclf.train.loop import train

    before = sorted(p.name for p in (student / "fold0").iterdir())
    with pytest.raises(CarclfError, match=r"\(member .*\) is this run itself"):
        train(load_config(None, tiny_overrides(synth_data, tmp_path / "s", **{"distill.teacher": mine,
                                                                                 "distill.targets": "oof"})),
              overwrite=True, log=_quiet)
    assert sorted(p.name for p in (student / "fold0").iterdir()) == before


# ------------------------------------------------------------------------------------------------ bad input
def _copy_run(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".locks"))
    return dst


@pytest.mark.slow
def test_bad_teachers_are_refused_in_one_line_naming_the_problem(synth_data, teacher, tmp_path):
    renamed = _copy_run(teacher, tmp_path / "renamed")
    meta = json.loads((renamed / "run.json").read_text())
    meta["classes"][0] = "아반떼_CN7_2021"
    meta.pop("merge", None)
    (renamed / "run.json").write_text(json.dumps(meta, ensure_ascii=False))
    with pytest.raises(CarclfError, match="missing from the teacher: '.*'; not in the student's data: '아반떼_CN7"):
        _train(synth_data, tmp_path / "a", **{"distill.teacher": renamed})
    assert not (tmp_path / "a" / "t").exists()  # refused before the run directory is made: a retry needs no flag

    partial = _copy_run(teacher, tmp_path / "partial")
    (partial / "fold1" / "oof.npz").unlink()
    with pytest.raises(CarclfError, match=r"no out-of-fold rows for fold\(s\) 1 .*: \d+ training photos would fall "
                                          "back.*distill.allow_partial=true"):
        _train(synth_data, tmp_path / "b", **{"distill.teacher": partial})
    logs = []
    run = _train(synth_data, tmp_path / "c", log=logs.append, **{"distill.teacher": partial,
                                                                 "distill.allow_partial": True,
                                                                 "distill.unlabeled": "test", "train.folds": "all"})
    assert any("the teacher has no fold 1 model (distill.allow_partial): no unlabeled photos" in line for line in logs)
    hard_only = RunDir(run).read_meta()["distill"]["photos_hard_only"]
    assert hard_only > 0
    assert any(f"{hard_only} train on the hard label alone" in line for line in logs)

    with pytest.raises(CarclfError, match="the student's folds differ from the teacher's.*data.fold_seed=42"):
        _train(synth_data, tmp_path / "d", **{"distill.teacher": teacher, "data.fold_seed": 7})
    with pytest.raises(CarclfError, match="cross-validated in 2 folds, the student in 3"):
        _train(synth_data, tmp_path / "e", **{"distill.teacher": teacher, "data.n_folds": 3})
    with pytest.raises(CarclfError, match="takes a run directory .* or an ensemble folder .*does not exist"):
        _train(synth_data, tmp_path / "f", **{"distill.teacher": tmp_path / "nowhere"})


@pytest.mark.slow
def test_a_teacher_changed_after_distillation_stops_the_resume(synth_data, teacher, tmp_path):
    mine = _copy_run(teacher, tmp_path / "teacher")
    run = _train(synth_data, tmp_path, **{"distill.teacher": mine})
    before = sorted(p.name for p in (run / "fold0").iterdir())
    (mine / "fold0" / "calibration.json").write_text(json.dumps({"temperature": 1.7}))
    from carclf.train.loop import train

    more = load_config(None, tiny_overrides(synth_data, tmp_path, **{"distill.teacher": mine, "train.folds": "all",
                                                                      "distill.targets": "oof"}))
    with pytest.raises(CarclfError, match="changed since .* started .*put it back, or start a new run name"):
        train(more, resume=True, log=_quiet)
    assert sorted(p.name for p in (run / "fold0").iterdir()) == before  # nothing lost
    assert not (run / "fold1").exists()
    # --overwrite starts afresh: the new teacher's targets, not the old run's
    fresh = tiny_overrides(synth_data, tmp_path, **{"distill.teacher": mine, "distill.targets": "oof"})
    again = train(load_config(None, fresh), overwrite=True, log=_quiet)
    z = np.load(again / "teacher" / "targets.npz")
    assert str(z["checksum"]) == RunDir(again).read_meta()["distill"]["checksum"]


@pytest.mark.slow
def test_the_full_data_fit_learns_unlabeled_photos_from_every_teacher_fold(synth_data, teacher, tmp_path):
    from carclf.infer.predictor import Predictor

    run = _train(synth_data, tmp_path, **{"train.folds": "0,full", "distill.teacher": teacher,
                                          "distill.unlabeled": "test"})
    assert (run / "full" / "best.pt").is_file()
    z = np.load(run / "teacher" / "unlabeled-full.npz")
    want = Predictor.from_run(teacher, device="cpu").predict([str(p) for p in z["paths"]])[0]
    assert np.allclose(z["probs"], want, atol=1e-5)


@pytest.mark.slow
def test_unreadable_unlabeled_photos_are_skipped_and_listed_and_an_empty_folder_is_refused(synth_data, teacher,
                                                                                           tmp_path):
    folder = tmp_path / "사진 모음"
    (folder / "__MACOSX").mkdir(parents=True)
    for i, p in enumerate(sorted((synth_data / "test").glob("*.jpg"))[:4]):
        shutil.copy(p, folder / f"u{i}.jpg")
    (folder / "broken.jpg").write_text("not a photo")
    shutil.copy(sorted((synth_data / "train").rglob("*.jpg"))[0], folder / "labeled copy.jpg")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "__MACOSX" / "._u0.jpg").write_bytes(b"\x00\x05\x16\x07")
    (folder / "._u1.jpg").write_bytes(b"\x00\x05\x16\x07")
    logs = []
    run = _train(synth_data, tmp_path / "r", log=logs.append, **{"distill.teacher": teacher,
                                                                  "distill.unlabeled": folder})
    with (run / "teacher" / "unlabeled-skipped.csv").open() as fh:
        skipped = {r["path"].rsplit("/", 1)[-1]: r["reason"] for r in csv.DictReader(fh)}
    assert skipped == {"broken.jpg": "failed to decode", "empty.jpg": "failed to decode",
                       "labeled copy.jpg": "a copy of a labeled training photo"}
    assert any("leaving 1 unlabeled photo(s) out" in line for line in logs)  # the copy, at the start
    assert any("leaving 2 unlabeled photo(s) out" in line for line in logs)  # the two, when the teacher decoded them
    z = np.load(run / "teacher" / "unlabeled-fold0.npz")
    assert int(z["ok"].sum()) == 4
    empty = tmp_path / "empty folder"
    (empty / "__MACOSX").mkdir(parents=True)
    (empty / "notes.txt").write_text("x")
    with pytest.raises(CarclfError, match="distill.unlabeled='.*empty folder' holds no photos"):
        _train(synth_data, tmp_path / "e", **{"distill.teacher": teacher, "distill.unlabeled": empty})
    with pytest.raises(CarclfError, match="distill.unlabeled needs distill.teacher"):
        load_config(None, tiny_overrides(synth_data, tmp_path, **{"distill.unlabeled": "test"}))


@pytest.mark.slow
def test_the_cli_exits_2_with_one_line_for_a_bad_teacher(synth_data, tmp_path):
    import subprocess
    import sys

    over = tiny_overrides(synth_data, tmp_path, **{"distill.teacher": tmp_path / "no such run"})
    r = subprocess.run([sys.executable, "-m", "carclf", "train", *over], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0
    assert "distill.teacher" in r.stderr
