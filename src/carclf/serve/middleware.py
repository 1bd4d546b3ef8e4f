"""What wraps every request: Prometheus metrics in a registry of the app's own, and the two ASGI middlewares
(:class:`RequestMetrics` outermost, then :class:`BodyLimit`) with the one JSON writer they answer with."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import suppress

from carclf.serve.settings import ApiError


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
            return await send_json(send, 413, ApiError(
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
                    await send_json(send, 503, {"error": "shutting_down", "detail": "the service is shutting down "
                                                 "and this request did not finish in time; retry"}, close=True)
        finally:
            path = self.route_of(scope)
            self.metrics.requests.labels(route=path, status=str(status)).inc()
            self.metrics.latency.labels(route=path).observe(time.perf_counter() - t0)


async def send_json(send, status: int, body: dict, close: bool = False) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if close:  # the body was not read: end the connection rather than leave its bytes on it
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
