"""``carclf serve``: load the model once per worker process and run the app under uvicorn."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from carclf.errors import CarclfError
from carclf.serve.app import ServeSettings, create_app

ENV_CONFIG = "CARCLF_SERVE_CONFIG"  # how the parent hands its options to uvicorn's worker processes


def api_key_from_env(var: str | None) -> str | None:
    """The API key held by environment variable ``var`` (never on the command line, where ``ps`` shows it)."""
    if not var:
        return None
    key = os.environ.get(var, "")
    if not key:
        raise CarclfError(f"--api-key-env {var}: the environment variable {var} is not set or empty; export it "
                          "with the key clients must send in X-API-Key")
    if len(key) < 16:
        raise CarclfError(f"--api-key-env {var}: the key is {len(key)} characters; use at least 16 (e.g. "
                          "python -c 'import secrets; print(secrets.token_urlsafe(24))')")
    return key


def load_predictor(source: str | Path, precision: str | None = None, threads: int | None = None,
                   device: str = "cpu"):
    """An export directory -> its engines at ``precision`` (None: the one it chose; fp32 where this CPU lacks the
    instructions, said in a line); a run -> PyTorch engines."""
    from carclf.artifacts.resolve import EXPORT, kind_of
    from carclf.infer.predictor import open_predictor

    if kind_of(source) == EXPORT:
        return open_predictor(source, engine="onnx", precision=precision, threads=threads)
    if precision not in (None, "fp32"):
        raise CarclfError(f"--precision {precision} needs an export: carclf export {source} -o DIR --precision "
                          f"{precision}, then serve DIR")
    if threads:
        import torch

        torch.set_num_threads(threads)
    return open_predictor(source, engine="torch", device=device)


def build_app(options: dict[str, Any]):
    """The app from the serve options (the same in the parent and in every uvicorn worker)."""
    settings = ServeSettings(**options["settings"], api_key=api_key_from_env(options.get("api_key_env")))
    predictor = load_predictor(options["source"], options.get("precision"), options.get("threads"),
                               options.get("device", "cpu"))
    return create_app(predictor, settings)


def app_from_env():
    """uvicorn's factory in each worker process (``--workers N``)."""
    return build_app(json.loads(os.environ[ENV_CONFIG]))


def serve(source: str | Path, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
          api_key_env: str | None = None, precision: str | None = None, threads: int | None = None, device: str = "cpu",
          settings: ServeSettings | None = None, log_level: str = "info", shutdown_timeout: float = 20.0,
          keep_alive_timeout: float = 5.0) -> None:
    """Run the service under uvicorn. On SIGTERM it stops accepting, lets requests in flight finish for at most
    ``shutdown_timeout`` seconds, then cancels what is left and exits (a client trickling its body cannot keep it
    alive); idle keep-alive connections are closed after ``keep_alive_timeout`` seconds."""
    import uvicorn

    from carclf.infer.onnx_engine import physical_cores

    if workers < 1:
        raise CarclfError("--workers must be at least 1")
    if shutdown_timeout < 0 or keep_alive_timeout <= 0:
        raise CarclfError("--shutdown-timeout must be 0 or more and --keep-alive-timeout more than 0")
    timeouts = {"timeout_graceful_shutdown": shutdown_timeout, "timeout_keep_alive": keep_alive_timeout}
    # Each worker process runs its own engines: share the cores out instead of oversubscribing them.
    threads = threads or max(1, physical_cores() // workers)
    settings = settings or ServeSettings()
    options = {"source": str(Path(source).resolve()), "precision": precision, "threads": threads, "device": device,
               "api_key_env": api_key_env, "settings": {k: v for k, v in asdict(settings).items() if k != "api_key"}}
    api_key_from_env(api_key_env)  # fail before forking workers
    if workers == 1:
        app = build_app(options)
        print(f"serving {source} (model {app.version}) on http://{host}:{port}/  (upload page at /, API at "
              f"/v1/predict, metrics at /metrics)", flush=True)
        uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False, **timeouts)
        return
    os.environ[ENV_CONFIG] = json.dumps(options)
    print(f"serving {source} with {workers} worker processes ({threads} threads each) on http://{host}:{port}/",
          flush=True)
    uvicorn.run("carclf.serve.server:app_from_env", factory=True, host=host, port=port, workers=workers,
                log_level=log_level, access_log=False, **timeouts)
