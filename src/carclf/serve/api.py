"""The service's steps, split as LitServe splits a LitAPI, each a plain function of plain values (so
tests/test_serve_api.py calls them without HTTP; ``create_app`` only wires them to the route):

- :func:`decode_request`: a multipart request -> its photos, each checked from its header, or an :class:`ApiError`
  (HTTP status, error code, sentence);
- :func:`predict`: photos -> calibrated probabilities, one row each, through the Predictor (via the micro-batcher);
- :func:`encode_response`: probabilities -> the JSON answer, the top ``k`` classes of each photo.
"""

from __future__ import annotations

import io
import time
import warnings
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from carclf.serve.settings import ApiError, ServeSettings
from carclf.serve.uploads import Lease, Photo, read_uploads

Submit = Callable[[list[bytes]], Awaitable[tuple[np.ndarray, list[int]]]]  # photos' bytes -> (probs, bad indices)


# ------------------------------------------------------------------------------------------------- the model
def predictor_version(predictor) -> str:
    """The served model's version (for /readyz, /v1/*, /metrics and the app's title): the Predictor's own
    (:attr:`carclf.infer.predictor.Predictor.version`; serve computes none of its own)."""
    version = predictor.version
    if not version:
        raise ValueError("the predictor has no version: build it with carclf.infer.predictor.Predictor.open")
    return str(version)


@dataclass(frozen=True)
class ServedModel:
    """What the answers say about the model: its version, engine, precision and output classes."""

    version: str
    engine: str
    precision: str
    classes: tuple[str, ...]

    @classmethod
    def of(cls, predictor) -> ServedModel:
        return cls(predictor_version(predictor), predictor.engines[0].engine, predictor.precision,
                   tuple(predictor.output_classes))

    def card(self) -> dict[str, str]:
        return {"version": self.version, "engine": self.engine, "precision": self.precision}


def run_predictor(predictor, images: list[bytes]) -> tuple[np.ndarray, list[int]]:
    """The inference thread's call: photos' bytes -> (probabilities, indices of those that would not decode).
    ``predictor.predict_images`` is looked up at each call (a test swaps it for a failing one)."""
    return predictor.predict_images(images, fill_bad=False)


# ------------------------------------------------------------------------------------------------- decode
def resolve_top_k(top_k: int | None, default: int, n_classes: int) -> int:
    """The k of top-k: ``default`` capped at the class count when the request gives none (a 3-class model answers
    its 3); an explicit k outside 1..n_classes is a 422."""
    k = min(default, n_classes) if top_k is None else top_k
    if not 1 <= k <= n_classes:
        raise ApiError(422, "invalid_parameter", f"top_k must be in 1..{n_classes}, got {k}")
    return k


async def decode_request(request, settings: ServeSettings, lease: Lease) -> list[Photo]:
    """decode_request: the photos of a multipart ``request`` (see :func:`~carclf.serve.uploads.read_uploads`), its
    body bytes held in ``lease`` while it is read, each photo checked from its header by :func:`check_photo` (on a
    worker thread: the event loop never decodes); an :class:`ApiError` for anything refused."""
    from starlette.concurrency import run_in_threadpool

    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(415, "not_multipart", "send the photos as multipart/form-data (e.g. curl -F "
                       "file=@car.jpg), one file per field")
    photos = await read_uploads(request, settings, lease)
    if not photos:
        raise ApiError(400, "no_files", "the request holds no file: send one or more photos as multipart file "
                       "fields")
    await run_in_threadpool(check_photos, photos, settings)
    return photos


def check_photos(photos: Sequence[Photo], settings: ServeSettings) -> None:
    for photo in photos:
        check_photo(photo.data, photo.name, settings)


def check_photo(data: bytes, name: str, settings: ServeSettings) -> None:
    """Refuse a file from its header alone (no decoding): empty, too large, not one of the listed formats (415,
    whatever the decoder raised: a client's file is never a 500), too many pixels (413 naming ``--max-pixels``), an
    aspect ratio no photo has (422 ``bad_shape``: a 2,000,000 x 20 PNG is 5 KB but the resize to the input would
    make it gigabytes)."""
    from PIL import Image

    from carclf.data.imageio import FORMAT_LIST, UnreadablePhoto, check_shape, open_image

    if not data:
        raise ApiError(400, "empty_file", f"'{name}' is empty")
    if len(data) > settings.max_file_bytes:
        raise ApiError(413, "file_too_large", f"'{name}' is {len(data):,} bytes; at most "
                       f"{settings.max_file_bytes:,} per photo", filename=name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with open_image(io.BytesIO(data)) as img:
                w, h = img.size
    except Image.DecompressionBombError as exc:  # Pillow's own guard, far above ours
        raise ApiError(413, "too_many_pixels", f"'{name}': {exc} (--max-pixels={settings.max_pixels:,})",
                       filename=name) from None
    except Exception as exc:  # noqa: BLE001 - whatever a decoder raises on a header is the file's fault: 415
        raise ApiError(415, "not_an_image", f"'{name}' is not an image this service can read ({FORMAT_LIST}): "
                       f"{type(exc).__name__}", filename=name) from None
    try:
        check_shape(w, h, settings.max_pixels, "--max-pixels")
    except Image.DecompressionBombError as exc:
        raise ApiError(413, "too_many_pixels", f"'{name}': {exc}", filename=name) from None
    except UnreadablePhoto as exc:
        raise ApiError(422, "bad_shape", f"'{name}': {exc}", filename=name) from None


def decode_error(data: bytes, max_pixels: int) -> str:
    """Why a photo that passed :func:`check_photo` still failed to decode (truncated, corrupt)."""
    from carclf.data.imageio import load_rgb

    try:
        load_rgb(data, max_pixels=max_pixels, limit_name="--max-pixels")
    except Exception as exc:  # noqa: BLE001 - the message is the answer
        return f"{type(exc).__name__}: {exc}"
    return "the photo could not be decoded"


# ------------------------------------------------------------------------------------------------- predict
async def predict(photos: Sequence[Photo], submit: Submit, max_pixels: int) -> np.ndarray:
    """predict: the photos' calibrated probabilities (one row each) from ``submit`` (the micro-batcher's, in front
    of :func:`run_predictor`); a 422 ``undecodable_image`` naming each photo that would not decode, and why."""
    from starlette.concurrency import run_in_threadpool

    probs, bad = await submit([photo.data for photo in photos])
    if bad:
        reasons = await run_in_threadpool(
            lambda: [{"filename": photos[i].name, "detail": decode_error(photos[i].data, max_pixels)} for i in bad])
        raise ApiError(422, "undecodable_image", f"{len(bad)} of {len(photos)} photo(s) could not be decoded "
                       "(truncated or corrupt)", files=reasons)
    return probs


# ------------------------------------------------------------------------------------------------- encode
def encode_response(photos: Sequence[Photo], probs: np.ndarray, k: int, model: ServedModel,
                    started: float) -> dict[str, Any]:
    """encode_response: each photo's ``k`` most probable classes, most probable first, with the model's card and the
    milliseconds since ``started`` (a ``time.perf_counter()``)."""
    order = np.argsort(-probs, axis=1)[:, :k]
    predictions = [
        {"filename": photo.name, "top": [{"class": model.classes[j], "probability": float(p[j])} for j in idx]}
        for photo, p, idx in zip(photos, probs, order, strict=True)
    ]
    return {"model": model.card(), "predictions": predictions,
            "elapsed_ms": round((time.perf_counter() - started) * 1000, 1)}
