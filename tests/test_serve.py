"""The HTTP service: every endpoint and every bad input through FastAPI's TestClient, micro-batching, bounded memory
across bad requests, API keys, the CLI under real uvicorn (hostile photos under a memory limit, a malformed DDS on a
keep-alive connection, an upload aborted mid-body), and the upload page in headless Chromium. More hostile clients,
against a stand-in model: tests/test_serve_hardening.py."""

from __future__ import annotations

import gc
import io
import os
import resource
import socket
import struct
import sys
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from carclf.errors import CarclfError
from tests.conftest import tiny_overrides
from tests.serving import app_clients, serving

pytestmark = pytest.mark.slow
KEY = "test-key-0123456789abcdef"


@pytest.fixture(scope="module")
def export_dir(synth_data, tmp_path_factory) -> Path:
    """A tiny one-fold run, calibrated and exported once."""
    from carclf.calibrate.temperature import calibrate_run
    from carclf.config import load_config
    from carclf.export.exporter import export_model
    from carclf.train.loop import train

    out = tmp_path_factory.mktemp("serve-runs")
    run = train(load_config(None, tiny_overrides(synth_data, out)))
    calibrate_run(run)
    dest = tmp_path_factory.mktemp("serve-export") / "lite0"
    export_model(run, dest, log=lambda _: None)
    return dest


@pytest.fixture(scope="module")
def predictor(export_dir):
    from carclf.infer.predictor import Predictor

    return Predictor.from_export(export_dir)


@pytest.fixture
def client_for(predictor):
    """``client_for(**settings)`` -> a started TestClient (lifespan run: warmed up, batcher running)."""
    with app_clients() as start:
        yield lambda raise_server_exceptions=True, **settings: start(predictor, raise_server_exceptions, **settings)


def _photos(data: Path, n: int) -> list[Path]:
    return sorted((data / "test").glob("*.jpg"))[:n]


def _png(w: int, h: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), (90, 120, 200) if mode == "RGB" else 0).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _dds_bad_pixel_format() -> bytes:
    """A DDS header with an unknown FourCC: Pillow's DDS plugin raises NotImplementedError from Image.open."""
    header = struct.pack("<4s7I44s", b"DDS ", 124, 0x1007, 4, 4, 0, 0, 0, b"\0" * 44)
    pixel_format = struct.pack("<8I", 32, 0x4, int.from_bytes(b"ABCD", "little"), 0, 0, 0, 0, 0)
    return header + pixel_format + struct.pack("<5I", 0x1000, 0, 0, 0, 0) + b"\0" * 64


def test_endpoints(client_for, predictor):
    c = client_for()
    assert c.get("/healthz").json() == {"status": "ok"}
    ready = c.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"
    classes = c.get("/v1/classes").json()
    assert classes["classes"] == predictor.output_classes
    assert classes["version"] == ready.json()["version"] == predictor.version
    model = c.get("/v1/model").json()
    assert model["engine"] == "onnx"
    assert model["auth"] is False
    page = c.get("/")
    assert page.status_code == 200
    assert 'type="file"' in page.text
    assert "http://" not in page.text.replace("http://www.w3.org", "")  # no CDN: everything inline
    metrics = c.get("/metrics").text
    assert 'carclf_http_requests_total{route="/healthz",status="200"} 1.0' in metrics
    assert f'carclf_model_info{{engine="onnx",version="{predictor.version}"}} 1.0' in metrics
    assert c.get("/nope").json()["error"] == "not_found"
    assert c.post("/v1/predict", content=b"x").status_code == 415
    metrics = c.get("/metrics").text
    assert 'carclf_http_requests_total{route="other",status="404"} 1.0' in metrics
    assert 'carclf_http_requests_total{route="/v1/predict",status="415"} 1.0' in metrics
    assert 'carclf_http_request_seconds_count{route="/v1/predict"} 1.0' in metrics


def test_predict_one_and_several(client_for, predictor, synth_data):
    c = client_for()
    photos = _photos(synth_data, 3)
    datas = [p.read_bytes() for p in photos]
    expected, _ = predictor.predict_images(datas)
    r = c.post("/v1/predict", files=[("file", (photos[0].name, datas[0], "image/jpeg"))])
    assert r.status_code == 200
    body = r.json()
    assert body["model"]["version"] == predictor.version
    (pred,) = body["predictions"]
    assert pred["filename"] == photos[0].name
    top = pred["top"]
    assert len(top) == 5
    probs = [t["probability"] for t in top]
    assert probs == sorted(probs, reverse=True)
    order = np.argsort(-expected[0])[:5]
    assert [t["class"] for t in top] == [predictor.output_classes[j] for j in order]
    assert np.allclose(probs, expected[0][order], atol=1e-6)

    r = c.post("/v1/predict?top_k=2", files=[("photos", (p.name, d, "image/jpeg")) for p, d in zip(photos, datas,
                                                                                                  strict=True)])
    assert r.status_code == 200
    preds = r.json()["predictions"]
    assert [p["filename"] for p in preds] == [p.name for p in photos]
    for row, pred in zip(expected, preds, strict=True):
        assert len(pred["top"]) == 2
        assert pred["top"][0]["class"] == predictor.output_classes[int(np.argmax(row))]


def _bad_requests(synth_data: Path) -> dict[str, tuple[dict, int, str]]:
    """name -> (request kwargs, status, error code)."""
    good = _photos(synth_data, 1)[0].read_bytes()
    return {
        "no file": ({"files": {"note": (None, "hello")}}, 400, "no_files"),
        "not multipart": ({"content": b"{}", "headers": {"content-type": "application/json"}}, 415, "not_multipart"),
        "empty body": ({}, 415, "not_multipart"),
        "empty file": ({"files": [("file", ("e.jpg", b"", "image/jpeg"))]}, 400, "empty_file"),
        "text file": ({"files": [("file", ("a.jpg", b"just some text, not a photo", "image/jpeg"))]}, 415,
                      "not_an_image"),
        "truncated": ({"files": [("file", ("t.jpg", good[: len(good) // 2], "image/jpeg"))]}, 422,
                      "undecodable_image"),
        "bomb": ({"files": [("file", ("bomb.png", _png(3000, 3000), "image/png"))]}, 413, "too_many_pixels"),
        "aspect-ratio bomb": ({"files": [("file", ("long.png", _png(20_000, 20, "L"), "image/png"))]}, 422,
                              "bad_shape"),
        "malformed DDS": ({"files": [("file", ("x.dds", _dds_bad_pixel_format(), "image/x-dds"))]}, 415,
                          "not_an_image"),
        "bad multipart": ({"content": b"--x\r\nnot a part", "headers": {
            "content-type": "multipart/form-data; boundary=x"}}, 400, "bad_multipart"),
        "too many files": ({"files": [("file", (f"{i}.jpg", good, "image/jpeg")) for i in range(5)]}, 413,
                           "too_many_files"),
        "file too large": ({"files": [("file", ("big.jpg", good + b"\0" * 300_000, "image/jpeg"))]}, 413,
                           "file_too_large"),
        "bad top_k": ({"params": {"top_k": 0}, "files": [("file", ("g.jpg", good, "image/jpeg"))]}, 422,
                      "invalid_parameter"),
        "top_k not a number": ({"params": {"top_k": "five"}, "files": [("file", ("g.jpg", good, "image/jpeg"))]},
                               422, "invalid_parameter"),
    }


LIMITS = {"max_files": 4, "max_file_bytes": 250_000, "max_pixels": 4_000_000}


def test_bad_inputs_are_4xx_json_and_the_service_lives_on(client_for, synth_data):
    c = client_for(**LIMITS)
    for name, (kwargs, status, code) in _bad_requests(synth_data).items():
        r = c.post("/v1/predict", **kwargs)
        assert r.status_code == status, (name, r.text)
        body = r.json()
        assert body["error"] == code, name
        assert body["detail"], name
        if code == "too_many_pixels":
            assert "--max-pixels" in body["detail"]  # the setting to change, as the service calls it
    # the request as a whole over the limit (Content-Length): refused before it is read
    big = c.post("/v1/predict", content=b"x" * (4 * 250_000 + (1 << 20) + 10),
                 headers={"content-type": "multipart/form-data; boundary=x"})
    assert big.status_code == 413
    assert big.json()["error"] == "request_too_large"
    # the truncated photo's error says which file and why
    truncated = _bad_requests(synth_data)["truncated"][0]
    body = c.post("/v1/predict", **truncated).json()
    assert body["files"][0]["filename"] == "t.jpg"
    assert "truncated" in body["files"][0]["detail"]
    good = _photos(synth_data, 1)[0]
    assert c.post("/v1/predict", files=[("file", (good.name, good.read_bytes(), "image/jpeg"))]).status_code == 200
    assert c.get("/readyz").status_code == 200
    metrics = c.get("/metrics").text
    assert 'carclf_errors_total{code="too_many_pixels"}' in metrics


def test_bad_requests_do_not_grow_memory(client_for, synth_data):
    c = client_for(**LIMITS)
    cases = list(_bad_requests(synth_data).values())
    for kwargs, _, _ in cases * 2:  # warm up caches, metric label sets, the multipart parser
        c.post("/v1/predict", **kwargs)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        sent = 0
        for _ in range(15):
            for kwargs, _, _ in cases:
                c.post("/v1/predict", **kwargs)
                sent += 1
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # the bad requests carried several MB in total; a leak of even one photo per request would exceed this
    assert sent == 15 * len(cases)
    assert grown < 1_500_000, f"memory grew by {grown:,} bytes over {sent} bad requests"


def test_concurrent_requests_are_merged_into_batches(client_for, synth_data):
    c = client_for(max_batch=8, max_wait_ms=300)
    photos = [p.read_bytes() for p in _photos(synth_data, 8)]

    def one(data: bytes) -> int:
        return c.post("/v1/predict", files=[("file", ("p.jpg", data, "image/jpeg"))]).status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(one, photos))
    assert statuses == [200] * 8
    sizes = c.app.state.metrics.batch_sizes
    assert sum(sizes) == 8
    assert max(sizes) >= 2, f"no request was merged with another: batch sizes {sizes}"
    metrics = c.get("/metrics").text
    assert f"carclf_batch_size_count {float(len(sizes))}" in metrics
    assert "carclf_batch_size_sum 8.0" in metrics


def test_a_failing_engine_is_a_500_json_and_the_next_request_works(client_for, predictor, synth_data, monkeypatch):
    c = client_for(raise_server_exceptions=False)
    good = _photos(synth_data, 1)[0].read_bytes()
    files = [("file", ("g.jpg", good, "image/jpeg"))]

    def broken(*args, **kwargs):
        raise RuntimeError("engine exploded")

    monkeypatch.setattr(predictor, "predict_images", broken)
    r = c.post("/v1/predict", files=files)
    assert r.status_code == 500
    assert r.json() == {"error": "internal", "detail": "RuntimeError: engine exploded"}
    monkeypatch.undo()
    assert c.post("/v1/predict", files=files).status_code == 200
    assert c.get("/readyz").status_code == 200


def test_api_key(client_for, synth_data, monkeypatch):
    from carclf.serve.server import api_key_from_env

    c = client_for(api_key=KEY)
    good = _photos(synth_data, 1)[0].read_bytes()
    files = [("file", ("g.jpg", good, "image/jpeg"))]
    assert c.post("/v1/predict", files=files).status_code == 401
    r = c.post("/v1/predict", files=files, headers={"X-API-Key": "wrong"})
    assert r.status_code == 401
    assert r.json()["error"] == "unauthorized"
    assert c.post("/v1/predict", files=files, headers={"X-API-Key": KEY}).status_code == 200
    assert c.get("/v1/classes").status_code == 401
    assert c.get("/healthz").status_code == 200  # probes stay open
    monkeypatch.delenv("CARCLF_TEST_KEY", raising=False)
    with pytest.raises(CarclfError, match="CARCLF_TEST_KEY"):
        api_key_from_env("CARCLF_TEST_KEY")
    monkeypatch.setenv("CARCLF_TEST_KEY", "short")
    with pytest.raises(CarclfError, match="at least 16"):
        api_key_from_env("CARCLF_TEST_KEY")
    monkeypatch.setenv("CARCLF_TEST_KEY", KEY)
    assert api_key_from_env("CARCLF_TEST_KEY") == KEY


# ------------------------------------------------------------------------------------------- real uvicorn
@pytest.fixture(scope="module")
def served(export_dir, tmp_path_factory):
    """``carclf serve EXPORT`` in its own process under uvicorn on a free loopback port (stdout and stderr in
    ``log``)."""
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    argv = [sys.executable, "-m", "carclf", "serve", str(export_dir), "--max-wait-ms", "2"]
    with serving(argv, log, env={"CARCLF_TEST_SERVE_KEY": KEY}, ready_s=180) as served:
        yield served


@pytest.fixture(scope="module")
def server(served) -> str:
    """The base URL of :func:`served`."""
    return served.url


def _status(pid: int, field: str) -> int:
    """A /proc/PID/status field in bytes (VmSize, VmRSS, ...)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _predicted(metrics: str) -> float:
    (line,) = [x for x in metrics.splitlines() if x.startswith("carclf_photos_predicted_total ")]
    return float(line.split()[1])


def test_aspect_ratio_bomb_is_refused_from_the_header_under_a_memory_limit(served, synth_data):
    """A 2,000,000 x 20 PNG (38 KB, 40 MP: within --max-pixels) once made the server grow by gigabytes while it was
    resized to the input; now its header is enough to refuse it. Its address space is capped 2 GiB above what it
    has mapped now while the bomb is sent, so the old behaviour fails instead of taking memory from the machine."""
    import httpx

    bomb = _png(2_000_000, 20, "L")
    good = _photos(synth_data, 1)[0].read_bytes()
    soft, hard = resource.prlimit(served.proc.pid, resource.RLIMIT_AS)
    cap = _status(served.proc.pid, "VmSize") + (2 << 30)
    resource.prlimit(served.proc.pid, resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard),
                                                           hard))
    try:
        with httpx.Client(base_url=served.url, timeout=60) as c:
            predicted = _predicted(c.get("/metrics").text)
            r = c.post("/v1/predict", files=[("file", ("long.png", bomb, "image/png"))])
            assert r.status_code == 422, r.text
            assert r.json()["error"] == "bad_shape"
            assert r.json()["filename"] == "long.png"
            assert "2000000x20" in r.json()["detail"]
            assert c.get("/readyz").status_code == 200
            assert c.post("/v1/predict", files=[("file", ("g.jpg", good, "image/jpeg"))]).status_code == 200
            assert _predicted(c.get("/metrics").text) == predicted + 1  # the bomb never reached the engines
    finally:
        resource.prlimit(served.proc.pid, resource.RLIMIT_AS, (soft, hard))


def test_a_malformed_dds_is_415_and_the_keep_alive_connection_answers_the_next_request(served, synth_data):
    import httpx

    good = _photos(synth_data, 1)[0].read_bytes()
    with httpx.Client(base_url=served.url, timeout=60) as c:
        bad = c.post("/v1/predict", files=[("file", ("x.dds", _dds_bad_pixel_format(), "image/x-dds"))])
        assert bad.status_code == 415, bad.text
        assert bad.json()["error"] == "not_an_image"
        assert "JPEG, PNG, WebP, BMP, GIF, TIFF" in bad.json()["detail"]
        nxt = c.post("/v1/predict", files=[("file", ("g.jpg", good, "image/jpeg"))])
        assert nxt.status_code == 200
        first, second = (r.extensions["network_stream"].get_extra_info("client_addr") for r in (bad, nxt))
        assert first == second  # the same connection: the refusal did not close it


def test_an_upload_aborted_mid_body_is_counted_as_499_without_a_traceback(served):
    import httpx

    sock = socket.create_connection(("127.0.0.1", served.port), timeout=10)
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{served.port}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 500000\r\n\r\n").encode()
    part = b'--b\r\nContent-Disposition: form-data; name="file"; filename="cut.jpg"\r\n\r\n' + b"\xff" * 100_000
    sock.sendall(head + part)
    time.sleep(0.3)  # let the server start reading the body
    sock.close()
    deadline, text = time.monotonic() + 20, ""
    while 'route="/v1/predict",status="499"' not in text:
        assert time.monotonic() < deadline, f"no 499 in /metrics:\n{text}"
        time.sleep(0.2)
        text = httpx.get(f"{served.url}/metrics", timeout=10).text
    assert 'carclf_errors_total{code="client_closed"}' in text
    assert 'status="500"' not in text
    log = served.log.read_text()
    assert "Exception in ASGI application" not in log
    assert "Traceback" not in log


def test_cli_serves_under_uvicorn(server, synth_data, predictor):
    import httpx

    photo = _photos(synth_data, 1)[0]
    r = httpx.post(f"{server}/v1/predict", files=[("file", (photo.name, photo.read_bytes(), "image/jpeg"))],
                   timeout=60)
    assert r.status_code == 200
    body = r.json()
    assert body["model"]["version"] == predictor.version
    assert len(body["predictions"][0]["top"]) == 5
    assert httpx.get(f"{server}/metrics", timeout=10).text.count("carclf_photos_predicted_total") >= 1


def test_cli_serve_refuses_a_missing_api_key(export_dir, capsys, monkeypatch):
    from carclf.cli import main

    monkeypatch.delenv("CARCLF_NO_SUCH_KEY", raising=False)
    assert main(["serve", str(export_dir), "--api-key-env", "CARCLF_NO_SUCH_KEY"]) == 2
    assert "CARCLF_NO_SUCH_KEY" in capsys.readouterr().err


def test_upload_page_shows_the_top5_bars(server, synth_data, tmp_path):
    from tests.browser import chromium_page

    photo = _photos(synth_data, 1)[0]
    with chromium_page() as (page, errors):
        page.goto(f"{server}/")
        page.set_input_files("#file", str(photo))
        page.wait_for_selector("#rows .row:nth-child(5)", timeout=60_000)
        page.wait_for_function("document.querySelector('#rows .fill').style.width !== ''", timeout=10_000)
        names = page.locator("#rows .name").all_inner_texts()
        widths = page.eval_on_selector_all("#rows .fill", "els => els.map(e => parseFloat(e.style.width))")
        status = page.inner_text("#status")
        assert page.eval_on_selector("#preview", "img => img.naturalWidth") > 0
        page.screenshot(path=str(tmp_path / "upload-page.png"), full_page=True)
        if os.environ.get("CARCLF_SCREENSHOT_DIR"):  # keep a copy to look at
            page.screenshot(path=str(Path(os.environ["CARCLF_SCREENSHOT_DIR"]) / "upload-page.png"), full_page=True)
    assert len(names) == 5
    assert all(n.strip() for n in names)
    assert widths == sorted(widths, reverse=True)
    assert widths[0] > 0
    assert photo.name in status
    assert errors == []
    assert (tmp_path / "upload-page.png").stat().st_size > 10_000
