"""The full-data fit (train.folds=full): epochs and weights from the folds, every usable photo, no validation,
and the fold temperatures for calibration."""

import json

import pytest

from carclf.artifacts.run import FULL, RunDir
from carclf.config import load_config
from carclf.data.splits import parse_folds
from carclf.errors import CarclfError
from carclf.train.loop import train
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow


def test_parse_folds_puts_full_last():
    assert parse_folds("all,full", 3) == [0, 1, 2, FULL]
    assert parse_folds("full", 3) == [FULL]
    assert parse_folds("1, full", 3) == [1, FULL]
    with pytest.raises(CarclfError, match="full"):
        parse_folds("0,half", 3)


def test_full_fit_needs_folds_or_explicit_epochs(synth_data, tmp_path):
    cfg = load_config(None, tiny_overrides(synth_data, tmp_path, **{"train.folds": "full"}))
    with pytest.raises(CarclfError, match="full_epochs"):
        train(cfg, log=lambda s: None)


def test_full_fit_follows_the_folds_and_trains_on_every_usable_photo(synth_data, tmp_path):
    over = {"train.folds": "all,full", "train.epochs": 3, "train.lr": 3e-3, "train.swa_start_epoch": 1}
    cfg = load_config(None, tiny_overrides(synth_data, tmp_path, **over))
    run = train(cfg, log=lambda s: None)
    rd = RunDir.open(run)
    assert rd.completed_folds() == [0, 1]  # the full fit is not a fold: calibrate/evaluate/ensembles skip it
    assert rd.has_full()
    fold_summaries = [json.loads(rd.fold(k).summary.read_text()) for k in (0, 1)]
    full = json.loads(rd.full.summary.read_text())
    expected_epochs = sorted(s["best_epoch"] + 1 for s in fold_summaries)
    assert full["epochs"] in range(expected_epochs[0], expected_epochs[-1] + 1)
    assert full["best_weights"] in {s["best_weights"] for s in fold_summaries}
    import numpy as np

    n_validated = sum(len(np.load(rd.fold(k).oof)["indices"]) for k in (0, 1))  # every usable photo, once
    assert full["n_train"] == n_validated
    rows = rd.full.metrics.read_text().splitlines()
    assert len(rows) == 1 + full["epochs"]  # one row per epoch, no validation figures
    assert ",nan," in rows[1]  # val_log_loss left empty (nan): nothing to validate on
    assert not rd.full.oof.exists()
    # the full fit takes the folds' mean temperature (1.0 before calibrate)
    from carclf.calibrate.temperature import calibrate_run

    calibrate_run(run, log=lambda s: None)
    temps = [rd.temperature(k) for k in (0, 1)]
    assert rd.temperature(FULL) == pytest.approx(sum(temps) / 2)
    # predict.full=beside (default): the Predictor holds the folds and the full fit, with the folds' mean temperature
    from carclf.infer.predictor import Predictor

    predictor = Predictor.open(run, device="cpu")
    assert predictor.folds == [0, 1, FULL]
    assert predictor.temperatures[-1] == pytest.approx(sum(temps) / 2)
    # resuming a finished run trains nothing again
    again = train(load_config(None, tiny_overrides(synth_data, tmp_path, **over)), resume=True, log=lambda s: None)
    assert json.loads(RunDir.open(again).full.summary.read_text()) == full
