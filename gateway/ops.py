"""``/_gateway/*`` (health, readiness, metrics) and the per-request counts and timings.

``OpsMiddleware`` sits inside the stack's entry and request check (DESIGN.md "One request, in
order", step 3): ``/_gateway/*`` is answered here, never rate-limited and never forwarded;
every other HTTP request is counted by status and timed, in ``GatewayMiddleware`` by the entry
layer's one send wrapper (``entry.py``), here only when used without it. ``UpstreamTimer`` wraps
the innermost app (the wrapped ASGI app, or the proxy) and notes when the request reached it:
the upstream latency runs from there to the response start, and the gateway's own share is the
time before it (all of it when the gateway answers itself: a 429, a replay).

* ``GET /_gateway/healthz``: 200 while the process runs (liveness).
* ``GET /_gateway/readyz``: 200 when the store answers a PING within its timeout, else 503;
  both say the circuit breaker's state. While the breaker is open the 503 comes at once, with no
  store call; once its cool-down is over, this PING may itself be the probe that closes it.
* ``GET /_gateway/metrics``: Prometheus text (every worker's, under ``--workers`` > 1).
"""

from __future__ import annotations

import asyncio
import time

from gateway._asgi import ASGIApp, Message, Receive, Scope, Send
from gateway.context import CONTEXT_SCOPE_KEY, context_of
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
_READY = b'{"status":"ready","breaker":"%s"}'


class Timing:
    """When one request was handed to the app (or the upstream), if it was."""

    __slots__ = ("app_start",)

    def __init__(self) -> None:
        self.app_start = 0.0  # stays 0 when the gateway answered itself


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
        ctx = context_of(scope)
        if path.startswith(OPS_PREFIX) and (len(path) == len(OPS_PREFIX) or path[len(OPS_PREFIX)] == "/"):
            if ctx is not None:
                ctx.counted = False
            await self._answer(scope, send)
            return
        if ctx is not None:  # the stack's entry layer counts and times it, in its one send wrapper
            await self.app(scope, receive, send)
            return
        timing = scope[TIMING_SCOPE_KEY] = Timing()
        start = time.perf_counter()
        started = False

        async def send_counted(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self._count(start, timing, message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        except Exception:
            if not started:  # the server answers 500 for an app that raised before responding
                self._count(start, timing, 500)
            raise

    def _count(self, start: float, timing: Timing, status: int) -> None:
        """At response start: the status, the upstream's latency (from the hand-off) and ours."""
        now = time.perf_counter()
        metrics = self._metrics
        if timing.app_start:
            upstream = now - timing.app_start
            metrics.upstream_latency.observe(upstream)
            metrics.added_latency.observe(timing.app_start - start)
        else:
            metrics.added_latency.observe(now - start)
        metrics.count_response(status)

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
                                   headers=[(b"retry-after", b"1")],
                                   extensions={"breaker": self._store.breaker_state()})
                return
            await _respond(scope, send, 200, _JSON, _READY % self._store.breaker_state().encode())
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
    """Wraps the innermost app: notes when a request is handed to it (``OpsMiddleware`` takes
    the upstream latency from there to the response start, in its own send wrapper)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            timing = scope.get(CONTEXT_SCOPE_KEY) or scope.get(TIMING_SCOPE_KEY)
            if timing is not None:
                timing.app_start = time.perf_counter()
        await self.app(scope, receive, send)
