"""Training techniques as config keys: each test shows that the switch changes what training does."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from carclf.config import load_config
from carclf.train.loop import build_fold, set_epoch_switches, train
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow


def _metrics(run, k=0):
    with (run / f"fold{k}" / "metrics.csv").open() as fh:
        return [r for r in csv.DictReader(fh) if r["train_loss"]]  # epoch rows


def _parts(tmp_path, **over):
    cfg = load_config(None, tiny_overrides(tmp_path, tmp_path, **over))
    return cfg, build_fold(cfg, 5, 10, torch.device("cpu"))


def test_mixup_switches_off_for_a_clean_tail(tmp_path):
    cfg, parts = _parts(tmp_path, **{"aug.mixup": 0.4, "aug.cutmix": 1.0, "aug.mixup_off_epoch": 2})
    x = torch.randn(4, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3])
    assert set_epoch_switches(parts, cfg, 1)["mixup"] == 1
    torch.manual_seed(0)
    _, target = parts.mixup(x.clone(), y)
    assert (target.max(1).values < 0.85).any()  # mixed targets (beyond label smoothing)
    assert set_epoch_switches(parts, cfg, 2)["mixup"] == 0
    mixed, target = parts.mixup(x.clone(), y)
    assert torch.equal(mixed, x)
    assert target.argmax(1).tolist() == [0, 1, 2, 3]
    assert target.max(1).values.min() == pytest.approx(0.9 + 0.1 / 5)  # only label smoothing left


def test_mixup_probability_zero_leaves_batches_alone(tmp_path):
    cfg, parts = _parts(tmp_path, **{"aug.mixup": 0.4, "aug.mixup_prob": 0.0})
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(parts.mixup(x.clone(), torch.arange(4))[0], x)


def test_sgd_nesterov_and_layer_decay(tmp_path):
    cfg, parts = _parts(tmp_path, **{"train.optimizer": "sgd", "train.layer_decay": 0.7, "train.momentum": 0.8})
    opt = parts.optimizer
    assert isinstance(opt, torch.optim.SGD)
    assert opt.defaults["nesterov"] is True
    assert opt.defaults["momentum"] == 0.8
    scales = sorted({round(g["lr_scale"], 6) for g in opt.param_groups})
    assert scales[-1] == 1.0  # the head
    assert scales[0] < 0.7**3  # the stem: several groups further down
    parts.scheduler.step_update(5)  # timm's scheduler sets every group's lr to the schedule x its lr_scale
    lrs = {round(g["lr"] / g["lr_scale"], 12) for g in opt.param_groups if g["lr_scale"] > 0}
    assert len(lrs) == 1  # one schedule, scaled per layer group


def test_gradient_checkpointing_and_compile_switches(tmp_path, monkeypatch):
    compiled = []

    def fake_compile(model, **kw):
        compiled.append(model)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    cfg, parts = _parts(tmp_path, **{"train.grad_checkpointing": True, "train.compile": True})
    assert parts.model.grad_checkpointing is True
    assert compiled == [parts.model]
    _, plain = _parts(tmp_path)
    assert plain.model.grad_checkpointing is False
    assert plain.forward is plain.model


def test_gradient_accumulation_counts_optimizer_updates(synth_data, tmp_path):
    over = {"data.batch_size": 8, "train.epochs": 2}
    one = train(load_config(None, tiny_overrides(synth_data, tmp_path / "a", **over)), log=lambda s: None)
    logs = []
    acc = train(load_config(None, tiny_overrides(synth_data, tmp_path / "b", **over, **{"train.accum_steps": 2})),
                log=logs.append)
    steps_one = [int(r["step"]) for r in _metrics(one)]
    steps_acc = [int(r["step"]) for r in _metrics(acc)]
    per_epoch = steps_one[0]
    assert steps_acc == [math.ceil(per_epoch / 2), 2 * math.ceil(per_epoch / 2)]
    state = torch.load(acc / "fold0" / "last.pt", weights_only=True)
    assert state["step"] == steps_acc[-1]
    assert any("batch 8 x 2 accumulated = 16" in line for line in logs)


def test_frozen_backbone_warm_start_then_unfreeze(synth_data, tmp_path):
    from carclf.models.factory import create_model

    class Stop(Exception):
        pass

    def stop_after_first(k, epoch, row):
        if epoch == 0:
            raise Stop

    over = {"train.epochs": 2, "train.freeze_epochs": 1, "train.ema": False, "train.lr": 3e-3}
    cfg = load_config(None, tiny_overrides(synth_data, tmp_path, **over))
    with pytest.raises(Stop):
        train(cfg, on_epoch_end=stop_after_first, log=lambda s: None)
    init = create_model(cfg.model, 6).state_dict()  # the same offline ImageNet backbone
    after_one = torch.load(cfg.run_dir / "fold0" / "last.pt", weights_only=True)["model"]
    conv = [k for k in init if k.endswith("weight") and "bn" not in k and not k.startswith("classifier")]
    assert all(torch.equal(init[k], after_one[k]) for k in conv)  # backbone untouched in the warm-start epoch
    assert not torch.equal(init["classifier.weight"], after_one["classifier.weight"])
    run = train(cfg, resume=True, log=lambda s: None)
    after_two = torch.load(run / "fold0" / "last.pt", weights_only=True)["model"]
    assert any(not torch.equal(init[k], after_two[k]) for k in conv)  # unfrozen in epoch 2
    assert [r["backbone_frozen"] for r in _metrics(run)] == ["1", "0"]


def test_focal_loss_trains_and_versions_are_recorded(synth_data, tmp_path):
    over = {"train.loss": "ce+focal", "train.class_weights": "balanced", "train.epochs": 2, "train.lr": 3e-3}
    run = train(load_config(None, tiny_overrides(synth_data, tmp_path, **over)), log=lambda s: None)
    rows = _metrics(run)
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    meta = json.loads((run / "run.json").read_text(encoding="utf-8"))
    assert meta["versions"]["torch"] == torch.__version__
    import timm

    assert meta["versions"]["timm"] == timm.__version__
    assert set(meta["versions"]) >= {"python", "carclf", "git_commit", "git_dirty"}
    assert json.loads((run / "fold0" / "summary.json").read_text())["versions"] == meta["versions"]


def _all_rows(run, k=0):
    with (run / f"fold{k}" / "metrics.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_swa_is_scored_beside_ema_and_raw_and_the_best_becomes_best_pt(synth_data, tmp_path):
    over = {"train.epochs": 3, "train.swa_start_epoch": 1, "train.lr": 3e-3}
    cfg = load_config(None, tiny_overrides(synth_data, tmp_path / "a", **over))
    run = train(cfg, log=lambda s: None)
    rows = _all_rows(run)
    assert [r["weights"] for r in rows] == ["ema", "ema", "ema", "raw", "swa"]
    assert len({r["val_log_loss"] for r in rows[2:]}) == 3  # three different sets of weights
    chosen = [r for r in rows if r["chosen"] == "*"]
    assert len(chosen) == 1
    best_ll = min(float(r["val_log_loss"]) for r in rows)
    assert float(chosen[0]["val_log_loss"]) == best_ll
    summary = json.loads((run / "fold0" / "summary.json").read_text())
    assert summary["best_weights"] == chosen[0]["weights"]
    assert torch.load(run / "fold0" / "best.pt", weights_only=True)["val_log_loss"] == pytest.approx(best_ll, 1e-5)
    last = torch.load(run / "fold0" / "last.pt", weights_only=True)
    assert int(last["swa"]["n_averaged"]) == 2  # epochs 1 and 2

    # Interrupted after epoch 1 and resumed: the SWA average continues from last.pt, as if never stopped.
    class Stop(Exception):
        pass

    def stop_after_second(k, epoch, row):
        if epoch == 1:
            raise Stop

    cfg_b = load_config(None, tiny_overrides(synth_data, tmp_path / "b", **over))
    with pytest.raises(Stop):
        train(cfg_b, on_epoch_end=stop_after_second, log=lambda s: None)
    resumed = train(cfg_b, resume=True, log=lambda s: None)
    again = torch.load(resumed / "fold0" / "last.pt", weights_only=True)
    for name, tensor in last["swa"].items():
        assert torch.equal(tensor, again["swa"][name]), name
    assert [r["val_log_loss"] for r in _all_rows(resumed)] == [r["val_log_loss"] for r in rows]


def test_each_fold_predicts_at_the_input_size_its_validation_chose(synth_data, tmp_path):
    import numpy as np

    from carclf.infer.predictor import Predictor
    from carclf.metrics import score, softmax

    over = {"train.epochs": 2, "train.lr": 3e-3, "predict.eval_sizes": "48,96", "train.folds": "all"}
    logs = []
    run = train(load_config(None, tiny_overrides(synth_data, tmp_path, **over)), log=logs.append)
    assert any("validation log loss by input size: 64px" in line for line in logs)
    predictor = Predictor.open(run, folds=[0])
    for k in (0, 1):
        summary = json.loads((run / f"fold{k}" / "summary.json").read_text())
        scores = {int(s): v for s, v in summary["eval_size_log_loss"].items()}
        assert set(scores) == {64, 48, 96}
        assert summary["eval_size"] == min(scores, key=scores.get)
        with np.load(run / f"fold{k}" / "oof.npz") as z:  # the OOF logits are those of the chosen size
            logits, labels, paths = z["logits"], z["labels"], z["paths"]
        assert score(softmax(logits), labels)["log_loss"] == pytest.approx(scores[summary["eval_size"]], rel=1e-5)
        if k == 0:
            assert predictor.eval_sizes == [summary["eval_size"]]
            photos = [synth_data / "train" / p for p in paths[:4]]
            probs, bad = predictor.predict_paths(photos)
            assert not bad
            np.testing.assert_allclose(probs, softmax(logits[:4]), atol=1e-5)


def test_progressive_resizing_follows_the_schedule(synth_data, tmp_path):
    from carclf.data.dataset import ImageDataset, make_loader
    from carclf.data.scan import scan_train
    from carclf.data.transforms import data_config_for, train_transform

    cfg = load_config(None, ["data.img_size=64"])
    ts = scan_train(synth_data)
    ds = ImageDataset(ts.paths[:8], ts.labels[:8], train_transform(data_config_for(cfg), cfg.aug), 64)
    ds.transforms = {s: train_transform(data_config_for(cfg, s), cfg.aug) for s in (48, 64)}
    loader = make_loader(ds, 4, 1, shuffle=True)
    for size in (48, 64, 48):  # persistent workers get the size with every index
        loader.sampler.set_size(size)
        assert {tuple(x.shape[-2:]) for x, *_ in loader} == {(size, size)}

    over = {"train.epochs": 3, "aug.size_schedule": "48:0,56:2"}
    run = train(load_config(None, tiny_overrides(synth_data, tmp_path, **over)), log=lambda s: None)
    assert [int(r["train_size"]) for r in _metrics(run)] == [48, 48, 56]
    with pytest.raises(Exception, match="SIZE:EPOCH"):
        load_config(None, ["aug.size_schedule=128-0"])
    with pytest.raises(Exception, match="epochs 0..2"):
        load_config(None, ["train.epochs=3", "aug.size_schedule=128:5"])
