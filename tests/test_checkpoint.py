"""best.pt and last.pt through their one writer and reader (carclf.artifacts.checkpoint), metrics.csv through
carclf.artifacts.metrics_csv: files of the previous format still load, a newer format is refused in one line."""

from __future__ import annotations

import math

import pytest
import torch

from carclf.artifacts.checkpoint import FORMAT, read_best, read_last, write_best, write_last
from carclf.artifacts.metrics_csv import METRIC_FIELDS, read_float, read_metrics, split_rows, write_metrics
from carclf.config import load_config
from carclf.errors import CarclfError
from carclf.io import file_sha256
from carclf.train.state import Progress
from tests.conftest import tiny_overrides

WEIGHTS = {"w": torch.arange(6.0).reshape(2, 3)}


def _best(path):
    return write_best(path, WEIGHTS, epoch=2, val_log_loss=0.5, weights="ema", config={"name": "t"}, classes=["a"])


def test_best_pt_round_trip_records_format_kind_and_its_hash(tmp_path):
    sha = _best(tmp_path / "best.pt")
    assert sha == file_sha256(tmp_path / "best.pt")
    best = read_best(tmp_path / "best.pt")
    assert (best["format"], best["kind"], best["epoch"], best["weights"]) == (FORMAT, "best", 2, "ema")
    assert torch.equal(best["model"]["w"], WEIGHTS["w"])
    assert best["classes"] == ["a"]


def test_checkpoints_of_the_previous_code_without_format_still_load(tmp_path):
    """The previous code wrote plain dicts with no format or kind key: read as format 1."""
    torch.save({"model": WEIGHTS, "epoch": 0, "val_log_loss": 0.7, "config": {}, "classes": ["a"]}, tmp_path / "b.pt")
    assert read_best(tmp_path / "b.pt")["val_log_loss"] == 0.7
    torch.save({"model": WEIGHTS, "epoch": 3, "step": 9, "best": {"epoch": 1}, "history": [], "bad": []},
               tmp_path / "l.pt")
    assert read_last(tmp_path / "l.pt")["step"] == 9


@pytest.mark.parametrize(("name", "reader", "remedy"), [("best.pt", read_best, "--resume"),
                                                        ("last.pt", read_last, "--resume")])
def test_a_newer_checkpoint_format_is_refused_in_one_line_naming_file_version_and_command(tmp_path, name, reader,
                                                                                          remedy):
    path = tmp_path / "fold0" / name
    path.parent.mkdir()
    torch.save({"model": WEIGHTS, "format": FORMAT + 1, "kind": name[:-3]}, path)
    with pytest.raises(CarclfError) as err:
        reader(path)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"'{path}'" in msg
    assert f"format {FORMAT + 1}" in msg
    assert "carclf train" in msg
    assert remedy in msg


def test_a_last_pt_in_place_of_best_pt_is_refused(tmp_path):
    write_last(tmp_path / "last.pt", {"model": WEIGHTS, "epoch": 0})
    assert read_last(tmp_path / "last.pt")["kind"] == "last"
    (tmp_path / "last.pt").rename(tmp_path / "best.pt")
    with pytest.raises(CarclfError, match=r"cannot read checkpoint .*a last\.pt checkpoint, not a best\.pt"):
        read_best(tmp_path / "best.pt")


def test_a_file_without_weights_is_refused(tmp_path):
    torch.save({"epoch": 1}, tmp_path / "best.pt")
    with pytest.raises(CarclfError, match="holds no model weights"):
        read_best(tmp_path / "best.pt")


def test_a_fold_model_loads_from_a_best_pt_of_the_previous_format(tmp_path):
    from carclf.models.factory import create_model, load_fold_model

    cfg = load_config(None, tiny_overrides(tmp_path, tmp_path))
    model = create_model(cfg.model, 3, pretrained=False)
    torch.save({"model": model.state_dict(), "epoch": 0, "val_log_loss": 1.0, "config": cfg.to_dict(),
                "classes": ["a", "b", "c"]}, tmp_path / "best.pt")
    loaded = load_fold_model(cfg, tmp_path / "best.pt", 3, torch.device("cpu"))
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_progress_from_a_last_pt_before_swa_and_after_an_early_stop():
    state = {"best": {"val_log_loss": 0.4, "epoch": 1}, "epoch": 3, "step": 12, "history": [{"epoch": 0}],
             "bad": [5], "stopped": False}
    p = Progress.from_last(state, "ema", epochs=8)
    assert (p.start_epoch, p.step, p.best["weights"], p.since_best, p.bad) == (4, 12, "ema", 2, [5])
    assert Progress.from_last({**state, "stopped": True}, "raw", epochs=8).start_epoch == 8
    fresh = Progress.new("raw")
    assert (fresh.start_epoch, fresh.best["epoch"], fresh.best["weights"]) == (0, -1, "raw")
    assert math.isinf(fresh.best["val_log_loss"])


def test_metrics_csv_round_trip_and_rows_split_into_epochs_and_candidates(tmp_path):
    history = [{"epoch": 0, "step": 4, "train_loss": 1.23456789, "val_log_loss": 0.9, "weights": "ema", "extra": 1},
               {"epoch": 0, "step": 4, "val_log_loss": math.nan, "weights": "swa", "chosen": "*"}]
    write_metrics(tmp_path / "metrics.csv", history)
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0] == ",".join(METRIC_FIELDS)
    rows = read_metrics(tmp_path / "metrics.csv")
    assert rows[0]["train_loss"] == "1.23457"  # 6 significant digits
    assert "extra" not in rows[0]
    epochs, candidates = split_rows(rows)
    assert [r["weights"] for r in epochs] == ["ema"]
    assert [r["weights"] for r in candidates] == ["swa"]
    assert math.isnan(read_float(candidates[0]["val_log_loss"]))
    assert math.isnan(read_float(""))
    with pytest.raises(CarclfError, match="not found"):
        read_metrics(tmp_path / "missing.csv")


@pytest.mark.slow
def test_a_fold_interrupted_under_the_previous_format_resumes(synth_data, tmp_path):
    """last.pt and best.pt as the previous code wrote them (no format, no kind): --resume finishes the fold."""
    from carclf.train.loop import train
    from tests.test_hardening_b import _stopped_after_one_epoch

    cfg = _stopped_after_one_epoch(synth_data, tmp_path, epochs=2)
    fold = cfg.run_dir / "fold0"
    last = torch.load(fold / "last.pt", weights_only=True)
    best = torch.load(fold / "best.pt", weights_only=True)
    assert (last["format"], last["kind"], best["kind"]) == (FORMAT, "last", "best")
    for name, obj in (("best.pt", best), ("last.pt", last)):
        torch.save({k: v for k, v in obj.items() if k not in ("format", "kind")}, fold / name)
    last = torch.load(fold / "last.pt", weights_only=True)
    torch.save({**last, "best": {**last["best"], "sha256": file_sha256(fold / "best.pt")}}, fold / "last.pt")
    train(cfg, resume=True, log=lambda s: None)
    assert [r["epoch"] for r in split_rows(read_metrics(fold / "metrics.csv"))[0]] == ["0", "1"]
    assert (fold / "oof.npz").is_file()
