"""The HTTP service against unlucky clients (issue 16): the default top-k of a model with few classes, closed docs
behind an API key, and metrics labelled by the real route. The model is a stand-in (:class:`FakePredictor`: it
decodes every photo as the service's predictor does and answers fixed probabilities).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

MiB = 1 << 20


# ------------------------------------------------------------------------------------------------ the stand-in
class FakeEngine:
    engine = "fake"


class FakePredictor:
    """The parts of a Predictor the service uses, for ``n`` classes: each photo is decoded with the service's
    decoder (bad ones are reported as such) and gets the same descending probabilities."""

    def __init__(self, n: int = 3) -> None:
        self.output_classes = [f"car {i}" for i in range(n)]
        self.version, self.precision, self.views = f"fake{n}", "fp32", ("center",)
        self.engines = [FakeEngine()]
        p = np.arange(n, 0, -1, dtype=np.float64)
        self._probs = p / p.sum()

    def predict_images(self, images, fill_bad: bool = False):
        from carclf.data.imageio import load_rgb

        bad = []
        for i, data in enumerate(images):
            try:
                load_rgb(data, target=32, max_pixels=90_000_000)
            except Exception:  # noqa: BLE001 - a bad photo, as the Predictor reports it
                bad.append(i)
        return np.tile(self._probs, (len(images), 1)), bad


def small_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (96, 64), (40, 90, 160)).save(buf, "JPEG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ in-process tests
@pytest.fixture
def client_for():
    """``client_for(classes, **settings)`` -> a started TestClient around a stand-in model."""
    from fastapi.testclient import TestClient

    from carclf.serve.app import ServeSettings, create_app

    clients = []

    def make(classes: int = 3, **settings):
        c = TestClient(create_app(FakePredictor(classes), ServeSettings(**settings)))
        c.__enter__()
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.__exit__(None, None, None)


def test_default_top_k_is_capped_at_the_class_count(client_for):
    c = client_for(3)
    files = [("file", ("car.jpg", small_jpeg(), "image/jpeg"))]
    r = c.post("/v1/predict", files=files)
    assert r.status_code == 200, r.text
    assert [t["class"] for t in r.json()["predictions"][0]["top"]] == ["car 0", "car 1", "car 2"]
    assert len(c.post("/v1/predict?top_k=2", files=files).json()["predictions"][0]["top"]) == 2
    over = c.post("/v1/predict?top_k=5", files=files)  # asked for explicitly: still an error
    assert over.status_code == 422
    assert over.json()["error"] == "invalid_parameter"
    assert "1..3" in over.json()["detail"]
    assert "top_k=5" not in c.get("/").text  # the page leaves k to the service
    assert len(client_for(8).post("/v1/predict", files=files).json()["predictions"][0]["top"]) == 5


def test_docs_and_schema_are_closed_when_an_api_key_is_set(client_for):
    key = "k" * 24
    open_ = client_for()
    assert open_.get("/docs").status_code == 200
    assert open_.get("/openapi.json").json()["info"]["title"] == "carclf"
    keyed = client_for(api_key=key)
    for path in ("/docs", "/openapi.json", "/docs/oauth2-redirect"):
        assert keyed.get(path).status_code == 404, path
        assert keyed.get(path, headers={"X-API-Key": key}).status_code == 404, path
    assert keyed.get("/v1/classes", headers={"X-API-Key": key}).status_code == 200
    assert keyed.get("/healthz").status_code == 200


def test_request_too_large_is_counted_under_its_own_route(client_for):
    c = client_for(max_files=1, max_file_bytes=1000)
    big = b"x" * (1000 + MiB + 1)
    for path in ("/healthz", "/no/such/path", "/v1/predict"):
        r = c.post(path, content=big, headers={"content-type": "multipart/form-data; boundary=x"})
        assert r.status_code == 413, path
        assert r.json()["error"] == "request_too_large"
    text = c.get("/metrics").text
    assert 'carclf_http_requests_total{route="/healthz",status="413"} 1.0' in text
    assert 'carclf_http_requests_total{route="other",status="413"} 1.0' in text
    assert 'carclf_http_requests_total{route="/v1/predict",status="413"} 1.0' in text
    assert 'carclf_errors_total{code="request_too_large"} 3.0' in text
