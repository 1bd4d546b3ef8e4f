"""Hardening (issue 16, part B), each through the command line as a user meets it: a damaged best.pt, temp files
an interrupted write left, a bad -o, a sample_submission.csv with IDs test.csv lacks, an edited or malformed
export.yaml, an oof.npz holding pickled objects."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from carclf.cli import main
from carclf.config import load_config
from carclf.errors import CarclfError
from carclf.io import file_sha256
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(synth_data, tmp_path_factory) -> Path:
    """A tiny run: fold 0, one epoch (read-only: tests that change it work on a copy)."""
    from carclf.train.loop import train

    return Path(train(load_config(None, tiny_overrides(synth_data, tmp_path_factory.mktemp("hb"))),
                      log=lambda s: None))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def _flip(path: Path, n: int = 64) -> None:
    """``n`` bytes in the middle of a file inverted: the file still unpickles, its weights are different."""
    with open(path, "r+b") as fh:
        fh.seek(path.stat().st_size // 2)
        block = fh.read(n)
        fh.seek(-len(block), 1)
        fh.write(bytes(b ^ 0xFF for b in block))


class _Stop(Exception):
    pass


def _stopped_after_one_epoch(synth_data: Path, tmp_path: Path, epochs: int):
    """The config of a run of ``epochs`` epochs whose training was stopped after its first, as a kill would."""
    from carclf.train.loop import train

    def stop(k, epoch, row):
        raise _Stop

    cfg = load_config(None, tiny_overrides(synth_data, tmp_path, **{"train.epochs": epochs}))
    with pytest.raises(_Stop):
        train(cfg, on_epoch_end=stop, log=lambda s: None)
    return cfg


# --------------------------------------------------------------------------------------- 9b: best.pt checksums
def test_a_damaged_best_pt_is_refused_wherever_it_is_loaded(run, synth_data, tmp_path, capsys):
    summary = json.loads((run / "fold0" / "summary.json").read_text(encoding="utf-8"))
    assert summary["best_sha256"] == file_sha256(run / "fold0" / "best.pt")
    bad = _copy(run, tmp_path / "bad")
    best = bad / "fold0" / "best.pt"
    _flip(best)
    torch.load(best, weights_only=True)  # still a loadable checkpoint: without the check, silent wrong predictions
    commands = {
        "predict": ["predict", str(bad), "--data", str(synth_data), "-o", str(tmp_path / "s.csv")],
        "export": ["export", str(bad), "-o", str(tmp_path / "exp")],
        "predict --engine onnx": ["predict", str(bad), "--data", str(synth_data), "-o", str(tmp_path / "s.csv"),
                                  "--engine", "onnx"],
    }
    for what, argv in commands.items():
        assert main(argv) == 2, what
        err = _one_error_line(capsys)
        assert f"'{best}' is not the file training wrote" in err, what
        assert "Retrain fold 0" in err
        assert "--resume" in err
    assert not (tmp_path / "s.csv").exists()


def test_a_run_from_before_checksums_still_loads(run, tmp_path):
    from carclf.infer.predictor import Predictor

    old = _copy(run, tmp_path / "old")
    path = old / "fold0" / "summary.json"
    summary = json.loads(path.read_text(encoding="utf-8"))
    del summary["best_sha256"]
    path.write_text(json.dumps(summary), encoding="utf-8")
    assert Predictor.open(old, device="cpu").folds == [0]


def test_an_ensemble_refuses_a_member_whose_best_pt_was_damaged_before_it_was_built(run, synth_data, tmp_path,
                                                                                      capsys):
    """The ensemble records the hash of best.pt as it finds it: a file damaged before that is caught by the hash
    training recorded."""
    from carclf.ensemble.build import build_ensemble

    bad = _copy(run, tmp_path / "bad")
    _flip(bad / "fold0" / "best.pt")
    build_ensemble([str(bad)], tmp_path / "ens", cv_folds=2, cv="stratified", log=lambda s: None)
    assert main(["predict", str(tmp_path / "ens"), "--data", str(synth_data), "-o", str(tmp_path / "s.csv")]) == 2
    assert "is not the file training wrote" in _one_error_line(capsys)


def test_a_best_pt_damaged_while_a_run_was_stopped_is_refused_on_resume(synth_data, tmp_path):
    """Resuming reads the hash recorded in last.pt when best.pt was written, before best.pt is used again."""
    from carclf.train.loop import train

    cfg = _stopped_after_one_epoch(synth_data, tmp_path, epochs=1)
    best = cfg.run_dir / "fold0" / "best.pt"
    assert torch.load(cfg.run_dir / "fold0" / "last.pt", weights_only=True)["best"]["sha256"] == file_sha256(best)
    _flip(best)
    with pytest.raises(CarclfError, match=r"best\.pt' is not the file training wrote.*in last\.pt.*Retrain fold 0"):
        train(cfg, resume=True, log=lambda s: None)
    assert not (cfg.run_dir / "fold0" / "oof.npz").exists()


# ------------------------------------------------------------------------------------- 11: stale temp files
def test_resume_removes_the_temp_files_a_killed_write_left_and_nothing_else(synth_data, tmp_path):
    from carclf.train.loop import train

    cfg = _stopped_after_one_epoch(synth_data, tmp_path, epochs=2)
    run, fold = cfg.run_dir, cfg.run_dir / "fold0"
    stale = [fold / ".last.pt.4242.0123456789abcdef.tmp", fold / ".best.pt.4242.fedcba9876543210.tmp",
             fold / ".metrics.csv.17.00112233445566ff.tmp", run / ".run.json.4242.0123456789abcdef.tmp",
             run / ".folds.csv.copy.tmp"]
    mine = [fold / "notes.txt", fold / ".notes.tmp", fold / ".calibration.json.99.0123456789abcdef.tmp",
            run / ".evaluation.json.99.0123456789abcdef.tmp", run / "todo.txt"]
    for p in stale + mine:
        p.write_bytes(b"half a file")
    logs: list[str] = []
    train(cfg, resume=True, log=logs.append)
    assert (fold / "oof.npz").is_file()
    assert [p.name for p in stale if p.exists()] == []
    assert [p.name for p in mine if not p.exists()] == []
    assert any(line.startswith("removed 3 temp file(s)") for line in logs), logs


# ------------------------------------------------------------------------------------------ 12: predict's -o
def test_predict_refuses_a_bad_output_path_before_the_work(run, synth_data, tmp_path, monkeypatch, capsys):
    from carclf.infer import predict

    def no_work(*args, **kw):
        raise AssertionError("the output path is checked before the model is loaded")

    monkeypatch.setattr(predict, "Predictor", no_work)
    monkeypatch.setattr(predict, "open_predictor", no_work)
    folder = tmp_path / "out"
    folder.mkdir()
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    base = ["predict", str(run), "--data", str(synth_data)]
    assert main([*base, "-o", str(folder), "--overwrite"]) == 2
    assert f"-o '{folder}' is a folder: give the submission's file name" in _one_error_line(capsys)
    assert main([*base, "-o", str(a_file / "s.csv")]) == 2
    assert f"'{a_file}' is a file, not a folder" in _one_error_line(capsys)
    assert main([*base, "-o", str(a_file)]) == 2
    assert "already exists: pass --overwrite" in _one_error_line(capsys)
    assert a_file.read_text() == "mine"
    assert list(folder.iterdir()) == []


# ----------------------------------------------------------------------- 19: the sample's IDs are the rows
def _rows(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.reader(fh))


def _write_rows(path: Path, rows: list[list[str]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows(rows)


def test_the_submission_has_the_samples_rows(run, synth_data, tmp_path, capsys):
    """sample_submission.csv lists two IDs test.csv lacks whose photos are where test.csv's naming puts them, one
    with no photo at all, and lacks one of test.csv's IDs: the submission has exactly the sample's rows."""
    assert main(["predict", str(run), "--data", str(synth_data), "-o", str(tmp_path / "full.csv")]) == 0
    full = {r[0]: r[1:] for r in _rows(tmp_path / "full.csv")[1:]}
    data = _copy(synth_data, tmp_path / "data")
    test = _rows(data / "test.csv")
    _write_rows(data / "test.csv", test[:-2])  # the last two photos stay in test/
    sample = _rows(data / "sample_submission.csv")
    header, ids = sample[0], [r[0] for r in sample[1:]]
    dropped = ids[0]
    rows = [r for r in sample if r[0] != dropped] + [["TEST_99999", *sample[1][1:]]]
    _write_rows(data / "sample_submission.csv", rows)
    capsys.readouterr()
    assert main(["predict", str(run), "--data", str(data), "-o", str(tmp_path / "s.csv")]) == 0
    out = capsys.readouterr().out
    got = _rows(tmp_path / "s.csv")
    assert got[0] == header
    assert [r[0] for r in got[1:]] == [r[0] for r in rows[1:]]  # the sample's IDs, in its order
    by_id = {r[0]: np.array(r[1:], dtype=float) for r in got[1:]}
    for i in ids[-2:]:  # found by test.csv's naming: the same prediction as from test.csv
        np.testing.assert_allclose(by_id[i], np.array(full[i], dtype=float), atol=1e-6)
    others = np.stack([v for i, v in by_id.items() if i != "TEST_99999"])
    np.testing.assert_allclose(by_id["TEST_99999"], others.mean(axis=0), atol=1e-4)  # the mean prediction
    assert "2 ID(s) of sample_submission.csv are not in test.csv; their photos were found" in out
    assert "warning: 1 of the" in out
    assert "TEST_99999" in out
    assert "warning: 1 test.csv ID(s) are not in sample_submission.csv and are left out" in out
    assert dropped in out


# --------------------------------------------------------------------- 9a, 10: export.yaml checked on load
@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    from carclf.export.exporter import export_model

    out = tmp_path_factory.mktemp("hb-export") / "exp"
    export_model(run, out, log=lambda s: None)
    return out


def _edit(exp: Path, change) -> None:
    doc = yaml.safe_load((exp / "export.yaml").read_text(encoding="utf-8"))
    change(doc)
    (exp / "export.yaml").write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False), encoding="utf-8")


def _old(doc: dict) -> dict:
    """An export written before the spec's checksum was recorded."""
    doc.pop("spec_sha256", None)
    return doc


def _reorder(doc: dict) -> None:
    for key in ("classes", "output_classes"):
        doc[key] = doc[key][::-1]
    doc["merge"]["classes"] = doc["classes"]
    doc["merge"]["original"] = doc["output_classes"]


def _outside(exp: Path):
    def change(doc: dict) -> None:
        shutil.copyfile(exp / "fold0.onnx", exp.parent / "outside.onnx")
        doc["engines"][0]["files"]["fp32"]["file"] = "../outside.onnx"
    return change


def _more_classes(doc: dict) -> None:
    _old(doc)
    for key in ("classes", "output_classes"):
        doc[key] = [*doc[key], "extra"]
    m = doc["merge"]
    m["classes"], m["original"] = doc["classes"], doc["output_classes"]
    m["label_map"], m["share"] = [*m["label_map"], len(doc["classes"]) - 1], [*m["share"], 1.0]


def _foreign_graph(exp: Path):
    """A valid ONNX graph, but not this model's (another input size): an old export's yaml names it, checksum and
    all; ONNX Runtime loads it and would fail only on the first photo."""
    def change(doc: dict) -> None:
        import onnx
        from onnx import TensorProto, helper

        x = helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["batch", 3, 32, 32])
        y = helper.make_tensor_value_info("logits", TensorProto.UINT8, ["batch", 3, 32, 32])
        graph = helper.make_graph([helper.make_node("Identity", ["pixels"], ["logits"])], "g", [x], [y])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), exp / "fold0.onnx")
        _old(doc)["engines"][0]["files"]["fp32"]["sha256"] = file_sha256(exp / "fold0.onnx")
    return change


def _garbage_graph(exp: Path):
    def change(doc: dict) -> None:
        (exp / "fold0.onnx").write_bytes(b"\x08\x07garbage" * 100)
        _old(doc)["engines"][0]["files"]["fp32"]["sha256"] = file_sha256(exp / "fold0.onnx")
    return change


EDITS = {
    "temperature": (lambda exp: lambda d: d["engines"][0].update(temperature=2.5), "was edited after export"),
    "class order": (lambda exp: _reorder, "was edited after export"),
    "predictor block": (lambda exp: lambda d: d.update(predictor={"output_classes": ["a"] * 6}),
                        r"unknown key 'predictor\.output_classes'"),
    "engine outside": (_outside, r"'engines\[0\]\.files\.fp32\.file' = '\.\./outside\.onnx' is outside the export"),
    "unknown key": (lambda exp: lambda d: d.update(tempreature=2), "unknown key 'tempreature'"),
    "temperature text": (lambda exp: lambda d: _old(d)["engines"][0].update(temperature="hot"),
                         r"'engines\[0\]\.temperature' must be a number, not 'hot'"),
    "no engines": (lambda exp: lambda d: _old(d).update(engines=[]), "'engines' is empty"),
    "engines text": (lambda exp: lambda d: _old(d).update(engines="abc"), "'engines' must be a list, not 'abc'"),
    "no data_config": (lambda exp: lambda d: _old(d)["engines"][0].pop("data_config"),
                       r"'engines\[0\]\.data_config' is missing"),
    "format text": (lambda exp: lambda d: _old(d).update(format="1"), "'format' must be a whole number"),
    "views": (lambda exp: lambda d: _old(d)["engines"][0].update(views=["orig", "upside_down"]),
              r"'engines\[0\]\.views': unknown TTA view 'upside_down'"),
    "class count": (lambda exp: _more_classes, r"fold0\.onnx' outputs 6 classes, export\.yaml lists 7"),
    "foreign graph": (_foreign_graph, r"fold0\.onnx' takes input \['batch', 3, 32, 32\]"),
    "garbage graph": (_garbage_graph, r"ONNX Runtime cannot load '.*fold0\.onnx'"),
}


@pytest.mark.parametrize("case", list(EDITS))
def test_an_edited_or_malformed_export_yaml_is_one_line_exit_2(exported, synth_data, tmp_path, capsys, case):
    exp = _copy(exported, tmp_path / "exp")
    make, expected = EDITS[case]
    _edit(exp, make(exp))
    argv = ["predict", str(exp), "--data", str(synth_data), "-o", str(tmp_path / "s.csv"), "--engine", "onnx"]
    assert main(argv) == 2
    err = _one_error_line(capsys)
    assert f"'{exp / 'export.yaml'}'" in err or "fold0.onnx" in err
    assert re.search(expected, err), err
    assert re.search(r"(?i)export (it|the model) again|re-export with carclf export", err), err  # the remedy
    assert not (tmp_path / "s.csv").exists()


def test_an_export_loads_with_its_checksum_and_an_older_one_without(exported, synth_data, tmp_path):
    from carclf.artifacts.export import spec_checksum
    from carclf.infer.predictor import Predictor

    doc = yaml.safe_load((exported / "export.yaml").read_text(encoding="utf-8"))
    assert doc["spec_sha256"] == spec_checksum(doc)
    photos = sorted((synth_data / "test").glob("*.jpg"))[:4]
    p_new, _ = Predictor.from_export(exported).predict(photos, num_workers=0)
    old = _copy(exported, tmp_path / "old")
    _edit(old, _old)
    p_old, _ = Predictor.from_export(old).predict(photos, num_workers=0)
    np.testing.assert_array_equal(p_new, p_old)


# ------------------------------------------------------------------------ 10: an oof.npz with an object array
@pytest.mark.parametrize(("command", "key"), [("report", "paths"), ("evaluate", "labels"), ("calibrate", "logits"),
                                             ("ensemble", "paths")])
def test_an_oof_npz_holding_objects_is_one_line_exit_2(run, tmp_path, capsys, command, key):
    bad = _copy(run, tmp_path / "bad")
    oof = bad / "fold0" / "oof.npz"
    with np.load(oof) as z:
        arrays = {k: z[k] for k in z.files}
    arrays[key] = np.array(arrays[key].tolist(), dtype=object)  # what np.savez of a list of Python objects gives
    np.savez(oof, **arrays)
    extra = ["-o", str(tmp_path / "ens")] if command == "ensemble" else []
    assert main([command, str(bad), *extra]) == 2
    err = _one_error_line(capsys)
    assert f"'{oof}' holds an object array ('{key}': pickled Python objects" in err
    assert "Retrain fold 0" in err
