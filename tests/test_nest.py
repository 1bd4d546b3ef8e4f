"""Nested teacher models (carclf nest, data.outer_fold) and the nested distillation targets (distill.targets=nested):
no target a student fold learns from comes from a model that trained on the photos it validates on."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from carclf.artifacts.oof import load_oof
from carclf.artifacts.run import RunDir
from carclf.config import load_config
from carclf.data.rundata import RunData
from carclf.data.splits import parse_folds
from carclf.errors import CarclfError
from tests.conftest import tiny_overrides

N_FOLDS = 3


def _quiet(_):
    pass


def test_the_outer_fold_is_never_trained_or_validated_on():
    assert parse_folds("all", 4, outer=2) == [0, 1, 3]
    assert parse_folds("all,full", 4, outer=0) == [1, 2, 3, -1]
    with pytest.raises(CarclfError, match="fold 2 is data.outer_fold, left out of this run"):
        parse_folds("1,2", 4, outer=2)
    data = RunData.__new__(RunData)
    data.folds, data.outer = np.array([0, 1, 2, 0, 1, 2]), 2
    data.usable = lambda: np.ones(6, dtype=bool)  # (a stand-in for the photos' verdicts)
    tr, va = data.split(0)
    assert tr.tolist() == [1, 4]
    assert va.tolist() == [0, 3]
    tr, va = data.split(-1)  # the full-data fit of a nested run: every fold but the outer one
    assert tr.tolist() == [0, 1, 3, 4]
    assert va.tolist() == []
    with pytest.raises(CarclfError, match="data.outer_fold must be -1 \\(off\\) or a fold number 0..2"):
        load_config(None, ["data.n_folds=3", "data.outer_fold=3"])
    with pytest.raises(CarclfError, match="distill.targets must be 'nested' or 'oof'"):
        load_config(None, ["distill.targets=nestd"])


def _train(root, out, log=_quiet, **extra):
    from carclf.train.loop import train

    return train(load_config(None, tiny_overrides(root, out, **{"data.n_folds": N_FOLDS, **extra})), log=log)


@pytest.fixture(scope="module")
def nested(synth_data, tmp_path_factory):
    """A calibrated 3-fold teacher and its nested runs teacher-outer0..2 (carclf nest)."""
    from carclf.calibrate.temperature import calibrate_run
    from carclf.nest import nest

    out = tmp_path_factory.mktemp("nest")
    teacher = _train(synth_data, out, name="teacher", **{"train.folds": "all"})
    calibrate_run(teacher, log=_quiet)
    made = nest(teacher, log=_quiet)
    return teacher, made


@pytest.mark.slow
def test_nest_trains_the_recipe_with_each_fold_left_out(nested):
    teacher, made = nested
    assert [p.name for p in made] == ["teacher-outer0", "teacher-outer1", "teacher-outer2"]
    t_cfg = RunDir(teacher).read_config()
    for k, n in enumerate(made):
        rd = RunDir(n)
        cfg = rd.read_config()
        assert cfg.data.outer_fold == k
        assert (cfg.model, cfg.aug, cfg.train.epochs, cfg.data.img_size) == (t_cfg.model, t_cfg.aug,
                                                                             t_cfg.train.epochs, t_cfg.data.img_size)
        assert rd.completed_folds() == [j for j in range(N_FOLDS) if j != k]
        oof = load_oof(n)
        assert k not in set(oof.folds.tolist())  # no row of the left-out fold
        for j in rd.completed_folds():
            assert rd.fold(j).calibration.is_file()  # the teacher was calibrated, so are its nested runs
        assert sorted(oof.paths) == sorted(p for p, f in zip(load_oof(teacher).paths, load_oof(teacher).folds,
                                                             strict=True) if f != k)


@pytest.mark.slow
def test_a_nested_student_fold_learns_only_from_models_that_never_saw_its_validation_photos(synth_data, nested,
                                                                                           tmp_path):
    from carclf.data.rundata import load_run_data
    from carclf.train.teacher import fold_distill_targets, load_teacher, record_teacher

    teacher, made = nested
    from carclf.infer.predictor import Predictor

    cfg = load_config(None, tiny_overrides(synth_data, tmp_path, name="s", **{
        "data.n_folds": N_FOLDS, "train.folds": "all", "distill.teacher": teacher, "distill.temperature": 1.0,
        "distill.unlabeled": "test"}))
    data = load_run_data(cfg, _quiet)
    rd = RunDir(cfg.run_dir)
    rd.path.mkdir(parents=True)
    t = load_teacher(cfg, data, rd, _quiet)
    record_teacher(t, rd, data.classes)
    rel = np.array(data.trainset.relpaths(), dtype=object)
    for k in range(N_FOLDS):
        tr_idx, va_idx = data.split(k)
        targets, unlabeled = fold_distill_targets(t, cfg, rd, k, data, tr_idx, _quiet)
        # unlabeled photos: every model of the nested teacher, calibrated without fold k too
        want = Predictor.open(made[k], device="cpu").predict(unlabeled)[0]
        assert np.allclose(targets.soft[len(tr_idx):].numpy(), want, atol=1e-5)
        oof = load_oof(made[k])
        row_of = {p: i for i, p in enumerate(oof.paths)}
        rows = [row_of[p] for p in rel[tr_idx]]
        assert np.allclose(targets.soft[: len(tr_idx)].numpy(), oof.probs[rows], atol=1e-5)
        # every model behind those rows trained with fold k left out: none saw a photo student fold k validates on
        n_rd = RunDir(made[k])
        assert n_rd.read_config().data.outer_fold == k
        for j in n_rd.completed_folds():  # as training recorded it
            summary = json.loads(n_rd.fold(j).summary.read_text())
            assert summary["train_folds"] == [f for f in range(N_FOLDS) if f not in (j, k)]
            assert summary["n_train"] == int(((data.folds != j) & (data.folds != k) & data.usable()).sum())
        # and they differ from the teacher's own OOF rows, which came from models that did see fold k
        own = load_oof(teacher)
        own_row = {p: i for i, p in enumerate(own.paths)}
        assert not np.allclose(oof.probs[rows], own.probs[[own_row[p] for p in rel[tr_idx]]], atol=1e-3)
    # a fold the call did not check (it looked complete) never falls back to the teacher's own rows
    t.nested.pop(2)
    with pytest.raises(CarclfError, match="fold 2 has no nested targets"):
        fold_distill_targets(t, cfg, rd, 2, data, data.split(2)[0], _quiet)
    info = t.info
    assert info["targets"] == "nested"
    assert info["oof_optimistic"] is False
    assert sorted(info["nested"]) == ["0", "1", "2"]
    assert info["nested"]["1"]["teacher"].endswith("teacher-outer1")


@pytest.mark.slow
def test_a_distilled_run_from_nested_targets_trains_resumes_and_records_its_teachers(synth_data, nested, tmp_path):
    from carclf.artifacts.teacher import teacher_checksum
    from carclf.train.loop import train

    teacher, made = nested

    def cfg(folds):
        return load_config(None, tiny_overrides(synth_data, tmp_path, **{
            "data.n_folds": N_FOLDS, "train.folds": folds, "distill.teacher": teacher}))

    run = train(cfg("0"), log=_quiet)
    meta = RunDir(run).read_meta()["distill"]
    assert meta["nested"]["0"]["checksum"] == teacher_checksum(made[0])
    assert not meta["oof_optimistic"]

    class Stop(Exception):
        pass

    def stop(k, epoch, row):
        raise Stop

    with pytest.raises(Stop):  # fold 1 trains an epoch and is interrupted; fold 2 has not started
        train(cfg("all"), resume=True, on_epoch_end=stop, log=_quiet)
    assert not RunDir(run).fold(1).complete
    assert (run / "teacher" / "targets-fold2.npz").is_file()
    assert not (run / "fold2").exists()
    files = {k: made[k] / "fold0" / "calibration.json" for k in (1, 2)}
    saved = {k: f.read_bytes() for k, f in files.items()}
    try:
        for f in files.values():  # both nested teachers change (recalibrated)
            f.write_text(json.dumps({"temperature": 1.9}))
        before = sorted(p.name for p in (run / "fold1").iterdir())
        with pytest.raises(CarclfError, match="the nested teacher '.*teacher-outer1' changed since fold 1 of"):
            train(cfg("all"), resume=True, log=_quiet)
        assert sorted(p.name for p in (run / "fold1").iterdir()) == before  # nothing lost
        files[1].write_bytes(saved[1])  # put fold 1's back: the resume finishes fold 1, and fold 2, which had not
        train(cfg("all"), resume=True, log=_quiet)  # started, learns from its teacher as it is now
        z = np.load(run / "teacher" / "targets-fold2.npz")
        assert str(z["checksum"]) == teacher_checksum(made[2])
        meta = RunDir(run).read_meta()["distill"]
        assert sorted(meta["nested"]) == ["0", "1", "2"]  # every call's folds, kept across resumes
        assert meta["nested"]["2"]["checksum"] == teacher_checksum(made[2])
        assert RunDir(run).completed_folds() == [0, 1, 2]
    finally:
        for k, f in files.items():
            f.write_bytes(saved[k])


def test_a_run_distilled_before_nested_targets_existed_reads_as_oof(tmp_path):
    import yaml

    from carclf.config import Config, read_config

    doc = Config().to_dict()
    doc["distill"]["teacher"] = "runs/ens"
    del doc["distill"]["targets"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(doc))
    assert read_config(tmp_path / "config.yaml").distill.targets == "oof"
    doc["distill"]["teacher"] = ""
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(doc))
    assert read_config(tmp_path / "config.yaml").distill.targets == "nested"


@pytest.mark.slow
def test_missing_or_wrong_nested_models_are_refused_naming_the_command(synth_data, nested, tmp_path):
    teacher, made = nested
    lone = shutil.copytree(teacher, tmp_path / "lone", ignore=shutil.ignore_patterns(".locks"))
    with pytest.raises(CarclfError, match=r"'.*lone-outer0', which does not exist. Make them with `carclf nest "
                                          r".*lone --outer 0`.*or set distill.targets=oof"):
        _train(synth_data, tmp_path / "a", **{"distill.teacher": lone})
    assert not (tmp_path / "a" / "t").exists()  # refused before the run directory is made
    # a nested run of another fold under this fold's name
    shutil.copytree(made[1], tmp_path / "lone-outer0", ignore=shutil.ignore_patterns(".locks"))
    with pytest.raises(CarclfError, match="was trained with data.outer_fold=1, not 0"):
        _train(synth_data, tmp_path / "b", **{"distill.teacher": lone})
    # one trained with other settings than the teacher
    shutil.rmtree(tmp_path / "lone-outer0")
    other = _train(synth_data, tmp_path, name="lone-outer0", **{"data.outer_fold": 0, "train.folds": "all",
                                                                 "data.img_size": 48})
    assert other == tmp_path / "lone-outer0"
    with pytest.raises(CarclfError, match="other settings than distill.teacher .*data.img_size: 64 -> 48"):
        _train(synth_data, tmp_path / "c", **{"distill.teacher": lone})
    from carclf.nest import nest

    with pytest.raises(CarclfError, match="other settings than .*lone' has now .*--outer 0 --overwrite"):
        nest(lone, outer="0", log=_quiet)
    # an unrelated run under a nested run's name is neither resumed nor deleted, even with --overwrite
    mine = _train(synth_data, tmp_path, name="lone-outer1", **{"train.folds": "0"})
    before = sorted(p.name for p in mine.rglob("*"))
    with pytest.raises(CarclfError, match="is a run that is not the nested run of .*lone' for fold 1"):
        nest(lone, outer="1", overwrite=True, log=_quiet)
    assert sorted(p.name for p in mine.rglob("*")) == before
    # two folds cannot be nested
    two = _train(synth_data, tmp_path / "two", name="two", **{"data.n_folds": 2, "train.folds": "all"})
    r = subprocess.run([sys.executable, "-m", "carclf", "nest", str(two)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1
    assert "nested models need at least 3 folds" in r.stderr
    with pytest.raises(CarclfError, match="distill.targets=nested needs data.n_folds >= 3"):
        _train(synth_data, tmp_path / "d", **{"data.n_folds": 2, "distill.teacher": two})


@pytest.mark.slow
def test_nest_of_an_ensemble_rebuilds_it_on_its_members_nested_runs(synth_data, nested, tmp_path):
    from carclf.artifacts.ensemble import member_run, read_ensemble
    from carclf.ensemble.build import build_ensemble
    from carclf.nest import nest

    teacher, made = nested
    ens = tmp_path / "ensembles" / "ens 앙상블"
    build_ensemble([str(teacher)], ens, cv_folds=2, calibrations=("none", "temperature"), log=_quiet)
    stamps = {k: (made[k] / "fold1" / "best.pt").stat().st_mtime_ns for k in (0, 2)}
    logs = []
    out = nest(ens, outer="0,2", log=logs.append)
    assert [p.name for p in out] == ["ens 앙상블-outer0", "ens 앙상블-outer2"]
    for k, p in zip((0, 2), out, strict=True):
        members = read_ensemble(p)["members"]
        assert [member_run(p, m).resolve() for m in members] == [made[k].resolve()]
        assert members[0]["folds"] == [j for j in range(N_FOLDS) if j != k]
        assert (made[k] / "fold1" / "best.pt").stat().st_mtime_ns == stamps[k]  # the member's nested run: reused
    assert any("already complete, skipping" in line for line in logs)
    run = _train(synth_data, tmp_path / "s", **{"distill.teacher": ens, "train.folds": "0"})
    assert RunDir(run).read_meta()["distill"]["nested"]["0"]["teacher"].endswith("ens 앙상블-outer0")
    with pytest.raises(CarclfError, match="ens 앙상블-outer1', which does not exist"):
        _train(synth_data, tmp_path / "x", **{"distill.teacher": ens, "train.folds": "1"})
    assert read_ensemble(out[0])["selection"]["calibrations"] == ["none", "temperature"]  # the ensemble's own
    # run again (after an interruption, say): what is up to date is kept, nothing trained or rebuilt
    stamp = (out[0] / "ensemble.yaml").stat().st_mtime_ns
    logs = []
    nest(ens, outer="0,2", log=logs.append)
    assert sum("is up to date" in line for line in logs) == 2
    assert (out[0] / "ensemble.yaml").stat().st_mtime_ns == stamp
    # one built on other checkpoints is not silently replaced: --overwrite does that
    text = (out[0] / "ensemble.yaml").read_text(encoding="utf-8")
    sha = read_ensemble(out[0])["members"][0]["best_sha256"][1]
    (out[0] / "ensemble.yaml").write_text(text.replace(sha, "0" * 64), encoding="utf-8")
    with pytest.raises(CarclfError, match="--overwrite"):
        nest(ens, outer="0", log=_quiet)
    nest(ens, outer="0", overwrite=True, log=_quiet)
    assert read_ensemble(out[0])["members"][0]["best_sha256"][1] == sha


@pytest.mark.slow
def test_nest_interrupted_right_after_overwrite_cleared_a_run_continues_when_run_again(nested):
    from carclf.artifacts.teacher import teacher_checksum
    from carclf.nest import nest

    teacher, made = nested
    before = teacher_checksum(made[1])

    def interrupt(line):
        if "train /" in line:  # the first fold's set-up: the run holds its config and nothing else yet
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        nest(teacher, outer="1", overwrite=True, log=interrupt)
    assert RunDir(made[1]).completed_folds() == []
    nest(teacher, outer="1", log=_quiet)
    assert RunDir(made[1]).completed_folds() == [0, 2]
    assert teacher_checksum(made[1]) == before  # trained again, bit for bit
