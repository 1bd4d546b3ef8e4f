import json

import numpy as np
import pytest

from carclf.calibrate.temperature import calibrate_run
from carclf.metrics import T_MAX, fit_temperature
from carclf.metrics import logit_nll as nll


def _overconfident(n=600, c=10, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    logits = rng.normal(0, 1, (n, c))
    logits[np.arange(n), labels] += 2.0  # informative...
    return logits * 4.0, labels  # ...but scaled up: far too confident


def test_temperature_scaling_lowers_nll_of_overconfident_logits():
    logits, labels = _overconfident()
    t = fit_temperature(logits, labels)
    assert t > 2.0
    assert nll(logits, labels, t) < nll(logits, labels) - 0.3
    # The fit is a minimum: nudging T either way does not help.
    assert nll(logits, labels, t) <= min(nll(logits, labels, t * 1.1), nll(logits, labels, t / 1.1))


def test_underconfident_logits_get_t_below_one():
    logits, labels = _overconfident()
    assert fit_temperature(logits / 16, labels) < 1.0


def test_uninformative_logits_hit_the_bound_instead_of_infinity():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (300, 5))
    labels = rng.integers(0, 5, 300)
    assert fit_temperature(logits, labels) == pytest.approx(T_MAX)


def _fake_run(root, folds):
    """A run directory holding only what calibrate reads: the marker, a config and each fold's OOF logits."""
    from carclf.artifacts.run import RunDir
    from carclf.config import Config

    rd = RunDir(root)
    rd.create(Config(name="x"))
    for k, (logits, labels) in folds.items():
        rd.fold(k).dir.mkdir()
        rd.fold(k).best.write_bytes(b"")
        np.savez(rd.fold(k).oof, indices=np.arange(len(labels)), labels=labels, logits=logits)
    return rd


def test_calibrate_run_writes_a_temperature_per_fold(tmp_path):
    rd = _fake_run(tmp_path / "run", {k: _overconfident(seed=k) for k in (0, 1)})
    rd.fold(2).dir.mkdir()  # a fold still training: no oof.npz yet
    logs = []
    rows = calibrate_run(rd.path, log=logs.append)
    assert [r["fold"] for r in rows] == [0, 1]
    assert any("fold(s) 2 not complete" in line for line in logs)
    for k, r in enumerate(rows):
        saved = json.loads(rd.fold(k).calibration.read_text())
        assert saved["temperature"] == pytest.approx(r["temperature"])
        assert r["nll_after"] < r["nll_before"]
        assert "warning" not in r


def test_temperature_at_its_bound_is_a_warning_naming_the_fold(tmp_path):
    rng = np.random.default_rng(1)
    chance = rng.normal(0, 3, (300, 5)), rng.integers(0, 5, 300)
    rd = _fake_run(tmp_path / "run", {0: _overconfident(seed=0), 3: chance})
    logs = []
    rows = calibrate_run(rd.path, log=logs.append)
    assert "warning" not in rows[0]
    assert rows[1]["temperature"] == pytest.approx(T_MAX)
    assert "fold 3" in rows[1]["warning"]
    assert "no better than chance" in rows[1]["warning"]
    assert [line for line in logs if line.startswith("warning: fold 3")]
    assert "warning" in json.loads(rd.fold(3).calibration.read_text())
