import json

import numpy as np
import pytest

from carclf.calibrate.temperature import T_MAX, calibrate_run, fit_temperature, nll


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


def test_calibrate_run_writes_a_temperature_per_fold(tmp_path):
    (tmp_path / "config.yaml").write_text("name: x\n")
    for k in (0, 1):
        logits, labels = _overconfident(seed=k)
        (tmp_path / f"fold{k}").mkdir()
        np.savez(tmp_path / f"fold{k}" / "oof.npz", indices=np.arange(len(labels)), labels=labels, logits=logits)
    rows = calibrate_run(tmp_path)
    assert [r["fold"] for r in rows] == [0, 1]
    for k, r in enumerate(rows):
        saved = json.loads((tmp_path / f"fold{k}" / "calibration.json").read_text())
        assert saved["temperature"] == pytest.approx(r["temperature"])
        assert r["nll_after"] < r["nll_before"]
