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
        return [r for r in csv.DictReader(fh) if r["train_loss"]]  # epoch rows


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
    with pytest.raises(CarclfError, match="already exists and is not a carclf run directory"):
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


def _copy(synth_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    return data, sorted(p for p in (data / "train").iterdir() if p.is_dir())


def test_a_small_class_merged_into_its_twin_trains(synth_data, tmp_path):
    """merges.yaml rescues a class with fewer photos than folds (the fold check counts it with its group)."""
    data, classes = _copy(synth_data, tmp_path)
    small, twin = classes[0], classes[1]
    for photo in sorted(small.glob("*.jpg"))[1:]:
        photo.unlink()  # one photo left: fewer than the 2 folds
    cfg = load_config(None, tiny_overrides(data, tmp_path))
    with pytest.raises(CarclfError, match=r"fewer usable photos .*than the 2 folds.*merge"):
        train(cfg, log=lambda s: None)
    (data / "merges.yaml").write_text(f"merges:\n  - ['{twin.name}', '{small.name}']\n", encoding="utf-8")
    run = train(load_config(None, tiny_overrides(data, tmp_path, name="merged")), log=lambda s: None)
    import json

    meta = json.loads((run / "run.json").read_text(encoding="utf-8"))
    assert small.name not in meta["classes"]
    assert len(meta["classes"]) == len(classes) - 1


def test_a_class_with_no_usable_photo_stops_or_is_dropped_by_policy(synth_data, tmp_path):
    data, classes = _copy(synth_data, tmp_path)
    empty = classes[2]
    for photo in empty.glob("*.jpg"):
        photo.write_bytes(b"")  # every photo of the class is a zero-byte file
    with pytest.raises(CarclfError, match=rf"no usable photo left.*'{empty.name}'.*data.empty_class=drop"):
        train(load_config(None, tiny_overrides(data, tmp_path)), log=lambda s: None)
    logs = []
    over = tiny_overrides(data, tmp_path, **{"data.empty_class": "drop", "train.folds": "all"})
    run = train(load_config(None, over), log=logs.append)
    assert any(line.startswith("warning: training without 1 class") and empty.name in line for line in logs)
    from carclf.infer.predict import predict_run

    sub, _ = predict_run(run, data, tmp_path / "sub.csv", log=lambda s: None)
    with sub.open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert all(float(r[empty.name]) == pytest.approx(1e-4, rel=1e-3) for r in rows)  # data.dropped_class_prob
    assert all(sum(float(v) for k, v in r.items() if k != "ID") == pytest.approx(1.0) for r in rows)
    from carclf.analyze.evaluate import evaluate_run

    assert evaluate_run(run)[-1]["log_loss"] > 0


def test_ema_decay_is_logged_and_warmup_is_a_choice(synth_data, tmp_path):
    over = {"train.epochs": 2, "train.ema_decay": 0.9}
    run = train(load_config(None, tiny_overrides(synth_data, tmp_path / "w", **over)), log=lambda s: None)
    rows = _metrics(run)
    for r in rows:  # timm's warm-up after `step` updates: 1 - step^(-2/3), capped at train.ema_decay
        assert float(r["ema_decay"]) == pytest.approx(min(0.9, 1 - int(r["step"]) ** (-2 / 3)), rel=1e-5)
    assert float(rows[0]["ema_decay"]) < 0.9  # still warming up after the first epoch's few updates
    plain = train(load_config(None, tiny_overrides(synth_data, tmp_path / "p", **over, **{"train.ema_warmup": False})),
                  log=lambda s: None)
    assert [float(r["ema_decay"]) for r in _metrics(plain)] == [0.9, 0.9]


def test_learning_rate_is_not_rescaled_unless_asked(synth_data, tmp_path):
    import json

    logs = []
    over = {"data.batch_size": 8, "train.lr": 2e-3}
    run = train(load_config(None, tiny_overrides(synth_data, tmp_path / "a", **over)), log=logs.append)
    assert json.loads((run / "run.json").read_text())["lr_effective"] == 2e-3
    assert json.loads((run / "fold0" / "summary.json").read_text())["lr_effective"] == 2e-3
    assert any("lr 0.002, EMA decay" in line for line in logs)
    scaled = train(load_config(None, tiny_overrides(synth_data, tmp_path / "b", **over, **{"train.lr_base_size": 32})),
                   log=logs.append)
    assert json.loads((scaled / "run.json").read_text())["lr_effective"] == pytest.approx(5e-4)
    assert any("lr 0.0005 = train.lr 0.002 x linear scaling to global batch 8 from 32" in line for line in logs)


def _parts_and_loader(synth_data, tmp_path, inf_at_step, scaler):
    from carclf.data.dataset import ImageDataset, make_loader
    from carclf.data.scan import scan_train
    from carclf.data.transforms import data_config_for, eval_transform
    from carclf.train.loop import build_fold

    cfg = load_config(None, tiny_overrides(synth_data, tmp_path))
    ts = scan_train(synth_data)
    ds = ImageDataset(ts.paths[:32], ts.labels[:32], eval_transform(data_config_for(cfg)), 64)
    parts = build_fold(cfg, len(ts.classes), 2, torch.device("cpu"))
    real = parts.criterion
    calls = []

    def criterion(out, y):
        calls.append(1)
        loss = real(out, y)
        return loss * float("inf") if len(calls) == inf_at_step else loss

    parts.criterion = criterion
    parts.scaler = scaler
    return cfg, parts, make_loader(ds, 16, 0)


def test_non_finite_loss_is_skipped_under_fp16_loss_scaling(synth_data, tmp_path):
    from carclf.train.loop import train_one_epoch

    scaler = torch.amp.GradScaler("cpu")
    cfg, parts, loader = _parts_and_loader(synth_data, tmp_path, inf_at_step=1, scaler=scaler)
    before = {k: v.clone() for k, v in parts.model.state_dict().items()}
    scale = scaler.get_scale()
    out = train_one_epoch(parts, loader, cfg, torch.device("cpu"), 0, 0, "t")
    assert out["skipped"] == 1
    assert out["step"] == 2
    assert scaler.get_scale() < scale  # GradScaler lowered the scale after the overflow
    assert torch.isfinite(torch.tensor(out["loss"]))
    after = parts.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the finite step still trained


def test_non_finite_loss_stops_fp32_training_naming_epoch_and_step(synth_data, tmp_path):
    from carclf.train.loop import train_one_epoch

    cfg, parts, loader = _parts_and_loader(synth_data, tmp_path, inf_at_step=2, scaler=None)
    with pytest.raises(CarclfError, match=r"diverged: loss inf in epoch 4, step 2 of 2"):
        train_one_epoch(parts, loader, cfg, torch.device("cpu"), 6, 3, "t")


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch EVIL_RAN",))


def test_checkpoints_from_elsewhere_never_run_code(synth_data, tmp_path, monkeypatch):
    """A run directory received from someone else: a pickled payload in best.pt or last.pt is refused, not run."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, tiny_overrides(synth_data, tmp_path, **{"train.epochs": 2}))
    run = train(cfg, log=lambda s: None)
    good = torch.load(run / "fold0" / "best.pt", weights_only=True)
    torch.save({**good, "extra": _Evil()}, run / "fold0" / "best.pt")
    from carclf.infer.predictor import Predictor

    with pytest.raises(CarclfError, match="is not the file training wrote"):  # the hash recorded at training
        Predictor.open(run)
    import json

    from carclf.io import file_sha256

    summary = json.loads((run / "fold0" / "summary.json").read_text())
    summary["best_sha256"] = file_sha256(run / "fold0" / "best.pt")  # someone planted the hash too
    (run / "fold0" / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(CarclfError, match="cannot read checkpoint"):
        Predictor.open(run)
    state = torch.load(run / "fold0" / "last.pt", weights_only=True)
    torch.save({**state, "epoch": 0, "extra": _Evil()}, run / "fold0" / "last.pt")
    (run / "fold0" / "oof.npz").unlink()  # unfinished: resume reads last.pt
    with pytest.raises(CarclfError, match="cannot resume from"):
        train(cfg, resume=True, log=lambda s: None)
    assert not (tmp_path / "EVIL_RAN").exists()


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/fd"), reason="needs /proc/self/fd (Linux)")
def test_disk_full_during_training_is_one_line_exit_2_and_the_run_resumes(synth_data, tmp_path, monkeypatch, capsys):
    """The disk fills while epoch 2's last.pt is written: one line naming that file and the remedy, exit 2, the
    checkpoints of epoch 1 intact; after space is freed, --resume finishes the fold."""
    from carclf.cli import main
    from tests.test_io import full_disk

    over = tiny_overrides(synth_data, tmp_path, **{"train.epochs": 2})
    saves = []

    def second_last_pt(path: str) -> bool:
        if path.rsplit("/", 1)[-1].startswith(".last.pt."):
            saves.append(path)
        return len(saves) == 2 and path == saves[-1]

    full_disk(monkeypatch, free=4096, only=second_last_pt)
    assert main(["train", *over]) == 2
    err = capsys.readouterr().err
    fold = tmp_path / "t" / "fold0"
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    assert f"'{fold / 'last.pt'}'" in err
    assert "disk is full" in err
    assert "--resume" in err
    state = torch.load(fold / "last.pt", weights_only=True)
    assert state["epoch"] == 0  # epoch 1's checkpoint, untouched
    torch.load(fold / "best.pt", weights_only=True)
    assert not [p.name for p in fold.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()  # space freed
    assert main(["train", *over, "--resume"]) == 0
    assert (fold / "oof.npz").is_file()
    assert len(_metrics(tmp_path / "t")) == 2
