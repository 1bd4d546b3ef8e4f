"""The HTTP service: ``create_app(predictor)`` -> a FastAPI app around the one :class:`Predictor`.

- ``POST /v1/predict``: one or several photos (multipart, any field name) -> top-k classes with calibrated
  probabilities and the model's version.
- ``GET /v1/classes``, ``GET /healthz`` (alive), ``GET /readyz`` (warmed up, inference thread running),
  ``GET /metrics`` (Prometheus), ``GET /`` (the upload page, no CDN); ``GET /docs`` and ``/openapi.json`` only
  while no API key is set.

Concurrent requests are micro-batched: handlers put their photos on an asyncio queue; one task gathers up to
``max_batch`` photos (waiting at most ``max_wait_ms`` for company) and hands them to the one inference thread, so the
event loop never blocks on decoding or the network, and the engines see batches instead of single photos.

Every bad input is a 4xx JSON error ``{"error": code, "detail": what was wrong, ...}``: empty request, too many
files, a file or request too large, an empty file, a file that is not one of the listed formats (whatever a decoder
raises on it: 415, never a 500), too many pixels (decompression bombs, 413 naming ``--max-pixels``), a shape no
photo has (aspect-ratio bombs, 422 ``bad_shape``), a truncated photo, a body that does not arrive within
``body_timeout_s`` (408). A client that goes away mid-upload is counted as 499 ``client_closed`` (nginx's code), not
as a server fault.

Uploads are parsed while they stream in (python-multipart's ``MultipartParser``, the parser Starlette uses) into
memory, never spooled to disk: a file is refused (413) as soon as it passes ``max_file_bytes``, and the bytes held by
all uploads in flight are capped by ``max_upload_bytes`` (503 ``busy`` with Retry-After beyond it), so memory is
bounded whatever clients send. Nothing of a request is kept after its answer.
"""


import asyncio
import hashlib
import io
import secrets
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

import numpy as np

MiB = 1 << 20


@dataclass
class ServeSettings:
    max_batch: int = 8  # photos per engine call: on 2 CPU cores 8 beat 16 (RESULTS); GPUs want more
    max_wait_ms: float = 5.0  # how long a batch waits for more photos once it has one
    max_files: int = 16  # photos per request
    max_file_bytes: int = 10 * MiB  # per photo
    max_pixels: int = 40_000_000  # width x height, checked from the header before decoding (decompression bombs)
    max_queue: int = 256  # photos waiting for inference beyond which requests get 503 (back-pressure)
    top_k: int = 5  # default k of top-k (capped at the class count when a request gives none)
    body_timeout_s: float = 60.0  # the whole request body must arrive within this (slow clients: 408)
    max_upload_bytes: int = 256 * MiB  # request-body bytes held by all uploads in flight (503 busy beyond)
    api_key: str | None = None  # when set, /v1/* need the header X-API-Key with this value; /docs is closed

    @property
    def max_request_bytes(self) -> int:
        return self.max_files * self.max_file_bytes + MiB  # the multipart framing around the files

    def check(self) -> None:
        from carclf.errors import CarclfError

        for name in ("max_batch", "max_files", "max_file_bytes", "max_queue", "top_k"):
            if getattr(self, name) < 1:
                raise CarclfError(f"serve: {name} must be at least 1")
        if self.max_wait_ms < 0 or self.max_pixels < 0:
            raise CarclfError("serve: max_wait_ms and max_pixels must be 0 or more")
        if self.body_timeout_s <= 0:
            raise CarclfError("serve: body_timeout_s must be more than 0")
        if self.max_upload_bytes < self.max_file_bytes + MiB:
            raise CarclfError(f"serve: max_upload_bytes ({self.max_upload_bytes:,}) must hold at least one photo of "
                              f"max_file_bytes ({self.max_file_bytes:,}) and its framing (1 MiB)")


class ClientGone(Exception):
    """The client closed the connection before its request body arrived: counted as 499, nothing is answered."""


class ApiError(Exception):
    """A request the service refuses: HTTP ``status`` with a machine-readable ``code`` and a sentence."""

    def __init__(self, status: int, code: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.extra = status, code, detail, extra

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "detail": self.detail, **self.extra}


# --------------------------------------------------------------------------------------------------------- metrics
class Metrics:
    """Prometheus metrics in a registry of the app's own (several apps in one process stay apart)."""

    def __init__(self, version: str, engine: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # the *_created series only double the scrape
        self.registry = r = CollectorRegistry()
        self.requests = Counter("carclf_http_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.latency = Histogram("carclf_http_request_seconds", "request latency by route", ["route"], registry=r,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10))
        self.errors = Counter("carclf_errors", "refused or failed requests by error code", ["code"], registry=r)
        self.photos = Counter("carclf_photos_predicted", "photos predicted", registry=r)
        self.batch_size = Histogram("carclf_batch_size", "photos per engine call (micro-batches)", registry=r,
                                    buckets=(1, 2, 4, 8, 12, 16, 24, 32, 48, 64))
        self.inference = Histogram("carclf_inference_seconds", "decoding + engines per micro-batch", registry=r,
                                   buckets=(0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5))
        self.queued = Gauge("carclf_queued_photos", "photos waiting for the inference thread", registry=r)
        self.upload_bytes = Gauge("carclf_upload_bytes", "request-body bytes held by uploads in flight", registry=r)
        info = Gauge("carclf_model_info", "the model served", ["version", "engine"], registry=r)
        info.labels(version=version, engine=engine).set(1)
        self.batch_sizes: list[int] = []  # the last batch sizes, for tests and the log (bounded)

    def record_batch(self, n: int, seconds: float) -> None:
        self.batch_size.observe(n)
        self.inference.observe(seconds)
        self.photos.inc(n)
        self.batch_sizes = [*self.batch_sizes[-999:], n]


# ---------------------------------------------------------------------------------------------------- batching
class MicroBatcher:
    """An asyncio queue in front of one inference thread: requests' photos are merged into batches of up to
    ``max_batch`` photos, the first photo waiting at most ``max_wait`` seconds for company."""

    def __init__(self, infer, settings: ServeSettings, metrics: Metrics) -> None:
        self.infer, self.settings, self.metrics = infer, settings, metrics
        self.queue: asyncio.Queue = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="carclf-infer")
        self.pending = 0  # photos queued or in the running batch
        self.task: asyncio.Task | None = None
        self._held: tuple | None = None  # an item that did not fit the last batch

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run(), name="carclf-batcher")

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            with suppress(asyncio.CancelledError):
                await self.task
        self.executor.shutdown(wait=True, cancel_futures=True)

    @property
    def alive(self) -> bool:
        return self.task is not None and not self.task.done()

    async def run_alone(self, images: list[bytes]):
        """Inference on the inference thread outside the queue (warm-up)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.infer, images)

    async def submit(self, images: list[bytes]) -> tuple[np.ndarray, list[int]]:
        if self.pending + len(images) > self.settings.max_queue:
            raise ApiError(503, "busy", f"{self.pending} photos are waiting for inference; retry shortly",
                           retry_after_s=1)
        fut = asyncio.get_running_loop().create_future()
        self.pending += len(images)
        self.metrics.queued.set(self.pending)
        await self.queue.put((images, fut))
        try:
            return await fut
        finally:
            if not fut.done():  # the client went away: the batch drops this item's results
                fut.cancel()

    async def _next(self, timeout: float | None):
        if self._held is not None:
            item, self._held = self._held, None
            return item
        if timeout is None:
            return await self.queue.get()
        if not self.queue.empty():
            return self.queue.get_nowait()
        if timeout <= 0:
            return None
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            return None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self._next(None)]
            n = len(items[0][0])
            deadline = loop.time() + self.settings.max_wait_ms / 1000
            while n < self.settings.max_batch:
                item = await self._next(deadline - loop.time())
                if item is None:
                    break
                if n + len(item[0]) > self.settings.max_batch:
                    self._held = item  # starts the next batch
                    break
                items.append(item)
                n += len(item[0])
            items = [(imgs, fut) for imgs, fut in items if not fut.cancelled()]  # clients that went away
            photos = [im for imgs, _ in items for im in imgs]
            if photos:
                t0 = time.perf_counter()
                try:
                    probs, bad = await loop.run_in_executor(self.executor, self.infer, photos)
                except Exception as exc:  # noqa: BLE001 - reported to each waiting request as a 500, never fatal
                    for _, fut in items:
                        if not fut.done():
                            fut.set_exception(exc)
                else:
                    self.metrics.record_batch(len(photos), time.perf_counter() - t0)
                    bad_set, start = set(bad), 0
                    for imgs, fut in items:
                        end = start + len(imgs)
                        if not fut.done():
                            fut.set_result((probs[start:end], [i - start for i in range(start, end) if i in bad_set]))
                        start = end
            self.pending -= n
            self.metrics.queued.set(self.pending)
            del items, photos  # no request's bytes outlive its batch


# ------------------------------------------------------------------------------------------------------ limits
class BodyLimit:
    """ASGI middleware refusing request bodies over ``limit`` bytes with 413, by Content-Length before reading
    and by counting while reading (chunked uploads). Written here because neither Starlette nor uvicorn limits
    the request body. Its refusals are counted by :class:`RequestMetrics` (outside it) under their real route."""

    def __init__(self, app, limit: int, on_refuse=None) -> None:
        self.app, self.limit, self.on_refuse = app, limit, on_refuse

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            if self.on_refuse:
                self.on_refuse()
            return await _send_json(send, 413, ApiError(
                413, "request_too_large", f"the request is {int(length):,} bytes; at most {self.limit:,} accepted "
                "(fewer or smaller photos per request)").body(), close=True)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise ApiError(413, "request_too_large", f"the request body exceeds {self.limit:,} bytes")
            return message

        return await self.app(scope, counted, send)


class UploadBudget:
    """The request-body bytes held by all uploads in flight, capped at ``limit``: a request takes its bytes as they
    arrive and gives them back when it is answered; one that would pass the cap is refused with 503. All calls
    come from the event loop's thread, so no lock is needed."""

    def __init__(self, limit: int, gauge) -> None:
        self.limit, self.gauge, self.held = limit, gauge, 0

    def check(self, n: int) -> None:
        """503 if ``n`` more bytes would not fit now (a request's declared length, refused before reading it)."""
        if self.held + n > self.limit:
            raise ApiError(503, "busy", f"uploads in progress hold {self.held:,} of {self.limit:,} bytes "
                           "(--max-upload-mb); retry shortly", retry_after_s=1)

    def take(self, n: int) -> None:
        self.check(n)
        self.held += n
        self.gauge.set(self.held)

    def give(self, n: int) -> None:
        self.held -= n
        self.gauge.set(self.held)


class MultipartUploads:
    """A multipart/form-data body parsed while it streams in, into memory (python-multipart's streaming parser,
    as Starlette's ``request.form()`` uses it, but without spooling files to disk): the files' bytes, refused as
    soon as one passes ``max_file_bytes`` or there are more than ``max_files``. Fields without a filename are
    ignored (at most 64 KiB each, ``max_files + 8`` of them)."""

    MAX_FIELD = 64 * 1024

    def __init__(self, content_type: str, settings: ServeSettings) -> None:
        from python_multipart.multipart import MultipartParser, parse_options_header

        self._options = parse_options_header
        _, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if not boundary:
            raise ApiError(400, "bad_multipart", "the multipart Content-Type has no boundary")
        self.settings = settings
        self.files: list[tuple[str, bytes]] = []
        self._fields = 0
        self._header_name = self._header_value = b""
        self._disposition = b""
        self._name, self._data, self._is_file = "", bytearray(), False
        callbacks = {"on_part_begin": self._part_begin, "on_part_data": self._part_data,
                     "on_part_end": self._part_end, "on_header_field": self._header_field,
                     "on_header_value": self._header_val, "on_header_end": self._header_end,
                     "on_headers_finished": self._headers_finished}
        try:
            self.parser = MultipartParser(boundary, callbacks)
        except Exception as exc:  # noqa: BLE001 - a bad boundary is the client's
            raise ApiError(400, "bad_multipart", f"bad multipart boundary: {exc}") from None

    def write(self, chunk: bytes) -> None:
        from python_multipart.exceptions import FormParserError

        try:
            self.parser.write(chunk)
        except FormParserError as exc:
            raise ApiError(400, "bad_multipart", f"invalid multipart data: {exc}") from None

    def finish(self) -> list[tuple[str, bytes]]:
        from python_multipart.multipart import MultipartState

        if self.parser.state != MultipartState.END:
            raise ApiError(400, "bad_multipart", "the multipart body ends before its closing boundary")
        return self.files

    def _part_begin(self) -> None:
        self._disposition, self._data = b"", bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_val(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def _headers_finished(self) -> None:
        _, options = self._options(self._disposition)
        if b"name" not in options:
            raise ApiError(400, "bad_multipart", 'a multipart part has no Content-Disposition "name"')
        self._is_file = b"filename" in options
        key = _decode_name(options[b"name"])
        if self._is_file:
            if len(self.files) >= self.settings.max_files:
                raise ApiError(413, "too_many_files", f"more than {self.settings.max_files} files in one request; "
                               "send fewer per request")
            self._name = _decode_name(options[b"filename"]) or key
        else:
            self._fields += 1
            if self._fields > self.settings.max_files + 8:
                raise ApiError(400, "bad_multipart", f"more than {self.settings.max_files + 8} form fields")
            self._name = key

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        limit = self.settings.max_file_bytes if self._is_file else self.MAX_FIELD
        if len(self._data) + end - start > limit:
            if self._is_file:
                raise ApiError(413, "file_too_large", f"'{self._name}' is over {limit:,} bytes, the limit per photo "
                               "(--max-file-mb); refused without reading the rest", filename=self._name)
            raise ApiError(400, "bad_multipart", f"form field '{self._name}' is over {limit:,} bytes")
        self._data += data[start:end]

    def _part_end(self) -> None:
        if self._is_file:
            self.files.append((self._name, bytes(self._data)))
        self._data = bytearray()


def _decode_name(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


BODY_DONE = "carclf.body_done"  # scope key: the request's body has been read to its end


async def read_uploads(request, settings: ServeSettings, budget: UploadBudget, held: list[int]) -> list[tuple[str,
                                                                                                          bytes]]:
    """The files of a multipart request, read from the ASGI ``receive`` within ``settings.body_timeout_s`` (408
    beyond), each body chunk taken from ``budget`` (``held[0]`` counts what this request took, for the caller to
    give back); :class:`ClientGone` when the client disconnects first."""
    uploads = MultipartUploads(request.headers.get("content-type", ""), settings)
    length = request.headers.get("content-length", "")
    if length.isdigit():
        budget.check(int(length))
    receive = request.receive
    try:
        async with asyncio.timeout(settings.body_timeout_s):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientGone
                chunk = message.get("body", b"")
                if chunk:
                    budget.take(len(chunk))
                    held[0] += len(chunk)
                    uploads.write(chunk)
                if not message.get("more_body", False):
                    break
    except TimeoutError:
        raise ApiError(408, "body_timeout", f"the request body did not arrive within {settings.body_timeout_s:g} s "
                       "(--body-timeout)") from None
    request.scope[BODY_DONE] = True
    return uploads.finish()


class RequestMetrics:
    """ASGI middleware counting requests by route and status and timing them. Plain ASGI rather than Starlette's
    ``@app.middleware("http")``, which runs every request through an extra task group and memory streams.
    Outermost, so it also counts what :class:`BodyLimit` refuses, by the route the path would have reached
    ("other" for unknown paths)."""

    def __init__(self, app, metrics: Metrics, routes=()) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    def route_of(self, scope) -> str:
        route = scope.get("route")  # the router sets the matched route in the scope
        if route is None:
            from starlette.routing import Match

            route = next((r for r in self.routes if r.matches(scope)[0] is not Match.NONE), None)
        return getattr(route, "path", "other")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status, started = 500, False  # 500: what an exception escaping the app becomes

        async def send_status(message):
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except asyncio.CancelledError:
            # uvicorn's --shutdown-timeout passed with this request in flight (uvicorn cancels only then): answer 503
            # if nothing was sent yet and end the task quietly, instead of a traceback per request in the log
            if not started:
                status = 503
                with suppress(Exception):
                    await _send_json(send, 503, {"error": "shutting_down", "detail": "the service is shutting down "
                                                 "and this request did not finish in time; retry"}, close=True)
        finally:
            path = self.route_of(scope)
            self.metrics.requests.labels(route=path, status=str(status)).inc()
            self.metrics.latency.labels(route=path).observe(time.perf_counter() - t0)


async def _send_json(send, status: int, body: dict, close: bool = False) -> None:
    import json

    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if close:  # the body was not read: end the connection rather than leave its bytes on it
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


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


# ---------------------------------------------------------------------------------------------------- the app
def predictor_version(predictor) -> str:
    """The served model's version: the export's (a hash of export.yaml), or for a run a hash of every fold's
    weights, temperature, input size and views."""
    version = getattr(predictor, "version", None)
    if version:
        return str(version)
    h = hashlib.sha256()
    run = getattr(predictor, "run", None)
    for k, t, s in zip(predictor.folds, predictor.temperatures, predictor.eval_sizes, strict=True):
        if run is not None:
            from carclf.io import file_sha256

            h.update(file_sha256(run.fold(k).best).encode())
        h.update(f"{k}:{t!r}:{s}".encode())
    h.update(",".join(predictor.views).encode())
    h.update("\n".join(predictor.output_classes).encode())
    return h.hexdigest()[:12]


def _warmup_photo(size: int = 64) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (128, 128, 128)).save(buf, format="PNG")
    return buf.getvalue()


def create_app(predictor, settings: ServeSettings | None = None):
    """The FastAPI app serving ``predictor`` (a torch or ONNX :class:`~carclf.infer.predictor.Predictor`)."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect

    settings = settings or ServeSettings()
    settings.check()
    version = predictor_version(predictor)
    engine = getattr(predictor.engines[0], "engine", "torch")
    precision = getattr(predictor, "precision", "fp32")
    metrics = Metrics(version, engine)
    classes = list(predictor.output_classes)
    state: dict[str, Any] = {"ready": False, "batcher": None}
    budget = UploadBudget(settings.max_upload_bytes, metrics.upload_bytes)

    def infer(images: list[bytes]):
        return predictor.predict_images(images, fill_bad=False)

    @asynccontextmanager
    async def lifespan(app):
        batcher = MicroBatcher(infer, settings, metrics)
        state["batcher"] = batcher
        await batcher.run_alone([_warmup_photo()])  # first call allocates the engines' buffers
        batcher.start()
        state["ready"] = True
        try:
            yield
        finally:
            state["ready"] = False
            await batcher.stop()

    # With an API key the interactive docs and the schema are closed too (not merely keyed: a browser opening /docs
    # cannot send X-API-Key); the README documents the API.
    open_docs = settings.api_key is None
    app = FastAPI(title="carclf", version=version, lifespan=lifespan, docs_url="/docs" if open_docs else None,
                  openapi_url="/openapi.json" if open_docs else None, redoc_url=None)
    app.state.metrics, app.state.settings, app.state.predictor = metrics, settings, predictor
    app.state.upload_budget = budget

    def body_unread(request: Request) -> bool:
        if request.scope.get(BODY_DONE):
            return False
        h = request.headers
        return "chunked" in h.get("transfer-encoding", "").lower() or h.get("content-length", "0") not in ("", "0")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        metrics.errors.labels(code=exc.code).inc()
        headers = {"Retry-After": "1"} if exc.status == 503 else {}
        if body_unread(request):  # refused mid-body: end the connection instead of reading the rest
            headers["Connection"] = "close"
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(ClientGone)
    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, exc: Exception):  # nobody to answer: counted, not logged as a fault
        metrics.errors.labels(code="client_closed").inc()
        return Response(status_code=499)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        metrics.errors.labels(code=code).inc()
        return JSONResponse({"error": code, "detail": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):  # a bug or a failed engine: JSON, logged
        metrics.errors.labels(code="internal").inc()
        return JSONResponse({"error": "internal", "detail": f"{type(exc).__name__}: {exc}"}, status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        metrics.errors.labels(code="invalid_parameter").inc()
        where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": "invalid_parameter", "detail": where}, status_code=422)

    def require_key(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("x-api-key", "")
        if not secrets.compare_digest(given.encode(), settings.api_key.encode()):
            raise ApiError(401, "unauthorized", "missing or wrong X-API-Key header")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(resources.files("carclf.serve").joinpath("static/index.html").read_text("utf-8"))

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        batcher = state["batcher"]
        if state["ready"] and batcher is not None and batcher.alive:
            return {"status": "ready", "version": version}
        return JSONResponse({"status": "not ready", "version": version}, status_code=503)

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/classes", dependencies=[Depends(require_key)])
    async def v1_classes():
        return {"classes": classes, "n": len(classes), "version": version}

    @app.get("/v1/model", dependencies=[Depends(require_key)])
    async def v1_model():
        return {"version": version, "engine": engine, "precision": precision, "engines": len(predictor.engines),
                "views": list(predictor.views), "classes": len(classes), "auth": settings.api_key is not None,
                "limits": {k: v for k, v in asdict(settings).items() if k != "api_key"}}

    @app.post("/v1/predict", dependencies=[Depends(require_key)])
    async def v1_predict(request: Request, top_k: int | None = None):
        # The default is capped at the class count (a 3-class model answers its 3); an explicit k over it is an error.
        k = min(settings.top_k, len(classes)) if top_k is None else top_k
        if not 1 <= k <= len(classes):
            raise ApiError(422, "invalid_parameter", f"top_k must be in 1..{len(classes)}, got {k}")
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise ApiError(415, "not_multipart", "send the photos as multipart/form-data (e.g. curl -F "
                           "file=@car.jpg), one file per field")
        t0 = time.perf_counter()
        held = [0]  # body bytes this request took from the upload budget
        try:
            return await answer(request, k, t0, held)
        finally:
            budget.give(held[0])

    async def answer(request: Request, k: int, t0: float, held: list[int]):
        uploads = await read_uploads(request, settings, budget, held)
        if not uploads:
            raise ApiError(400, "no_files", "the request holds no file: send one or more photos as multipart file "
                           "fields")
        names = [name for name, _ in uploads]
        datas = [data for _, data in uploads]
        del uploads

        def check_all() -> None:
            for name, data in zip(names, datas, strict=True):
                check_photo(data, name, settings)

        await run_in_threadpool(check_all)
        probs, bad = await state["batcher"].submit(datas)
        if bad:
            reasons = await run_in_threadpool(
                lambda: [{"filename": names[i], "detail": decode_error(datas[i], settings.max_pixels)} for i in bad])
            raise ApiError(422, "undecodable_image", f"{len(bad)} of {len(datas)} photo(s) could not be decoded "
                           "(truncated or corrupt)", files=reasons)
        order = np.argsort(-probs, axis=1)[:, :k]
        predictions = [
            {"filename": name, "top": [{"class": classes[j], "probability": float(p[j])} for j in idx]}
            for name, p, idx in zip(names, probs, order, strict=True)
        ]
        return {"model": {"version": version, "engine": engine, "precision": precision},
                "predictions": predictions, "elapsed_ms": round((time.perf_counter() - t0) * 1000, 1)}

    # BodyLimit refuses an oversized request before anything reads it; RequestMetrics, outermost, counts that too.
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes,
                       on_refuse=lambda: metrics.errors.labels(code="request_too_large").inc())
    app.add_middleware(RequestMetrics, metrics=metrics, routes=app.router.routes)
    return app
