"""ONNX export: graphs with the TTA views inside, parity with PyTorch, a Predictor rebuilt from the export alone,
``predict --engine onnx``, int8 graphs, and the export directory's safety rules."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from carclf.errors import CarclfError
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(synth_data, tmp_path_factory) -> Path:
    """A tiny calibrated run with two folds."""
    from carclf.calibrate.temperature import calibrate_run
    from carclf.config import load_config
    from carclf.train.loop import train

    out = tmp_path_factory.mktemp("export-runs")
    run = train(load_config(None, tiny_overrides(synth_data, out, **{"train.folds": "all"})))
    calibrate_run(run)
    return Path(run)


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory) -> Path:
    """The run exported once, with static int8 graphs."""
    from carclf.export.exporter import export_model

    out = tmp_path_factory.mktemp("export") / "lite0"
    lines: list[str] = []
    export_model(run_dir, out, int8="static", log=lines.append)
    assert any(line.startswith("parity on") for line in lines)
    return out


def _doc(export_dir: Path) -> dict:
    return yaml.safe_load((export_dir / "export.yaml").read_text(encoding="utf-8"))


def _test_photos(data: Path) -> list[Path]:
    return sorted((data / "test").glob("*.jpg"))


def test_views_inside_the_graph_match_pytorch(tmp_path):
    """Every kind of TTA view (flip, zoom in and out, corner crops) is traced into the graph and agrees with
    batch_logits; the batch axis is dynamic."""
    import onnxruntime as ort

    from carclf.data.transforms import batch_normalize
    from carclf.export.exporter import EngineModule, export_graph
    from carclf.models.forward import batch_logits

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5)).eval()
    dcfg = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "input_size": (3, 40, 56)}
    views = ["orig", "flip", "zoom1.15", "zoom0.8+flip", "crop_tl", "crop_br+flip"]
    path = tmp_path / "g.onnx"
    export_graph(EngineModule(net, dcfg, views), 40, 56, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert isinstance(session.get_inputs()[0].shape[0], str)  # symbolic batch axis
    for n in (1, 5):
        x = torch.randint(0, 256, (n, 3, 40, 56), dtype=torch.uint8)
        with torch.no_grad():
            ref = batch_logits(net, x, torch.device("cpu"), batch_normalize(dcfg), views).numpy()
        got = session.run(None, {"pixels": x.numpy()})[0]
        assert got.shape == (n, 5)
        assert np.abs(got - ref).max() < 1e-4


def test_export_writes_graphs_and_passes_parity(exported, run_dir):
    from carclf.artifacts.run import RunDir
    from carclf.io import file_sha256

    doc = _doc(exported)
    run = RunDir.open(run_dir)
    assert [e["fold"] for e in doc["engines"]] == run.completed_folds() == [0, 1]
    assert doc["parity"]["passed"] is True
    assert doc["parity"]["photos"] == "out-of-fold"
    assert doc["parity"]["n"] > 0
    assert doc["parity"]["max_abs_diff"] < 1e-4
    for e in doc["engines"]:
        assert e["temperature"] == pytest.approx(run.temperature(e["fold"]))
        assert e["views"] == ["orig", "flip"]
        assert e["data_config"]["input_size"] == [3, 64, 64]
        for f in e["files"].values():
            assert file_sha256(exported / f["file"]) == f["sha256"]
    assert doc["classes"] == run.read_meta()["classes"]


def test_rebuilt_predictor_needs_no_checkpoint(exported, run_dir, synth_data, tmp_path, monkeypatch):
    """The export folder alone (moved elsewhere, torch.load forbidden) gives PyTorch's probabilities."""
    from carclf.infer.predictor import Predictor

    photos = _test_photos(synth_data)
    torch_pred = Predictor.from_run(run_dir, device="cpu")
    ref, _ = torch_pred.predict(photos, num_workers=0)
    moved = tmp_path / "moved"
    shutil.copytree(exported, moved)

    def no_checkpoints(*args, **kwargs):
        raise AssertionError("the export must not read a torch checkpoint")

    monkeypatch.setattr(torch, "load", no_checkpoints)
    onnx_pred = Predictor.from_export(moved)
    assert all(e.engine == "onnx" for e in onnx_pred.engines)
    got, bad = onnx_pred.predict(photos, num_workers=0)
    assert bad == []
    assert onnx_pred.output_classes == torch_pred.output_classes
    assert onnx_pred.temperatures == pytest.approx(torch_pred.temperatures)
    assert np.abs(got - ref).max() < 1e-4
    # the same bytes through predict_images (the serving path) give the same rows
    p_bytes, _ = onnx_pred.predict_images([photos[0].read_bytes()])
    assert np.abs(p_bytes[0] - got[0]).max() < 1e-9


def test_swap_engines_keeps_the_predictor(exported, run_dir, synth_data):
    from carclf.infer.onnx_engine import swap_engines
    from carclf.infer.predictor import Predictor

    photos = _test_photos(synth_data)[:4]
    predictor = Predictor.from_run(run_dir, device="cpu")
    ref, _ = predictor.predict(photos, num_workers=0)
    swap_engines(predictor, exported)
    assert [e.engine for e in predictor.engines] == ["onnx", "onnx"]
    got, _ = predictor.predict(photos, num_workers=0)
    assert np.abs(got - ref).max() < 1e-4


def _read_csv(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    with open(path, encoding="utf-8-sig", newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], [r[0] for r in rows[1:]], np.array([[float(v) for v in r[1:]] for r in rows[1:]])


def _reuse_traced_graph(monkeypatch, exported: Path) -> None:
    """Export without tracing again (10-20 s on 2 cores): the module's graph of the same engine is copied (the same
    run's fold, so the same weights); the parity check still compares each engine."""
    from carclf.export import exporter

    def copied(module, h, w, path):
        shutil.copy(exported / path.name, path)
        return 20

    monkeypatch.setattr(exporter, "export_graph", copied)


def test_predict_engine_onnx_gives_the_same_submission(exported, run_dir, synth_data, tmp_path, capsys,
                                                       monkeypatch):
    from carclf.cli import main

    _reuse_traced_graph(monkeypatch, exported)

    torch_csv, onnx_csv, export_csv = tmp_path / "torch.csv", tmp_path / "onnx.csv", tmp_path / "export.csv"
    assert main(["predict", str(run_dir), "--data", str(synth_data), "-o", str(torch_csv), "--device", "cpu"]) == 0
    # a run with --engine onnx: exported on the fly into a temporary folder
    assert main(["predict", str(run_dir), "--data", str(synth_data), "-o", str(onnx_csv), "--engine", "onnx"]) == 0
    # an export directory: ONNX Runtime without --engine
    assert main(["predict", str(exported), "--data", str(synth_data), "-o", str(export_csv)]) == 0
    header, ids, ref = _read_csv(torch_csv)
    for other in (onnx_csv, export_csv):
        h2, ids2, got = _read_csv(other)
        assert (h2, ids2) == (header, ids)
        assert np.abs(got - ref).max() < 1e-4
    assert "exporting" in capsys.readouterr().out


def test_int8_graphs_are_quantised_and_scored(exported, synth_data):
    import onnx

    from carclf.infer.predictor import Predictor

    doc = _doc(exported)
    assert doc["int8"]["mode"] == "static"
    for row, e in zip(doc["int8"]["engines"], doc["engines"], strict=True):
        assert row["n"] > 0
        assert {"log_loss_fp32", "log_loss_int8", "accuracy_fp32", "accuracy_int8"} <= set(row)
        ops = {n.op_type for n in onnx.load(str(exported / e["files"]["int8"]["file"])).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        assert "training photos" in e["files"]["int8"]["calibration"]
    assert doc["int8"]["delta_log_loss"] == pytest.approx(doc["int8"]["log_loss_int8"] - doc["int8"]["log_loss_fp32"])
    int8 = Predictor.from_export(exported, precision="int8")
    fp32 = Predictor.from_export(exported)
    photos = _test_photos(synth_data)[:6]
    p8, _ = int8.predict(photos, num_workers=0)
    p32, _ = fp32.predict(photos, num_workers=0)
    assert np.allclose(p8.sum(axis=1), 1.0)
    assert not np.array_equal(p8, p32)  # really another graph


def test_changed_graph_is_refused(exported, tmp_path):
    from carclf.infer.predictor import Predictor

    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    with open(copy / "fold1.onnx", "r+b") as fh:
        fh.seek(-8, 2)
        fh.write(b"\x00" * 8)
    with pytest.raises(CarclfError, match=r"fold1\.onnx.*checksum"):
        Predictor.from_export(copy)


def test_export_refuses_to_overwrite_what_it_did_not_write(exported, run_dir, tmp_path):
    from carclf.export.exporter import export_model

    with pytest.raises(CarclfError, match="--overwrite"):
        export_model(run_dir, exported)
    with pytest.raises(CarclfError, match="inside the run directory"):
        export_model(run_dir, run_dir / "onnx")
    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    (copy / "notes.txt").write_text("mine")
    with pytest.raises(CarclfError, match="notes.txt"):
        export_model(run_dir, copy, overwrite=True)
    assert (copy / "notes.txt").is_file()
    assert (copy / "fold0.onnx").is_file()
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "a.onnx").write_text("not carclf's")
    with pytest.raises(CarclfError, match="not made by carclf"):
        export_model(run_dir, plain, overwrite=True)


def test_parity_falls_back_to_synthetic_photos(exported, run_dir, tmp_path, monkeypatch):
    """With the run's data gone the parity check runs on synthetic photos and says so (the graph is copied from
    the module's export instead of traced again, to keep the test fast)."""
    from carclf.export import exporter

    run_copy = tmp_path / "run"
    shutil.copytree(run_dir, run_copy)
    cfg_path = run_copy / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
    cfg["data"]["root"] = str(tmp_path / "gone")
    cfg_path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")

    _reuse_traced_graph(monkeypatch, exported)
    lines: list[str] = []
    exporter.export_model(run_copy, tmp_path / "exp", log=lines.append)
    doc = _doc(tmp_path / "exp")
    assert doc["parity"]["photos"] == "synthetic"
    assert doc["parity"]["passed"]
    assert any("synthetic" in line and "not on disk" in line for line in lines)


# ------------------------------------------------------------------------------------------------- an ensemble
@pytest.fixture(scope="module")
def ensemble_dir(run_dir, synth_data, tmp_path_factory) -> Path:
    """An ensemble of the module's run and a second run at another input size, with a vector calibration (its
    arrays in calibration.npz) put in by hand so the export has arrays to carry."""
    from carclf.config import load_config
    from carclf.ensemble.build import build_ensemble
    from carclf.io import atomic_savez, file_sha256
    from carclf.train.loop import train

    other = train(load_config(None, tiny_overrides(synth_data, run_dir.parent, **{
        "name": "other size", "train.folds": "all", "train.seed": 1, "data.img_size": 80})), log=lambda s: None)
    ens = tmp_path_factory.mktemp("ens") / "두 모델 ensemble"
    build_ensemble([str(run_dir), str(other)], ens, cv_folds=2, calibrations=("none", "temperature"),
                   log=lambda s: None)
    doc = yaml.safe_load((ens / "ensemble.yaml").read_text(encoding="utf-8"))
    for m in doc["members"]:
        m["weight"] = 0.5  # both members in the export, whatever the selection chose
    rng = np.random.default_rng(0)
    n = len(doc["classes"])
    atomic_savez(ens / "calibration.npz", a=rng.uniform(0.7, 1.3, n), b=rng.normal(0, 0.3, n))
    doc["calibration"] = {"kind": "vector", "file": "calibration.npz", "sha256": file_sha256(ens / "calibration.npz")}
    (ens / "ensemble.yaml").write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return ens


def test_ensemble_export_gives_the_torch_ensembles_probabilities(ensemble_dir, synth_data, tmp_path):
    from carclf.export.exporter import export_model
    from carclf.infer.predictor import Predictor

    out = tmp_path / "export"
    lines: list[str] = []
    export_model(ensemble_dir, out, log=lines.append)
    doc = _doc(out)
    assert doc["source"]["kind"] == "ensemble"
    names = [e["name"] for e in doc["engines"]]
    assert names == ["m0.fold0", "m0.fold1", "m1.fold0", "m1.fold1"]
    members = [m["name"] for m in yaml.safe_load((ensemble_dir / "ensemble.yaml").read_text(encoding="utf-8"))[
        "members"]]
    assert [e["member"] for e in doc["engines"]] == [members[0]] * 2 + [members[1]] * 2
    assert {tuple(e["data_config"]["input_size"]) for e in doc["engines"]} == {(3, 64, 64), (3, 80, 80)}
    assert doc["parity"]["passed"]
    assert doc["parity"]["photos"] == "out-of-fold"
    assert doc["parity"]["n"] == 8  # both members validated the same photos: 8 distinct ones, not 4 twice
    assert doc["predictor"]["postprocess"]["calibration"]["kind"] == "vector"
    assert (out / "calibration.npz").is_file()

    photos = _test_photos(synth_data)
    ref, _ = Predictor.from_ensemble(ensemble_dir, device="cpu").predict(photos, num_workers=0)
    moved = tmp_path / "moved elsewhere"
    shutil.copytree(out, moved)
    onnx_pred = Predictor.from_export(moved)
    got, bad = onnx_pred.predict(photos, num_workers=0)
    assert bad == []
    assert np.abs(got - ref).max() < 1e-4
    assert onnx_pred.eps == pytest.approx(float(yaml.safe_load(
        (ensemble_dir / "ensemble.yaml").read_text(encoding="utf-8"))["eps"]))
    # the calibration arrays are checked like the graphs
    np.savez(moved / "calibration.npz", a=np.ones(3), b=np.zeros(3))
    with pytest.raises(CarclfError, match=r"calibration\.npz.*checksum.*Export the ensemble again"):
        Predictor.from_export(moved)
    # --overwrite of an ensemble export clears its own files, calibration.npz included
    export_model(ensemble_dir, out, overwrite=True, log=lines.append)
    assert _doc(out)["parity"]["passed"]


def test_folds_with_a_frozen_stem_reuse_one_trace(synth_data, tmp_path):
    """With views of two sizes the network is called twice in the graph, so its weights stay initialisers named
    after their parameters; a frozen stem's BatchNorm is still folded into constants by the exporter, but the frozen
    layers are the same in every fold, so the second fold reuses the first fold's trace (with its own weights), and
    parity holds."""
    from carclf.config import load_config
    from carclf.export.exporter import export_model
    from carclf.train.loop import train

    run = train(load_config(None, tiny_overrides(synth_data, tmp_path, **{"train.folds": "all", "model.freeze": 2,
                                                                   "predict.tta": "orig,zoom1.15"})),
                log=lambda s: None)
    lines: list[str] = []
    export_model(run, tmp_path / "export", log=lines.append)
    assert any(line.startswith("exported fold1") and "fold0.onnx with fold1's weights" in line for line in lines)
    doc = _doc(tmp_path / "export")
    assert doc["parity"]["passed"]
    assert max(doc["parity"]["max_logit_diff"]) < 1e-3


def test_parity_photos_are_found_in_a_macos_zip_with_nfd_folder_names(run_dir, synth_data, tmp_path):
    """A data folder unpacked from a macOS zip spells its Korean class folders in NFD; the run stores NFC paths. The
    export's parity (and int8) photos are found there as the report finds its thumbnails: one resolver."""
    import unicodedata

    from carclf.artifacts.run import RunDir
    from carclf.export.photos import oof_photos, training_photos

    nfd_root = tmp_path / "unzipped"
    shutil.copytree(synth_data, nfd_root)
    renamed = 0
    for folder in sorted((nfd_root / "train").iterdir()):
        nfd = unicodedata.normalize("NFD", folder.name)
        if nfd != folder.name:
            folder.rename(folder.with_name(nfd))
            renamed += 1
    assert renamed > 0  # the synthetic classes are Korean: NFD spells them differently
    run = RunDir.open(run_dir)
    on_nfc = oof_photos(run, 0, 1000, root=synth_data)
    on_nfd = oof_photos(run, 0, 1000, root=nfd_root)
    assert len(on_nfc.paths) > 0
    assert len(on_nfd.paths) == len(on_nfc.paths)
    assert all(p.is_file() for p in on_nfd.paths)
    np.testing.assert_array_equal(on_nfd.labels, on_nfc.labels)
    assert len(training_photos(run, 0, 8, root=nfd_root)) == len(training_photos(run, 0, 8, root=synth_data)) > 0
