"""``/_gateway/*`` (health, readiness, metrics) and the hand-off time the latencies start from.

The stack's entry layer (``entry.py``, DESIGN.md "One request, in order", step 3) answers
``/_gateway/*`` with ``OpsRoutes``: never rate-limited, never forwarded, not counted. Every
other HTTP request is counted and timed by the entry's send wrapper. ``UpstreamTimer`` wraps
the innermost app (the wrapped ASGI app, or the proxy) and notes in the request's context when
the request reached it: the upstream latency runs from there to the response start, and the
gateway's own share is the time before it (all of it when the gateway answers itself: a 429, a
replay).

* ``GET /_gateway/healthz``: 200 while the process runs (liveness).
* ``GET /_gateway/readyz``: 200 when the store answers a PING within its timeout, else 503;
  both say the circuit breaker's state. While the breaker is open the 503 comes at once, with no
  store call; once its cool-down is over, this PING may itself be the probe that closes it.
* ``GET /_gateway/metrics``: Prometheus text (every worker's, under ``--workers`` > 1).
"""

from __future__ import annotations

import asyncio
import time

from gateway._asgi import ASGIApp, Receive, Scope, Send
from gateway.context import context_of
from gateway.errors import StoreError
from gateway.metrics import CONTENT_TYPE, Metrics
from gateway.problem import STORE_UNAVAILABLE, problem_type, send_problem
from gateway.store import Store

__all__ = ["OPS_PREFIX", "OpsRoutes", "UpstreamTimer", "is_ops_path"]

OPS_PREFIX = "/_gateway"
_JSON = (b"content-type", b"application/json")
_NO_STORE = (b"cache-control", b"no-store")
_HEALTHY = b'{"status":"ok"}'
_READY = b'{"status":"ready","breaker":"%s"}'


def is_ops_path(path: str) -> bool:
    """``/_gateway`` and ``/_gateway/...``: answered by the gateway, never passed on."""
    return path.startswith(OPS_PREFIX) and (len(path) == len(OPS_PREFIX) or path[len(OPS_PREFIX)] == "/")


class OpsRoutes:
    """The ``/_gateway/*`` answers, given by the stack's entry layer."""

    def __init__(self, *, store: Store, metrics: Metrics) -> None:
        self._store = store
        self._metrics = metrics

    async def answer(self, scope: Scope, send: Send) -> None:
        """Answer one ``/_gateway/*`` request (404 for a name it does not have)."""
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
            # multiprocess mode reads every worker's files: off the event loop, once this
            # process's pending counts are in (folded here, on the loop: tallies.py)
            self._metrics.fold()
            text = await asyncio.to_thread(self._metrics.exposition)
            await _respond(scope, send, 200, (b"content-type", CONTENT_TYPE.encode()), text)


async def _respond(
    scope: Scope, send: Send, status: int, content_type: tuple[bytes, bytes], body: bytes
) -> None:
    headers = [content_type, _NO_STORE, (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})


class UpstreamTimer:
    """Wraps the innermost app: notes in the request's context when a request is handed to it
    (the entry's send wrapper takes the upstream latency from there to the response start).

    It is also the backstop of a deferred rate-limit take: a request never reaches the app
    with its take still unmade (the Idempotency-Key layer makes it on every path it knows)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = context_of(scope) if scope["type"] == "http" else None
        if ctx is not None:
            deferred = ctx.take_deferred()
            if deferred is not None and not await deferred.alone(send):
                return
            ctx.app_start = time.perf_counter()
        await self.app(scope, receive, send)
