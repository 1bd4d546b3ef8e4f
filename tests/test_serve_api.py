"""The service's steps without HTTP (carclf/serve/api.py, as LitServe splits a LitAPI): decode_request on a request
built by hand (a Starlette Request around a scope and a ``receive`` that hands out the body in chunks), predict with
a stand-in micro-batcher, encode_response on fixed probabilities, and the served model's version."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest

from carclf.serve.api import (
    ServedModel,
    check_photo,
    decode_request,
    encode_response,
    predict,
    predictor_version,
    resolve_top_k,
)
from carclf.serve.settings import ApiError, ClientGone, ServeSettings
from carclf.serve.uploads import BODY_DONE, Photo, UploadBudget
from tests.test_serve_hardening import BOUNDARY, FakePredictor, body_end, part_head, small_jpeg

CTYPE = f"multipart/form-data; boundary={BOUNDARY}"


class Gauge:
    def __init__(self) -> None:
        self.value = 0

    def set(self, value: int) -> None:
        self.value = value


class Body:
    """An ASGI ``receive`` handing out ``body`` in ``chunk``-byte messages; ``sent`` counts those handed out."""

    def __init__(self, body: bytes, chunk: int = 1 << 16) -> None:
        self.pieces = [body[i:i + chunk] for i in range(0, len(body), chunk)] or [b""]
        self.sent = 0

    async def __call__(self) -> dict:
        piece = self.pieces[self.sent]
        self.sent += 1
        return {"type": "http.request", "body": piece, "more_body": self.sent < len(self.pieces)}


def request(receive, content_type: str = CTYPE, length: int | None = None):
    from starlette.requests import Request

    headers = [(b"content-type", content_type.encode())]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    return Request({"type": "http", "method": "POST", "path": "/v1/predict", "headers": headers}, receive)


def multipart(*files: tuple[str, bytes]) -> bytes:
    return b"".join(part_head(name) + data + b"\r\n" for name, data in files)[:-2] + body_end()


def decode(req, budget: UploadBudget | None = None, **settings) -> list[Photo]:
    """decode_request on ``req``; the budget must be whole again after it, whatever happened."""
    budget = budget or UploadBudget(64 << 20, Gauge())

    async def run() -> list[Photo]:
        with budget.lease() as lease:
            return await decode_request(req, ServeSettings(**settings), lease)

    try:
        return asyncio.run(run())
    finally:
        assert budget.held == 0


def refused(req, **settings) -> ApiError:
    with pytest.raises(ApiError) as info:
        decode(req, **settings)
    return info.value


# --------------------------------------------------------------------------------------------------- decode
def test_decode_a_good_photo():
    photo = small_jpeg()
    body = multipart(("car.jpg", photo), ("second.jpg", photo))
    req = request(Body(body, chunk=1000), length=len(body))
    assert decode(req) == [Photo("car.jpg", photo), Photo("second.jpg", photo)]
    assert req.scope[BODY_DONE] is True  # read to its end: a later refusal keeps the connection open


def test_decode_holds_the_body_in_the_budget_while_it_reads():
    body = multipart(("car.jpg", small_jpeg()))
    gauge = Gauge()
    budget = UploadBudget(64 << 20, gauge)
    seen = []

    class Watched(Body):
        async def __call__(self) -> dict:
            seen.append(budget.held)
            return await super().__call__()

    decode(request(Watched(body, chunk=100)), budget)
    assert seen[0] == 0
    assert seen[-1] == len(body) - len(Body(body, chunk=100).pieces[-1])  # every chunk but the last, held
    assert gauge.value == 0


def test_decode_refuses_a_file_too_large_while_it_streams():
    body = multipart(("huge.jpg", b"\xff" * 100_000))
    receive = Body(body, chunk=1000)
    err = refused(request(receive), max_file_bytes=10_000)
    assert (err.status, err.code, err.extra["filename"]) == (413, "file_too_large", "huge.jpg")
    assert "--max-file-mb" in err.detail
    assert receive.sent < len(receive.pieces) // 5  # refused a little after the limit, the rest never read


def test_decode_refuses_a_file_that_is_not_an_image():
    err = refused(request(Body(multipart(("notes.jpg", b"just some text, not a photo")))))
    assert (err.status, err.code, err.extra["filename"]) == (415, "not_an_image", "notes.jpg")
    assert "JPEG, PNG" in err.detail


@pytest.mark.parametrize(("content_type", "body", "status", "code"), [
    ("application/json", b"{}", 415, "not_multipart"),
    (CTYPE, body_end(), 400, "no_files"),
    ("multipart/form-data", b"--x\r\n", 400, "bad_multipart"),
    (CTYPE, part_head("cut.jpg") + b"\xff" * 10, 400, "bad_multipart"),
])
def test_decode_refuses_requests_without_photos(content_type, body, status, code):
    err = refused(request(Body(body), content_type))
    assert (err.status, err.code) == (status, code)


def test_decode_refuses_a_declared_length_over_the_budget_before_reading():
    receive = Body(multipart(("car.jpg", small_jpeg())))
    budget = UploadBudget(2 << 20, Gauge())
    with pytest.raises(ApiError) as info:
        decode(request(receive, length=3 << 20), budget, max_upload_bytes=2 << 20, max_file_bytes=1 << 20)
    assert (info.value.status, info.value.code) == (503, "busy")
    assert receive.sent == 0


def test_decode_gives_up_on_a_body_that_does_not_arrive():
    async def never() -> dict:
        await asyncio.sleep(60)
        return {"type": "http.request", "body": b"", "more_body": False}

    err = refused(request(never), body_timeout_s=0.05)
    assert (err.status, err.code) == (408, "body_timeout")


def test_decode_a_client_that_goes_away_is_client_gone():
    async def gone() -> dict:
        return {"type": "http.disconnect"}

    with pytest.raises(ClientGone):
        decode(request(gone))


def test_check_photo_refuses_from_the_header():
    settings = ServeSettings(max_file_bytes=1000, max_pixels=4_000_000)
    check_photo(small_jpeg(), "ok.jpg", settings)
    cases = {"empty": (b"", 400, "empty_file"), "large": (b"\xff" * 1001, 413, "file_too_large"),
             "text": (b"hello", 415, "not_an_image")}
    for name, (data, status, code) in cases.items():
        with pytest.raises(ApiError) as info:
            check_photo(data, name, settings)
        assert (info.value.status, info.value.code) == (status, code), name


# --------------------------------------------------------------------------------------------------- predict
def test_predict_returns_the_batchers_rows_and_names_undecodable_photos():
    good, cut = small_jpeg(), small_jpeg()[:200]
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    calls = []

    async def submit(datas, bad=()):
        calls.append(datas)
        return probs[: len(datas)], list(bad)

    photos = [Photo("a.jpg", good), Photo("b.jpg", good)]
    assert np.array_equal(asyncio.run(predict(photos, submit, 4_000_000)), probs)
    assert calls == [[good, good]]

    async def one_bad(datas):
        return await submit(datas, bad=[1])

    with pytest.raises(ApiError) as info:
        asyncio.run(predict([Photo("a.jpg", good), Photo("cut.jpg", cut)], one_bad, 4_000_000))
    err = info.value
    assert (err.status, err.code) == (422, "undecodable_image")
    assert "1 of 2" in err.detail
    (reason,) = err.extra["files"]
    assert reason["filename"] == "cut.jpg"
    assert reason["detail"]


# --------------------------------------------------------------------------------------------------- encode
MODEL = ServedModel("v1", "onnx", "fp32", ("a", "b", "c"))


def test_encode_response_lists_the_top_k_most_probable_first():
    probs = np.array([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]])
    body = encode_response([Photo("x.jpg", b""), Photo("y.jpg", b"")], probs, 2, MODEL, 0.0)
    assert body["model"] == {"version": "v1", "engine": "onnx", "precision": "fp32"}
    assert body["predictions"] == [
        {"filename": "x.jpg", "top": [{"class": "b", "probability": 0.5}, {"class": "c", "probability": 0.3}]},
        {"filename": "y.jpg", "top": [{"class": "a", "probability": 0.6}, {"class": "c", "probability": 0.3}]},
    ]
    assert all(type(t["probability"]) is float for p in body["predictions"] for t in p["top"])  # JSON, not numpy
    assert isinstance(body["elapsed_ms"], float)


def test_top_k_default_is_capped_at_the_class_count_and_an_explicit_one_is_checked():
    assert resolve_top_k(None, 5, 3) == 3
    assert resolve_top_k(None, 5, 8) == 5
    assert resolve_top_k(2, 5, 3) == 2
    for asked in (0, 4):
        with pytest.raises(ApiError, match=r"1\.\.3") as info:
            resolve_top_k(asked, 5, 3)
        assert (info.value.status, info.value.code) == (422, "invalid_parameter")
    probs = np.array([[0.2, 0.5, 0.3]])
    k = resolve_top_k(None, 5, len(MODEL.classes))
    (pred,) = encode_response([Photo("x.jpg", b"")], probs, k, MODEL, 0.0)["predictions"]
    assert [t["class"] for t in pred["top"]] == ["b", "c", "a"]


# --------------------------------------------------------------------------------------------------- version
def test_the_served_version_is_the_predictors_own():
    assert predictor_version(FakePredictor(3)) == "fake3"
    assert ServedModel.of(FakePredictor(3)) == ServedModel("fake3", "fake", "fp32", ("car 0", "car 1", "car 2"))
    with pytest.raises(ValueError, match="no version"):
        predictor_version(SimpleNamespace(version=None))
