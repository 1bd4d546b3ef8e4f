"""The Predictor: built from plain parts, opened from a run / an ensemble / an export by what the path is, its engines
behind one protocol, its version, and its probabilities against what training recorded for the same photos."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from carclf.errors import CarclfError
from tests.conftest import tiny_overrides


class FixedEngine:
    """An engine without a network: every photo gets the same logits (what the Predictor does after them is the
    point)."""

    engine = "fixed"

    def __init__(self, logits: list[float], size: int = 32) -> None:
        self.row = np.asarray(logits, dtype=np.float64)
        self.dcfg = {"input_size": (3, size, size), "interpolation": "bilinear", "crop_pct": 1.0,
                     "crop_mode": "center", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
        self.views = ["orig"]

    def logits(self, x) -> np.ndarray:
        return np.tile(self.row, (len(x), 1))


def _plain_predictor(temperatures=(1.0, 2.0)):
    from carclf.config import Config
    from carclf.data.merges import identity
    from carclf.infer.predictor import Predictor

    cfg = Config()
    cfg.data.num_workers = 0
    engines = [FixedEngine([2.0, 0.0, -1.0]), FixedEngine([0.0, 1.0, 0.0])]
    return Predictor(engines, list(temperatures), [0, 1], [32, 32], ["a", "b", "c"], identity(["a", "b", "c"]), cfg,
                     "v-test")


def test_a_predictor_from_plain_parts(synth_data):
    """No run directory: engines, temperatures, classes and a config are enough; the folds' tempered softmaxes are
    averaged."""
    from carclf.infer.predictor import Engine
    from carclf.metrics import softmax

    p = _plain_predictor()
    assert all(isinstance(e, Engine) for e in p.engines)
    photos = sorted((synth_data / "test").glob("*.jpg"))[:3]
    probs, bad = p.predict_paths(photos)
    assert bad == []
    want = (softmax(np.array([[2.0, 0.0, -1.0]]), 1.0) + softmax(np.array([[0.0, 1.0, 0.0]]), 2.0)) / 2
    np.testing.assert_allclose(probs, np.repeat(want, 3, axis=0), atol=1e-12)
    assert p.version == "v-test"
    assert p.output_classes == ["a", "b", "c"]
    assert p.kind == "run"
    assert p.engine_members == [0, 0]
    assert p.views == ["orig"]


def test_parts_that_do_not_line_up_are_refused():
    with pytest.raises(ValueError, match="one temperature, fold and eval size per engine"):
        _plain_predictor(temperatures=(1.0,))


@pytest.fixture(scope="module")
def run_dir(synth_data, tmp_path_factory) -> Path:
    """A tiny calibrated run with two folds."""
    from carclf.calibrate.temperature import calibrate_run
    from carclf.config import load_config
    from carclf.train.loop import train

    out = tmp_path_factory.mktemp("predictor-runs")
    over = {"train.folds": "all", "train.epochs": 2, "train.lr": 3e-3}  # learns something: a temperature below 20
    run = train(load_config(None, tiny_overrides(synth_data, out, **over)), log=lambda s: None)
    calibrate_run(run)
    return Path(run)


@pytest.mark.slow
def test_a_runs_predictor_gives_its_out_of_fold_probabilities(run_dir, synth_data):
    """Each fold's Predictor on that fold's out-of-fold photos gives what artifacts.oof computes from oof.npz (the
    same TTA, the same temperature): what calibrate and evaluate measured is what predict and serve give."""
    from carclf.artifacts.oof import load_run_oof
    from carclf.infer.predictor import Predictor

    oof = load_run_oof(run_dir)
    assert all(t != 1.0 for t in oof.temperatures.values())  # calibrated: the temperature really is applied
    for k in (0, 1):
        rows = oof.folds == k
        predictor = Predictor.from_run(run_dir, device="cpu", folds=[k])
        assert predictor.temperatures == [oof.temperatures[k]]
        got, bad = predictor.predict_paths([synth_data / "train" / p for p in oof.paths[rows]], num_workers=0)
        assert bad == []
        np.testing.assert_allclose(got, oof.merge.expand(oof.probs[rows]), atol=1e-5)


@pytest.mark.slow
def test_a_runs_version_is_what_serve_computed(run_dir, tmp_path):
    """Every fold's weights, temperature and input size, the views and the classes: the value serve used to hash
    itself, so a served run keeps its version; a new temperature is a new version."""
    from carclf.infer.predictor import Predictor
    from carclf.io import file_sha256

    p = Predictor.open(run_dir, device="cpu")
    h = hashlib.sha256()
    for k, t, s in zip(p.folds, p.temperatures, p.eval_sizes, strict=True):
        h.update(file_sha256(run_dir / f"fold{k}" / "best.pt").encode())
        h.update(f"{k}:{t!r}:{s}".encode())
    h.update(",".join(p.views).encode())
    h.update("\n".join(p.output_classes).encode())
    assert p.version == h.hexdigest()[:12]
    assert Predictor.from_run(run_dir, device="cpu").version == p.version
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    cal = copy / "fold0" / "calibration.json"
    doc = json.loads(cal.read_text())
    doc["temperature"] = doc["temperature"] * 1.5
    cal.write_text(json.dumps(doc))
    assert Predictor.open(copy, device="cpu").version != p.version


@pytest.mark.slow
def test_open_picks_the_kind_and_refuses_what_does_not_fit(run_dir, tmp_path):
    from carclf.artifacts.export import export_yaml
    from carclf.export.exporter import export_model
    from carclf.infer.onnx_engine import OnnxFold
    from carclf.infer.predictor import Engine, Predictor, TorchFold, open_predictor

    run = Predictor.open(run_dir, device="cpu")
    assert run.kind == "run"
    assert all(isinstance(e, TorchFold) and isinstance(e, Engine) for e in run.engines)
    assert run.run is not None
    assert run.runs == [run.run, run.run]
    out = tmp_path / "export"
    export_model(run_dir, out, parity_photos=4, log=lambda s: None)
    exp = Predictor.open(out)
    assert exp.kind == "export"
    assert all(isinstance(e, OnnxFold) and isinstance(e, Engine) for e in exp.engines)
    # an export's version is still the first 12 hex digits of export.yaml's SHA-256 (served versions stay put)
    assert exp.version == hashlib.sha256(export_yaml(out).read_bytes()).hexdigest()[:12]
    assert exp.run is None
    assert exp.folds == run.folds
    assert exp.temperatures == pytest.approx(run.temperatures)
    with pytest.raises(CarclfError, match="is an export: its engines are fixed in export.yaml"):
        Predictor.open(out, folds=[0])
    with pytest.raises(CarclfError, match="is an ONNX export: it runs on ONNX Runtime"):
        open_predictor(out, engine="torch")
    with pytest.raises(CarclfError, match=r"is not an export: ONNX Runtime runs the folder carclf export writes"):
        open_predictor(run_dir, engine="onnx")
    with pytest.raises(CarclfError, match="is an export folder already"):
        export_model(out, tmp_path / "again", log=lambda s: None)
    calls = []
    assert open_predictor(run_dir, engine="onnx", export_run=lambda s, **kw: calls.append((s, kw)) or exp) is exp
    assert calls == [(run_dir, {"threads": None, "log": print})]
