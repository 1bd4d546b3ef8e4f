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
photo has (aspect-ratio bombs, 422 ``bad_shape``), a truncated photo. Uploads are read into memory only up to the
limits, and nothing of a request is kept.
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
                "(fewer or smaller photos per request)").body())
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
        status = 500  # what an exception escaping the app becomes

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = self.route_of(scope)
            self.metrics.requests.labels(route=path, status=str(status)).inc()
            self.metrics.latency.labels(route=path).observe(time.perf_counter() - t0)


async def _send_json(send, status: int, body: dict) -> None:
    import json

    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
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
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException as StarletteHTTPException

    settings = settings or ServeSettings()
    settings.check()
    version = predictor_version(predictor)
    engine = getattr(predictor.engines[0], "engine", "torch")
    precision = getattr(predictor, "precision", "fp32")
    metrics = Metrics(version, engine)
    classes = list(predictor.output_classes)
    state: dict[str, Any] = {"ready": False, "batcher": None}

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

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        metrics.errors.labels(code=exc.code).inc()
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

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
        try:
            form_cm = request.form(max_files=settings.max_files, max_fields=settings.max_files + 8,
                                   max_part_size=64 * 1024)
            async with form_cm as form:
                uploads = [(v.filename or key, v) for key, v in form.multi_items() if isinstance(v, UploadFile)]
                if not uploads:
                    raise ApiError(400, "no_files", "the request holds no file: send one or more photos as "
                                   "multipart file fields")
                for name, up in uploads:
                    if up.size is not None and up.size > settings.max_file_bytes:
                        raise ApiError(413, "file_too_large", f"'{name}' is {up.size:,} bytes; at most "
                                       f"{settings.max_file_bytes:,} per photo", filename=name)
                names = [name for name, _ in uploads]
                datas = [await up.read() for _, up in uploads]
        except StarletteHTTPException as exc:  # the multipart parser's refusals (too many files, bad framing)
            code = "too_many_files" if "files" in str(exc.detail).lower() else "bad_multipart"
            raise ApiError(400 if code != "too_many_files" else 413, code, str(exc.detail)) from None

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
