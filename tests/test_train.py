"""Training on tiny synthetic data: loss goes down, resume is exact, bad photos are skipped, runs are protected."""

import csv
import shutil

import pytest
import torch

from carclf.config import load_config
from carclf.errors import CarclfError
from carclf.train.loop import train
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow


def _metrics(run_dir, k=0):
    with (run_dir / f"fold{k}" / "metrics.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_short_training_lowers_the_loss_and_writes_the_fold_artefacts(synth_data, tmp_path):
    cfg = load_config(None, tiny_overrides(synth_data, tmp_path, **{"train.epochs": 4, "train.lr": 3e-3}))
    run = train(cfg, log=lambda s: None)
    rows = _metrics(run)
    assert len(rows) == 4
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert float(rows[-1]["val_log_loss"]) < float(rows[0]["val_log_loss"])
    fold = run / "fold0"
    for name in ("best.pt", "last.pt", "metrics.csv", "oof.npz", "summary.json"):
        assert (fold / name).is_file(), name
    assert not (run / "fold1").exists()  # train.folds defaults to fold 0 only
    assert (run / "config.yaml").is_file()
    assert (run / "folds.csv").is_file()
    import numpy as np

    with np.load(fold / "oof.npz") as z:
        assert z["logits"].shape == (len(z["indices"]), 6)
        assert (z["labels"] >= 0).all()


def test_resume_after_interruption_matches_uninterrupted_run(synth_data, tmp_path):
    over = {"train.epochs": 3, "data.num_workers": 1, "train.lr": 3e-3}
    full = train(load_config(None, tiny_overrides(synth_data, tmp_path / "a", **over)), log=lambda s: None)

    class Stop(Exception):
        pass

    def stop_after_first(k, epoch, row):
        if epoch == 0:
            raise Stop

    cfg = load_config(None, tiny_overrides(synth_data, tmp_path / "b", **over))
    with pytest.raises(Stop):
        train(cfg, on_epoch_end=stop_after_first, log=lambda s: None)
    assert len(_metrics(cfg.run_dir)) == 1
    resumed = train(cfg, resume=True, log=lambda s: None)
    a = torch.load(full / "fold0" / "last.pt", weights_only=False)
    b = torch.load(resumed / "fold0" / "last.pt", weights_only=False)
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"
    assert [r["train_loss"] for r in _metrics(full)] == [r["train_loss"] for r in _metrics(resumed)]


def test_existing_run_dir_is_refused_unless_resume_or_overwrite(synth_data, tmp_path):
    cfg = load_config(None, tiny_overrides(synth_data, tmp_path))
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "notes.txt").write_text("mine")
    with pytest.raises(CarclfError, match="already exists: pass --resume"):
        train(cfg, log=lambda s: None)
    assert (cfg.run_dir / "notes.txt").read_text() == "mine"
    with pytest.raises(CarclfError, match="is not a carclf run directory"):
        train(cfg, resume=True, log=lambda s: None)
    with pytest.raises(CarclfError, match="was not made by carclf"):
        train(cfg, overwrite=True, log=lambda s: None)
    assert (cfg.run_dir / "notes.txt").read_text() == "mine"


def test_resume_with_a_different_config_is_refused(synth_data, tmp_path):
    cfg = load_config(None, tiny_overrides(synth_data, tmp_path))
    train(cfg, log=lambda s: None)
    changed = load_config(None, tiny_overrides(synth_data, tmp_path, **{"train.lr": 0.5}))
    with pytest.raises(CarclfError, match=r"train.lr: 0.001 -> 0.5"):
        train(changed, resume=True, log=lambda s: None)
    # Adding folds to a finished run is a resume too; fold 0 is kept, fold 1 trained.
    more = load_config(None, tiny_overrides(synth_data, tmp_path, **{"train.folds": "all"}))
    before = (cfg.run_dir / "fold0" / "best.pt").stat().st_mtime_ns
    train(more, resume=True, log=lambda s: None)
    assert (cfg.run_dir / "fold1" / "oof.npz").is_file()
    assert (cfg.run_dir / "fold0" / "best.pt").stat().st_mtime_ns == before


def test_bad_photos_are_skipped_and_listed(synth_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    first = sorted((data / "train").iterdir())[0]
    good = sorted(first.glob("*.jpg"))
    (first / "zero.jpg").write_bytes(b"")
    (first / "text.jpg").write_text("this is not a photo")
    (first / "trunc.jpg").write_bytes(good[0].read_bytes()[:300])
    logs = []
    run = train(load_config(None, tiny_overrides(data, tmp_path)), log=logs.append)
    with (run / "skipped.csv").open() as fh:
        skipped = {r["path"].rsplit("/", 1)[-1]: r["reason"] for r in csv.DictReader(fh)}
    bad = {"zero.jpg", "text.jpg", "trunc.jpg"}
    assert bad <= set(skipped)
    assert skipped["zero.jpg"] == "bad file: zero-byte file"
    assert all(skipped[n].startswith("bad file:") for n in bad)
    # Anything else left out is a duplicate the synthetic data planted on purpose, never a good unique photo.
    assert all(skipped[n].startswith("duplicate of") for n in set(skipped) - bad)
    assert any("leaving" in line and "out of training" in line for line in logs)


def test_photo_that_breaks_mid_epoch_is_listed_not_fatal(synth_data, tmp_path, monkeypatch):
    """A file that passed the up-front check but fails to decode later is listed, and training completes."""
    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    cfg = load_config(None, tiny_overrides(data, tmp_path, **{"train.folds": "all"}))
    from carclf.data import rundata

    original = rundata.run_prepare
    victim = sorted(sorted((data / "train").iterdir())[0].glob("*.jpg"))[-1]

    def prepare_then_corrupt(cfg, log=print):
        result = original(cfg, log)
        victim.write_bytes(b"")  # breaks after the check; lands in a train split of one fold, val of the other
        return result

    monkeypatch.setattr(rundata, "run_prepare", prepare_then_corrupt)
    run = train(cfg, log=lambda s: None)
    assert (run / "fold0" / "oof.npz").is_file()
    assert (run / "fold1" / "oof.npz").is_file()
    with (run / "skipped.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert (str(victim), "failed to decode during training") in [(r["path"], r["reason"]) for r in rows]
