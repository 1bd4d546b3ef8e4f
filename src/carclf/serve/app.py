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

The pieces: :mod:`carclf.serve.api` (decode request -> predict -> encode response, plain functions),
:mod:`carclf.serve.uploads` (the streamed body), :mod:`carclf.serve.batching`, :mod:`carclf.serve.middleware`
(metrics, body limit), :mod:`carclf.serve.settings`; this module only wires them into FastAPI.
"""

import io
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import asdict
from importlib import resources

from carclf.serve.api import ServedModel, decode_request, encode_response, predict, resolve_top_k, run_predictor
from carclf.serve.batching import MicroBatcher
from carclf.serve.middleware import BodyLimit, Metrics, RequestMetrics
from carclf.serve.settings import ApiError, ClientGone, MiB, ServeSettings
from carclf.serve.uploads import BODY_DONE, UploadBudget

__all__ = ["MiB", "ServeSettings", "create_app"]  # carclf serve's options are built from these


def _warmup_photo(size: int = 64) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (128, 128, 128)).save(buf, format="PNG")
    return buf.getvalue()


def create_app(predictor, settings: ServeSettings | None = None):
    """The FastAPI app serving ``predictor`` (a torch or ONNX :class:`~carclf.infer.predictor.Predictor`)."""
    from fastapi import FastAPI

    settings = settings or ServeSettings()
    settings.check()
    model = ServedModel.of(predictor)
    metrics = Metrics(model.version, model.engine)

    @asynccontextmanager
    async def lifespan(app):
        batcher = MicroBatcher(lambda images: run_predictor(predictor, images), settings, metrics)
        app.state.batcher = batcher
        await batcher.run_alone([_warmup_photo()])  # first call allocates the engines' buffers
        batcher.start()
        app.state.ready = True
        try:
            yield
        finally:
            app.state.ready = False
            await batcher.stop()

    # With an API key the interactive docs and the schema are closed too (not merely keyed: a browser opening /docs
    # cannot send X-API-Key); the README documents the API.
    open_docs = settings.api_key is None
    app = FastAPI(title="carclf", version=model.version, lifespan=lifespan, docs_url="/docs" if open_docs else None,
                  openapi_url="/openapi.json" if open_docs else None, redoc_url=None)
    app.state.metrics, app.state.settings, app.state.predictor = metrics, settings, predictor
    app.state.upload_budget = UploadBudget(settings.max_upload_bytes, metrics.upload_bytes)
    app.state.ready, app.state.batcher = False, None
    _add_error_handlers(app, metrics)
    _add_routes(app, model, settings)
    # BodyLimit refuses an oversized request before anything reads it; RequestMetrics, outermost, counts that too.
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes,
                       on_refuse=lambda: metrics.errors.labels(code="request_too_large").inc())
    app.add_middleware(RequestMetrics, metrics=metrics, routes=app.router.routes)
    return app


def _body_unread(request) -> bool:
    if request.scope.get(BODY_DONE):
        return False
    h = request.headers
    return "chunked" in h.get("transfer-encoding", "").lower() or h.get("content-length", "0") not in ("", "0")


def _add_error_handlers(app, metrics: Metrics) -> None:
    """Every refusal and failure as JSON ``{"error": code, "detail": ...}``, counted by code."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        metrics.errors.labels(code=exc.code).inc()
        headers = {"Retry-After": "1"} if exc.status == 503 else {}
        if _body_unread(request):  # refused mid-body: end the connection instead of reading the rest
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


def _add_routes(app, model: ServedModel, settings: ServeSettings) -> None:
    """The probes, the page, /metrics, and /v1/* behind the API key when one is set."""
    from fastapi import Depends, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    state, predictor = app.state, app.state.predictor

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
        if state.ready and state.batcher is not None and state.batcher.alive:
            return {"status": "ready", "version": model.version}
        return JSONResponse({"status": "not ready", "version": model.version}, status_code=503)

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/classes", dependencies=[Depends(require_key)])
    async def v1_classes():
        return {"classes": list(model.classes), "n": len(model.classes), "version": model.version}

    @app.get("/v1/model", dependencies=[Depends(require_key)])
    async def v1_model():
        return {**model.card(), "engines": len(predictor.engines), "views": list(predictor.views),
                "classes": len(model.classes), "auth": settings.api_key is not None,
                "limits": {k: v for k, v in asdict(settings).items() if k != "api_key"}}

    @app.post("/v1/predict", dependencies=[Depends(require_key)])
    async def v1_predict(request: Request, top_k: int | None = None):
        k = resolve_top_k(top_k, settings.top_k, len(model.classes))
        t0 = time.perf_counter()
        with state.upload_budget.lease() as lease:
            photos = await decode_request(request, settings, lease)
            probs = await predict(photos, state.batcher.submit, settings.max_pixels)
            return encode_response(photos, probs, k, model, t0)
