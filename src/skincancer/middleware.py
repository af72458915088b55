"""The service's ASGI middleware: the upload size limit, the access log and the Prometheus metrics."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, Info
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MB = 1024 * 1024
MULTIPART_SLACK = 64 * 1024  # form boundaries and part headers around the file itself

log = logging.getLogger("skincancer")


class UploadTooLarge(HTTPException):
    def __init__(self, limit: int, files: int = 1):
        per_file = f" per file, {files} files per request" if files > 1 else ""
        super().__init__(413, f"upload larger than the limit of {limit / MB:g} MB{per_file}")


class UploadLimit:
    """ASGI middleware: refuse a body over the limit (`file_limit` per file, `files[path]` files for the paths that
    take several), by its Content-Length header before reading anything, and by counting the bytes as they arrive
    (chunked uploads, lying headers) without ever holding more."""

    def __init__(self, app: ASGIApp, file_limit: int, files: dict[str, int] | None = None):
        self.app, self.file_limit, self.files = app, file_limit, files or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        files = self.files.get(scope.get("path", ""), 1)
        limit = files * (self.file_limit + MULTIPART_SLACK)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            response = JSONResponse({"detail": UploadTooLarge(self.file_limit, files).detail}, status_code=413,
                                    headers={"Connection": "close"})
            return await response(scope, receive, send)
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise UploadTooLarge(self.file_limit, files)  # FastAPI turns it into a JSON 413
            return message

        await self.app(scope, counted_receive, send)


LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
QUIET_PATHS = ("/api/health", "/metrics")  # polled by load balancers and scrapers: logged at DEBUG


class Metrics:
    """The service's Prometheus metrics (GET /metrics): requests by route and status, their latency, the photos
    answered and the model served, in a registry of the app's own so that two apps in one process count apart.
    Routes outside the app's own are counted as "other", so that scanning for random paths cannot grow the list
    without bound."""

    def __init__(self, routes: Sequence[str], card: dict):
        self.routes = set(routes)
        self.registry = CollectorRegistry()
        # prometheus_client adds the _total of a counter's name itself
        self.requests = Counter("skincancer_requests", "HTTP requests answered, by route and status.",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("skincancer_request_seconds", "Time from a request's start to its answer's end.",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.images = Counter("skincancer_images", "Photos sent for prediction: answered, or failed (unreadable, "
                              "too large, bad age/sex).", ["outcome"], registry=self.registry)
        for outcome in ("answered", "failed"):  # both shown from the start, at 0
            self.images.labels(outcome=outcome)
        Info("skincancer_model", "The model served (value 1).", registry=self.registry).info(
            {key: str(card[key]) for key in ("name", "engine", "version")})

    def route(self, path: str) -> str:
        return path if path in self.routes else "other"

    def observe(self, path: str, status: int, seconds: float) -> None:
        route = self.route(path)
        self.requests.labels(route=route, status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)

    def count_images(self, answered: int, failed: int) -> None:
        self.images.labels(outcome="answered").inc(answered)
        self.images.labels(outcome="failed").inc(failed)


class AccessLog:
    """ASGI middleware: one log line per request, `client "METHOD /path" status milliseconds`, on the skincancer
    logger (INFO; health checks and metrics scrapes at DEBUG, since they are polled), and into `metrics`. Paths only:
    no query strings, no uploads."""

    def __init__(self, app: ASGIApp, metrics: Metrics | None = None):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500  # 500 unless a response starts

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            client = scope.get("client")
            path, seconds = scope.get("path", ""), time.perf_counter() - started
            log.log(logging.DEBUG if path in QUIET_PATHS else logging.INFO, '%s "%s %s" %d %.0f ms',
                    client[0] if client else "-", scope.get("method", ""), path, status, seconds * 1000)
            if self.metrics is not None:
                self.metrics.observe(path, status, seconds)
