"""``/_gateway/*`` (health, readiness, metrics) and the per-request counts and timings.

``OpsMiddleware`` sits right inside the request id layer (DESIGN.md "One request, in order",
step 3): ``/_gateway/*`` is answered here, never rate-limited and never forwarded; every other
HTTP request is counted by status and timed. ``UpstreamTimer`` wraps the innermost app (the
wrapped ASGI app, or the proxy) and records how long it took to start its response, so the
gateway's own share of the latency is the time to response start minus that.

* ``GET /_gateway/healthz``: 200 while the process runs (liveness).
* ``GET /_gateway/readyz``: 200 when the store answers a PING within its timeout, else 503.
* ``GET /_gateway/metrics``: Prometheus text (every worker's, under ``--workers`` > 1).
"""

from __future__ import annotations

import asyncio
import time

from gateway._asgi import ASGIApp, Message, Receive, Scope, Send
from gateway.errors import StoreError
from gateway.metrics import CONTENT_TYPE, Metrics
from gateway.problem import STORE_UNAVAILABLE, problem_type, send_problem
from gateway.store import Store

__all__ = ["OPS_PREFIX", "TIMING_SCOPE_KEY", "OpsMiddleware", "Timing", "UpstreamTimer"]

OPS_PREFIX = "/_gateway"
#: Where a request's scope carries its ``Timing``.
TIMING_SCOPE_KEY = "gateway.timing"
_JSON = (b"content-type", b"application/json")
_NO_STORE = (b"cache-control", b"no-store")
_HEALTHY = b'{"status":"ok"}'
_READY = b'{"status":"ready"}'


class Timing:
    """What the layers of one request learn about its latency."""

    __slots__ = ("upstream_s",)

    def __init__(self) -> None:
        self.upstream_s = 0.0  # stays 0 when the gateway answered itself


class OpsMiddleware:
    """Answers ``/_gateway/*``; counts and times every other HTTP request."""

    def __init__(self, app: ASGIApp, *, store: Store, metrics: Metrics) -> None:
        self.app = app
        self._store = store
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path.startswith(OPS_PREFIX) and (len(path) == len(OPS_PREFIX) or path[len(OPS_PREFIX)] == "/"):
            await self._answer(scope, send)
            return
        metrics = self._metrics
        timing = scope[TIMING_SCOPE_KEY] = Timing()
        start = time.perf_counter()
        started = False

        async def send_counted(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                metrics.added_latency.observe(time.perf_counter() - start - timing.upstream_s)
                metrics.count_response(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        except Exception:
            if not started:  # the server answers 500 for an app that raised before responding
                metrics.added_latency.observe(time.perf_counter() - start - timing.upstream_s)
                metrics.count_response(500)
            raise

    async def _answer(self, scope: Scope, send: Send) -> None:
        name = scope["path"][len(OPS_PREFIX):]
        if name not in ("/healthz", "/readyz", "/metrics"):
            await send_problem(send, status=404, type_=problem_type("not-found"), title="Not Found",
                               detail=f"{OPS_PREFIX}/ has healthz, readyz and metrics.")
            return
        if scope["method"] not in ("GET", "HEAD"):
            await send_problem(send, status=405, type_=problem_type("method-not-allowed"),
                               title="Method Not Allowed", detail=f"{scope['path']} answers GET and HEAD.",
                               headers=[(b"allow", b"GET, HEAD")])
            return
        if name == "/healthz":
            await _respond(scope, send, 200, _JSON, _HEALTHY)
        elif name == "/readyz":
            try:
                await self._store.ping()
            except StoreError as exc:
                await send_problem(send, status=503, type_=STORE_UNAVAILABLE, title="Store unavailable",
                                   detail=f"The store did not answer: {exc}",
                                   headers=[(b"retry-after", b"1")])
                return
            await _respond(scope, send, 200, _JSON, _READY)
        else:
            # multiprocess mode reads every worker's files: off the event loop
            text = await asyncio.to_thread(self._metrics.exposition)
            await _respond(scope, send, 200, (b"content-type", CONTENT_TYPE.encode()), text)


async def _respond(
    scope: Scope, send: Send, status: int, content_type: tuple[bytes, bytes], body: bytes
) -> None:
    headers = [content_type, _NO_STORE, (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})


class UpstreamTimer:
    """Wraps the innermost app: records how long it took to start its response."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self._histogram = metrics.upstream_latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        timing = scope.get(TIMING_SCOPE_KEY) if scope["type"] == "http" else None
        if timing is None:
            await self.app(scope, receive, send)
            return
        histogram = self._histogram
        start = time.perf_counter()

        async def send_timed(message: Message) -> None:
            if message["type"] == "http.response.start":
                elapsed = time.perf_counter() - start
                timing.upstream_s = elapsed
                histogram.observe(elapsed)
            await send(message)

        await self.app(scope, receive, send_timed)
