"""Experiment tracking with MLflow: the resolved config as params, per-epoch metrics, artefacts and learning curves.

One MLflow run per trained fold. Settings (the ``track`` config section):

- ``enabled`` (default on): off means no MLflow import and no store at all.
- ``uri``: "" is a local SQLite store in ``<out_dir>/mlruns/`` (``mlflow.db`` + ``artifacts/``; no server, no
  network); anything else is a tracking URI such as ``http://host:5000``.
- ``experiment``: the MLflow experiment name (``carclf``).

Tracking never costs a training run: an unreachable server or any MLflow error is one warning through ``log`` and
the tracker turns itself off. The first contact with a remote server uses tight HTTP limits (``CHECK_LIMITS``), so a
dead or slow server cannot hang training. A resumed fold continues the same MLflow run: the caller keeps the run id
in ``fold<k>/mlflow_run.json`` (:func:`write_run_id`, :func:`read_run_id`) and passes it back to :meth:`Tracker.start`.

MLflow's usage telemetry is switched off (``MLFLOW_DISABLE_TELEMETRY``, unless the user set it): carclf makes no
network calls of its own accord.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from carclf.artifacts.metrics_csv import read_float, read_metrics, split_rows
from carclf.errors import CarclfError
from carclf.io import atomic_write, atomic_write_text

STORE_DIR = "mlruns"  # under out_dir: mlflow.db and artifacts/
DB_FILE = "mlflow.db"
RUN_ID_FILE = "mlflow_run.json"  # in the fold directory
CURVES_FILE = "curves.png"  # beside metrics.csv
STATUSES = ("FINISHED", "FAILED", "KILLED")
# MLflow reads these per HTTP request. The first contact fails fast; later calls may wait a little longer, once.
CHECK_LIMITS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0"}
RUN_LIMITS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
              "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0"}
STORE_LOCK_TIMEOUT = 60.0  # seconds to wait while another process creates the local store
_BAD_KEY_CHARS = re.compile(r"[^\w.\- ]")  # MLflow allows these on every OS (':' and '/' are riskier)
_NOT_FOUND = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}
_QUIET_LOGGERS = ("mlflow.store.db.utils", "alembic")  # "Creating initial MLflow database tables..." and migrations


# ---------------------------------------------------------------------------------------------------- settings
def local_store_uri(out_dir: Path | str) -> str:
    """The default store: ``sqlite:///<out_dir>/mlruns/mlflow.db`` (absolute)."""
    return "sqlite:///" + (Path(out_dir).resolve() / STORE_DIR / DB_FILE).as_posix()


def _resolve(uri: str, out_dir: Path | str | None) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment): local runs keep artefacts beside the database."""
    if uri:
        return uri, None
    if out_dir is None:
        raise ValueError("track.uri is '' (the local store), so out_dir is needed")
    return local_store_uri(out_dir), (Path(out_dir).resolve() / STORE_DIR / "artifacts").as_uri()


def _is_remote(uri: str) -> bool:
    return uri.split(":", 1)[0].lower() in {"http", "https", "databricks", "databricks-uc"}


# ---------------------------------------------------------------------------------------------------- run id file
def write_run_id(path: Path | str, run_id: str) -> None:
    """Keep a fold's MLflow run id (``fold<k>/mlflow_run.json``) so a resumed fold continues the same run."""
    atomic_write_text(path, json.dumps({"run_id": run_id}) + "\n")


def read_run_id(path: Path | str) -> str | None:
    """The run id :func:`write_run_id` kept, or None (no file, or one that is not ours)."""
    try:
        run_id = json.loads(Path(path).read_text(encoding="utf-8")).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return run_id if isinstance(run_id, str) and run_id else None


# ---------------------------------------------------------------------------------------------------- params
def flatten_params(params: Mapping[str, Any], max_len: int = 6000, prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: dotted keys (``train.lr``), string values cut to ``max_len`` characters,
    lists as JSON, characters MLflow refuses in keys replaced by '_'."""
    out: dict[str, str] = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten_params(v, max_len, key + "."))
            continue
        if isinstance(v, list | tuple):
            text = json.dumps(list(v), ensure_ascii=False, default=str)
        elif isinstance(v, Mapping):
            text = "{}"
        else:
            text = str(v)
        if len(text) > max_len:
            text = text[: max_len - 3] + "..."
        out[_BAD_KEY_CHARS.sub("_", key)[:250]] = text
    return out


def _numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric entries (a metrics.csv row also holds strings and NaN placeholders)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, int | float) and math.isfinite(v):
            out[_BAD_KEY_CHARS.sub("_", str(k))[:250]] = float(v)
    return out


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i: i + size]


# ---------------------------------------------------------------------------------------------------- MLflow calls
def _import_mlflow() -> Any:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    return mlflow


@contextlib.contextmanager
def _mlflow_calls(uri: str, limits: Mapping[str, str], force: bool) -> Iterator[None]:
    """Around MLflow calls: HTTP ``limits`` for a remote store (values the user set win unless ``force``), MLflow's
    own deprecation warnings and database set-up chatter kept off the training log."""
    saved = {k: os.environ.get(k) for k in limits}
    quiet = {name: logging.getLogger(name) for name in _QUIET_LOGGERS}
    levels = {name: lg.level for name, lg in quiet.items()}
    try:
        if _is_remote(uri):
            for k, v in limits.items():
                if force or saved[k] is None:
                    os.environ[k] = v
        for lg in quiet.values():
            lg.setLevel(logging.WARNING)
        with warnings.catch_warnings():
            for module in ("mlflow", "sqlalchemy", "alembic"):
                warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
                warnings.filterwarnings("ignore", category=FutureWarning, module=module)
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for name, lg in quiet.items():
            lg.setLevel(levels[name])


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _client(uri: str) -> Any:
    _import_mlflow()
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Held while a process opens a SQLite store: folds trained in parallel would otherwise race to create its tables
    (MLflow's migrations are not safe to run twice at once). Later writes rely on SQLite's own locking."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    from filelock import FileLock

    with FileLock(uri[len("sqlite:///"):] + ".lock", timeout=STORE_LOCK_TIMEOUT):
        yield


def _experiment_id(client: Any, name: str, artifact_location: str | None) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:  # another process (another fold) created it meanwhile
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage != "active":
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def _log_batches(client: Any, run_id: str, metrics: list | None = None, params: list | None = None,
                 tags: list | None = None) -> None:
    from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

    for part in _chunks(metrics or [], MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=part)
    for part in _chunks(params or [], MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=part)
    for part in _chunks(tags or [], MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, tags=part)


def _metric_entities(metrics: Mapping[str, Any], step: int) -> list:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, v, now, int(step)) for k, v in _numbers(metrics).items()]


# ---------------------------------------------------------------------------------------------------- the tracker
class Tracker:
    """One MLflow run (one fold). Every method is a no-op once tracking is off, disabled, failed or finished."""

    def __init__(self, client: Any = None, run_id: str | None = None, uri: str = "",
                 log: Callable[[str], None] = print) -> None:
        self._client, self.run_id, self.uri, self._log = client, run_id, uri, log

    def __repr__(self) -> str:
        return f"Tracker(run_id={self.run_id!r}, uri={self.uri!r}, enabled={self.enabled})"

    @property
    def enabled(self) -> bool:
        return self._client is not None and self.run_id is not None

    @classmethod
    def start(
        cls,
        *,
        enabled: bool,
        uri: str,
        experiment: str,
        out_dir: Path | str | None,
        run_name: str,
        params: Mapping[str, Any],
        run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        log: Callable[[str], None] = print,
    ) -> Tracker:
        """Start an MLflow run (``run_id`` given and still in the store: continue that run) and log the flattened
        ``params``. Returns a disabled tracker when ``enabled`` is False or MLflow fails (after one warning)."""
        if not enabled:
            return cls(log=log)
        tracking_uri, artifact_location = _resolve(uri, out_dir)
        tracker = cls(uri=tracking_uri, log=log)
        with tracker._guard("could not start a run", first_contact=True):
            from mlflow.entities import Param, RunTag
            from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

            with _store_lock(tracking_uri):  # first contact: creates a local store's tables, checks a server
                client = _client(tracking_uri)
                exp_id = _experiment_id(client, experiment, artifact_location)
            run = _existing_run(client, run_id, exp_id, log) if run_id else None
            tag_list = [RunTag(str(k), str(v)) for k, v in (tags or {}).items()]
            resumed = run is not None
            if run is None:
                run = client.create_run(exp_id, run_name=run_name)
                logged: dict[str, str] = {}
            else:
                client.update_run(run.info.run_id, status="RUNNING")
                logged = dict(run.data.params)
            # A resumed run keeps the values it started with (MLflow refuses to change a param; the keys a resume
            # may change, such as train.folds or train.device, are left as first logged).
            flat = flatten_params(params, MAX_PARAM_VAL_LENGTH)
            new = [Param(k, v) for k, v in flat.items() if k not in logged]
            _log_batches(client, run.info.run_id, params=new, tags=tag_list)
            tracker._client, tracker.run_id = client, run.info.run_id
            log(f"MLflow: {'continuing' if resumed else 'started'} run {run.info.run_id} ('{run_name}') in "
                f"experiment '{experiment}' at {tracking_uri}")
        return tracker

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log the finite numbers of ``metrics`` (e.g. a metrics.csv row) at ``step`` (the epoch)."""
        if not self.enabled:
            return
        with self._guard("could not log metrics"):
            _log_batches(self._client, self.run_id, metrics=_metric_entities(metrics, step))

    def log_artifacts(self, paths: Iterable[Path | str], artifact_path: str | None = None) -> None:
        """Upload files (config.yaml, metrics.csv, ...) to the run; missing files are skipped."""
        if not self.enabled:
            return
        with self._guard("could not log artifacts"):
            for p in paths:
                if Path(p).is_file():
                    self._client.log_artifact(self.run_id, str(p), artifact_path)

    def log_curves(self, metrics_csv: Path | str) -> Path | None:
        """Draw ``curves.png`` beside ``metrics_csv`` (:func:`write_curves`) and upload it; its path, or None."""
        if not self.enabled:
            return None
        try:
            png = write_curves(metrics_csv)
        except Exception as exc:  # noqa: BLE001 - a plot must not stop tracking, nor training
            self._log(f"warning: MLflow: could not draw learning curves from '{metrics_csv}' ({_short(exc)})")
            return None
        self.log_artifacts([png])
        return png

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with ``status`` (FINISHED, FAILED or KILLED); later calls are no-ops."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, not {status!r}")
        if not self.enabled:
            return
        with self._guard("could not end the run"):
            self._client.set_terminated(self.run_id, status)
        self._client = None  # run_id stays: the run exists and finished

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        else:
            self.finish("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    @contextlib.contextmanager
    def _guard(self, what: str, first_contact: bool = False) -> Iterator[None]:
        """Any error inside: one warning, and tracking is off for the rest of this run. ``first_contact``: the tight
        HTTP limits, whatever the user set."""
        try:
            with _mlflow_calls(self.uri, CHECK_LIMITS if first_contact else RUN_LIMITS, force=first_contact):
                yield
        except Exception as exc:  # noqa: BLE001 - any MLflow or network error: training goes on without tracking
            self._client, self.run_id = None, None
            self._log(f"warning: MLflow tracking at {self.uri or '(local store)'}: {what} ({_short(exc)}); "
                      "tracking is off for the rest of this run, training goes on")


def _existing_run(client: Any, run_id: str, exp_id: str, log: Callable[[str], None]) -> Any:
    """The stored run to continue, or None (with a note) when the store no longer holds it as an active run."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code not in _NOT_FOUND:
            raise
        log(f"MLflow: run {run_id} is not in this store; starting a new run")
        return None
    if run.info.lifecycle_stage != "active" or run.info.experiment_id != exp_id:
        log(f"MLflow: run {run_id} was deleted or belongs to another experiment; starting a new run")
        return None
    return run


def log_to_run(
    uri: str,
    run_id: str | None,
    metrics: Mapping[str, Any],
    *,
    out_dir: Path | str | None = None,
    step: int = 0,
    artifacts: Iterable[Path | str] = (),
    log: Callable[[str], None] = print,
) -> bool:
    """Add summary metrics (and files) to an existing run after training, e.g. calibration or evaluation figures.

    ``uri``/``out_dir`` as for :meth:`Tracker.start`. A no-op returning False when there is no run id or the local
    store does not exist (tracking was off); failures are one warning. True when logged."""
    if not run_id:
        return False
    tracking_uri, _ = _resolve(uri, out_dir)
    if not uri and not Path(tracking_uri[len("sqlite:///"):]).is_file():
        return False
    tracker = Tracker(uri=tracking_uri, log=log)
    with tracker._guard(f"could not log to run {run_id}", first_contact=True):
        with _store_lock(tracking_uri):
            client = _client(tracking_uri)
        client.get_run(run_id)  # the first contact: fails fast when the server is away or the run is gone
        tracker._client, tracker.run_id = client, run_id
    tracker.log_metrics(metrics, step)
    tracker.log_artifacts(artifacts)
    return tracker.enabled


# ---------------------------------------------------------------------------------------------------- curves
def write_curves(metrics_csv: Path | str, out: Path | str | None = None) -> Path:
    """Plot train loss, validation log loss and validation accuracy per epoch from a fold's metrics.csv into a PNG
    (default ``curves.png`` beside it); the end-of-training candidates (raw, SWA weights) are single points."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    src = Path(metrics_csv)
    epochs, extra = split_rows(read_metrics(src))
    if not epochs:
        raise CarclfError(f"'{src}' holds no epoch yet: nothing to plot")

    def col(rs: list[dict], key: str) -> list[float]:
        return [read_float(r.get(key)) for r in rs]

    x = [int(read_float(r["epoch"])) + 1 for r in epochs]
    fig = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, acc_ax = fig.subplots(1, 2)
    loss_ax.plot(x, col(epochs, "train_loss"), "o-", label="train loss")
    loss_ax.plot(x, col(epochs, "val_log_loss"), "o-", label="val log loss")
    acc_ax.plot(x, col(epochs, "val_accuracy"), "o-", color="C2", label="val accuracy")
    if any(math.isfinite(v) for v in col(epochs, "val_top5")):
        acc_ax.plot(x, col(epochs, "val_top5"), "o--", color="C2", alpha=0.5, label="val top-5")
    for i, r in enumerate(extra):
        ex = int(read_float(r.get("epoch"))) + 1
        name = r.get("weights") or "final"
        loss_ax.plot([ex], [read_float(r.get("val_log_loss"))], "s", color=f"C{3 + i}", label=f"val log loss, {name}")
        acc_ax.plot([ex], [read_float(r.get("val_accuracy"))], "s", color=f"C{3 + i}", label=f"val accuracy, {name}")
    for ax, title in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        ax.xaxis.get_major_locator().set_params(integer=True)
    acc_ax.set_ylim(0, 1.02)
    fig.suptitle(f"{src.parent.parent.name}/{src.parent.name}" if src.parent.parent.name else src.parent.name)
    png = Path(out) if out is not None else src.with_name(CURVES_FILE)
    atomic_write(png, lambda fh: fig.savefig(fh, format="png"), "wb")
    return png


def log_fold_figures(rd: Any, figures: dict[int, dict], prefix: str, log: Callable[[str], None] = print) -> None:
    """Add each fold's figures to the fold's MLflow run of a run directory (an ``artifacts.run.RunDir``), when it
    was tracked (``track.*`` of the run's config)."""
    cfg = rd.read_config()
    if not cfg.track.enabled:
        return
    for k, values in figures.items():
        log_to_run(cfg.track.uri, read_run_id(rd.fold(k).mlflow_run), {prefix + n: v for n, v in values.items()},
                   out_dir=rd.path.parent, log=log)


__all__ = [
    "CURVES_FILE", "RUN_ID_FILE", "STORE_DIR", "Tracker", "flatten_params", "local_store_uri",
    "log_fold_figures", "log_to_run", "read_run_id", "write_curves", "write_run_id",
]
