"""Helpers of the service tests: a ``carclf serve`` process on a free loopback port, started, waited for and
stopped the same way by tests/test_serve.py (the real model) and tests/test_serve_hardening.py (a stand-in)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from carclf.errors import CarclfError

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Served:
    url: str
    port: int
    proc: subprocess.Popen
    log: Path
    spool: Path | None = None  # its TMPDIR, where one was given

    def metrics(self) -> str:
        import httpx

        return httpx.get(f"{self.url}/metrics", timeout=10).text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_until_ready(url: str, proc, timeout: float) -> None:
    """Poll ``url``/readyz until a ``carclf serve`` process started with ``subprocess.Popen`` answers 200; a
    CarclfError if it exits first or is not ready within ``timeout`` seconds (tests and benchmarks/serve_load.py)."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise CarclfError(f"carclf serve exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise CarclfError(f"carclf serve not ready after {timeout:.0f} s")
        time.sleep(0.5)


@contextmanager
def serving(argv: list[str], log: Path, env: dict | None = None, ready_s: float = 60,
            port: int | None = None) -> Iterator[Served]:
    """Run ``argv + ["--port", PORT]`` (stdout and stderr in ``log``) until it answers /readyz; stop it after."""
    port = port or free_port()
    with open(log, "w") as fh:
        proc = subprocess.Popen([*argv, "--port", str(port)], cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
    served = Served(f"http://127.0.0.1:{port}", port, proc, log)
    try:
        try:
            wait_until_ready(served.url, proc, ready_s)
        except CarclfError as exc:
            pytest.fail(f"{exc}: {log.read_text()[-2000:]}")
        yield served
    finally:
        stop(proc)


@contextmanager
def app_clients() -> Iterator:
    """``start(predictor, raise_server_exceptions=True, **settings)`` -> a started FastAPI TestClient around
    ``create_app(predictor, ServeSettings(**settings))`` (lifespan run: warmed up, batcher running); all closed
    after."""
    from fastapi.testclient import TestClient

    from carclf.serve.app import ServeSettings, create_app

    clients = []

    def start(predictor, raise_server_exceptions: bool = True, **settings):
        c = TestClient(create_app(predictor, ServeSettings(**settings)),
                       raise_server_exceptions=raise_server_exceptions)
        c.__enter__()
        clients.append(c)
        return c

    try:
        yield start
    finally:
        for c in clients:
            c.__exit__(None, None, None)
