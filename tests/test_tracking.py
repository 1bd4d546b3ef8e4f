"""MLflow tracking against a real local store (SQLite under out_dir), read back with MlflowClient; no mocks."""

from __future__ import annotations

import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from carclf.config import check_settings
from carclf.errors import CarclfError
from carclf.tracking import (
    CURVES_FILE,
    STORE_DIR,
    Tracker,
    flatten_params,
    local_store_uri,
    log_to_run,
    read_run_id,
    write_curves,
    write_run_id,
)

pytest.importorskip("mlflow")

CONFIG = {
    "name": "t",
    "data": {"root": "/data", "img_size": 64, "merges": {"Kia K5 (DL3)": "Kia K5"}, "sizes": [224, 256]},
    "train": {"lr": 0.001, "epochs": 3, "folds": "0", "ema": True, "extra": {}},
    # 150 more keys than one MLflow batch takes (100), and a value longer than MLflow's limit (6000 characters)
    "wide": {f"k{i:03d}": i for i in range(150)},
    "long": "x" * 7000,
}
ROWS = [  # fold metrics.csv rows as the training loop writes them: per epoch, then end-of-training candidates
    {"epoch": 0, "step": 4, "train_loss": 2.1, "val_log_loss": 1.9, "val_accuracy": 0.3, "val_top5": 0.8,
     "ema_decay": float("nan"), "weights": "ema"},
    {"epoch": 1, "step": 8, "train_loss": 1.5, "val_log_loss": 1.4, "val_accuracy": 0.5, "val_top5": 0.9,
     "ema_decay": float("nan"), "weights": "ema"},
]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One out_dir (one SQLite store, created once: a few seconds) shared by the tests that need a store."""
    return tmp_path_factory.mktemp("track")


def client_for(out_dir: Path):
    from mlflow.tracking import MlflowClient

    with warnings.catch_warnings():  # MLflow's own use of an API SQLAlchemy 2.1 deprecates
        warnings.simplefilter("ignore", DeprecationWarning)
        return MlflowClient(tracking_uri=local_store_uri(out_dir))


def start(out_dir: Path, messages: list[str], **kw) -> Tracker:
    args = {"enabled": True, "uri": "", "experiment": "carclf", "out_dir": out_dir, "run_name": "t/fold0",
            "params": CONFIG, "log": messages.append, **kw}
    return Tracker.start(**args)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_metrics_csv(path: Path, rows: list[dict]) -> Path:
    fields = ["epoch", "step", "train_loss", "val_log_loss", "val_accuracy", "val_top5", "ema_decay", "weights"]
    lines = [",".join(fields)] + [",".join("" if r.get(f) is None else str(r.get(f)) for f in fields) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_params_come_back_flattened(store):
    messages: list[str] = []
    tr = start(store, messages)
    assert tr.enabled
    assert tr.run_id
    tr.finish()
    params = client_for(store).get_run(tr.run_id).data.params
    assert params["train.lr"] == "0.001"
    assert params["train.ema"] == "True"
    assert params["data.img_size"] == "64"
    assert params["data.sizes"] == "[224, 256]"
    assert params["data.merges.Kia K5 _DL3_"] == "Kia K5"  # '(' and ')' are not allowed in MLflow keys
    assert params["train.extra"] == "{}"
    assert all(params[f"wide.k{i:03d}"] == str(i) for i in range(150))  # more than one batch
    assert len(params["long"]) == 6000
    assert params["long"].endswith("...")
    assert len(params) == len(flatten_params(CONFIG))
    assert (store / STORE_DIR / "mlflow.db").is_file()
    assert not any("warning" in m for m in messages)


def test_metrics_come_back_with_their_steps(store):
    tr = start(store, [])
    for row in ROWS:
        tr.log_metrics(row, step=row["epoch"])
    tr.finish()
    client = client_for(store)
    history = client.get_metric_history(tr.run_id, "val_log_loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.9), (1, 1.4)]
    assert [m.step for m in client.get_metric_history(tr.run_id, "train_loss")] == [0, 1]
    metrics = client.get_run(tr.run_id).data.metrics
    assert "weights" not in metrics
    assert "ema_decay" not in metrics
    assert client.get_run(tr.run_id).info.status == "FINISHED"


def test_artifacts_and_curves_are_listed(store, tmp_path):
    fold = tmp_path / "fold0"
    fold.mkdir()
    (fold / "config.yaml").write_text("train:\n  lr: 0.001\n", encoding="utf-8")
    candidates = [{"epoch": 1, "step": 8, "val_log_loss": 1.3, "val_accuracy": 0.55, "weights": "raw"}]
    csv_path = write_metrics_csv(fold / "metrics.csv", ROWS + candidates)
    tr = start(store, [])
    tr.log_artifacts([fold / "config.yaml", csv_path, fold / "missing.json"])
    png = tr.log_curves(csv_path)
    tr.finish()
    assert png == fold / CURVES_FILE
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    listed = {a.path for a in client_for(store).list_artifacts(tr.run_id)}
    assert listed == {"config.yaml", "metrics.csv", CURVES_FILE}


def test_write_curves_refuses_an_empty_metrics_file(tmp_path):
    with pytest.raises(CarclfError, match="no epoch"):
        write_curves(write_metrics_csv(tmp_path / "metrics.csv", []))
    with pytest.raises(CarclfError, match="not found"):
        write_curves(tmp_path / "nothing.csv")


def test_resume_continues_the_same_run(store, tmp_path):
    run_file = tmp_path / "fold0" / "mlflow_run.json"
    first = start(store, [])
    write_run_id(run_file, first.run_id)
    first.log_metrics(ROWS[0], step=0)  # the process dies here: the run is never finished
    messages: list[str] = []
    resumed = start(store, messages, run_id=read_run_id(run_file),
                    params={**CONFIG, "train": {**CONFIG["train"], "folds": "0,1"}})  # a key a resume may change
    assert resumed.enabled
    assert resumed.run_id == first.run_id
    assert any("continuing run" in m for m in messages)
    resumed.log_metrics(ROWS[1], step=1)
    resumed.finish()
    client = client_for(store)
    assert [m.step for m in client.get_metric_history(first.run_id, "val_log_loss")] == [0, 1]
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.folds"] == "0"  # MLflow params cannot change: the first value stays


def test_a_run_id_the_store_does_not_hold_starts_a_new_run(store):
    messages: list[str] = []
    tr = start(store, messages, run_id="0123456789abcdef0123456789abcdef")
    assert tr.enabled
    assert tr.run_id != "0123456789abcdef0123456789abcdef"
    assert any("not in this store" in m for m in messages)
    tr.finish()


def test_log_to_run_adds_summary_metrics_afterwards(store, tmp_path):
    tr = start(store, [])
    tr.finish()
    report = tmp_path / "calibration.json"
    report.write_text('{"temperature": 1.3}', encoding="utf-8")
    assert log_to_run("", tr.run_id, {"temperature": 1.3, "oof_log_loss": 0.42}, out_dir=store, artifacts=[report])
    run = client_for(store).get_run(tr.run_id)
    assert run.data.metrics == {"temperature": 1.3, "oof_log_loss": 0.42}
    assert run.info.status == "FINISHED"
    assert {a.path for a in client_for(store).list_artifacts(tr.run_id)} == {"calibration.json"}
    assert not log_to_run("", None, {"x": 1.0}, out_dir=store)  # tracking was off: no run id
    assert not log_to_run("", "abc", {"x": 1.0}, out_dir=tmp_path / "no-store")
    assert not (tmp_path / "no-store").exists()


def test_an_mlflow_error_mid_run_is_one_warning_and_tracking_stops(store):
    messages: list[str] = []
    tr = start(store, messages)
    client_for(store).delete_run(tr.run_id)  # logging into a deleted run is refused by MLflow
    tr.log_metrics({"val_log_loss": 1.0}, step=0)
    assert not tr.enabled
    assert tr.run_id is None
    tr.log_metrics({"val_log_loss": 0.9}, step=1)
    tr.finish("FAILED")
    assert len([m for m in messages if m.startswith("warning")]) == 1


def test_context_manager_marks_a_crashed_run_failed(store):
    tr = start(store, [])

    def crashed_training() -> None:
        with tr:
            raise RuntimeError("training crashed")

    with pytest.raises(RuntimeError, match="crashed"):
        crashed_training()
    assert client_for(store).get_run(tr.run_id).info.status == "FAILED"


PARALLEL_FOLD = """
import sys
from carclf.tracking import Tracker
tr = Tracker.start(enabled=True, uri="", experiment="carclf", out_dir=sys.argv[1], run_name="fold" + sys.argv[2],
                   params={"fold": sys.argv[2]})
tr.log_metrics({"val_log_loss": 1.0}, step=0)
tr.finish()
print(tr.run_id)
"""


def test_folds_trained_in_parallel_share_a_new_store(tmp_path):
    """Processes that create the local store at once (one per fold) all get a run: creation is locked."""
    procs = [subprocess.Popen([sys.executable, "-c", PARALLEL_FOLD, str(tmp_path), str(k)], stdout=subprocess.PIPE,
                              text=True) for k in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all("warning" not in out for out in outs), outs
    runs = client_for(tmp_path).search_runs([client_for(tmp_path).get_experiment_by_name("carclf").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["fold0", "fold1"]
    assert all(r.info.status == "FINISHED" for r in runs)


def test_unreachable_server_warns_once_and_turns_tracking_off(tmp_path):
    messages: list[str] = []
    tr = start(tmp_path, messages, uri=f"http://127.0.0.1:{free_port()}")
    assert not tr.enabled
    assert tr.run_id is None
    assert len(messages) == 1
    assert messages[0].startswith("warning")
    assert "tracking is off" in messages[0]
    tr.log_metrics({"val_log_loss": 1.0}, step=0)
    tr.log_artifacts([tmp_path])
    assert tr.log_curves(write_metrics_csv(tmp_path / "metrics.csv", ROWS)) is None
    tr.finish()
    assert len(messages) == 1
    assert not (tmp_path / STORE_DIR).exists()
    assert not (tmp_path / CURVES_FILE).exists()


def test_disabled_creates_no_store(tmp_path):
    messages: list[str] = []
    tr = start(tmp_path, messages, enabled=False)
    assert not tr.enabled
    assert tr.run_id is None
    tr.log_metrics({"val_log_loss": 1.0}, step=0)
    assert tr.log_curves(write_metrics_csv(tmp_path / "metrics.csv", ROWS)) is None
    tr.finish()
    assert messages == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]


def test_run_id_file_round_trip(tmp_path):
    path = tmp_path / "fold0" / "mlflow_run.json"
    assert read_run_id(path) is None
    write_run_id(path, "abc123")
    assert read_run_id(path) == "abc123"
    path.write_text("not json", encoding="utf-8")
    assert read_run_id(path) is None


@pytest.mark.parametrize(("uri", "experiment"), [("htp//host:5000", "carclf"), ("runs/mlruns", "carclf"), ("", " ")])
def test_check_settings_rejects_bad_settings(uri, experiment):
    with pytest.raises(CarclfError, match="track\\."):
        check_settings(True, uri, experiment)


def test_check_settings_accepts_good_settings():
    check_settings(True, "", "carclf")
    check_settings(True, "http://127.0.0.1:5000", "carclf")
    check_settings(True, "sqlite:///runs/mlruns/mlflow.db", "carclf")
    check_settings(False, "nonsense", "")


@pytest.mark.slow
def test_training_calibration_and_evaluation_land_in_one_mlflow_run_per_fold(synth_data, tmp_path):
    """carclf train -> interrupted -> --resume -> calibrate -> evaluate, read back from the real local store."""
    from mlflow.tracking import MlflowClient

    from carclf.analyze.evaluate import evaluate_run
    from carclf.artifacts.run import RunDir
    from carclf.calibrate.temperature import calibrate_run
    from carclf.config import load_config
    from carclf.tracking import local_store_uri
    from carclf.train.loop import train
    from tests.conftest import tiny_overrides

    class Stop(Exception):
        pass

    def stop_after_first(k, epoch, row):
        if epoch == 0:
            raise Stop

    cfg = load_config(None, tiny_overrides(synth_data, tmp_path, **{"track.enabled": True, "train.epochs": 2}))
    with pytest.raises(Stop):
        train(cfg, on_epoch_end=stop_after_first, log=lambda s: None)
    run = train(cfg, resume=True, log=lambda s: None)
    calibrate_run(run, log=lambda s: None)
    evaluate_run(run, log=lambda s: None)
    rd = RunDir(run)
    run_id = read_run_id(rd.fold(0).mlflow_run)
    client = MlflowClient(local_store_uri(tmp_path))
    logged = client.get_run(run_id)
    assert logged.data.params["train.epochs"] == "2"
    assert logged.data.params["data.img_size"] == "64"
    assert logged.info.status == "FINISHED"
    history = client.get_metric_history(run_id, "val_log_loss")
    assert sorted(m.step for m in history) == [0, 1]  # the resumed fold continued the same run
    assert {"oof_log_loss", "calibration_temperature", "eval_log_loss", "eval_accuracy"} <= set(logged.data.metrics)
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "metrics.csv", "summary.json", "curves.png"} <= names
    assert (rd.fold(0).dir / "curves.png").is_file()
    assert len(client.search_runs([logged.info.experiment_id])) == 1  # fold 0 only: one run, not two
