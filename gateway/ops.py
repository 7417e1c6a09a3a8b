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
from gateway.config import IdentityConfig, OpsConfig
from gateway.context import context_of
from gateway.errors import StoreError
from gateway.identity import IdentityResolver, TrustedProxies
from gateway.metrics import CONTENT_TYPE, Metrics
from gateway.problem import STORE_UNAVAILABLE, problem_type, send_problem
from gateway.store import Store

__all__ = ["OPS_PREFIX", "OpsRoutes", "UpstreamTimer", "is_ops_path"]

OPS_PREFIX = "/_gateway"
_JSON = (b"content-type", b"application/json")
_NO_STORE = (b"cache-control", b"no-store")
_HEALTHY = b'{"status":"ok"}'
_READY = b'{"status":"ready","breaker":"%s"}'


def _covers_everything(cidrs: tuple[str, ...]) -> bool:
    return {"0.0.0.0/0", "::/0"} <= set(cidrs)


def is_ops_path(path: str) -> bool:
    """``/_gateway`` and ``/_gateway/...``: answered by the gateway, never passed on."""
    return path.startswith(OPS_PREFIX) and (len(path) == len(OPS_PREFIX) or path[len(OPS_PREFIX)] == "/")


class OpsRoutes:
    """The ``/_gateway/*`` answers (``[ops]``), given by the stack's entry layer.

    ``claims(path)`` says whether a path is the gateway's (under ``ops.prefix``, unless
    ``ops.enabled = false``: then every path is the app's). A client outside ``ops.allow`` (or,
    for metrics, outside ``ops.metrics_allow``: loopback by default) gets the same 404 as a name
    that does not exist, so the routes are not even confirmed. The client is its address as
    ``identity.trusted_proxies`` tells it (``X-Forwarded-For`` only from them)."""

    def __init__(self, *, store: Store, metrics: Metrics, config: OpsConfig | None = None,
                 trusted_proxies: tuple[str, ...] = ()) -> None:
        config = config or OpsConfig()
        self._store = store
        self._metrics = metrics
        self.prefix = config.prefix
        self._enabled = config.enabled
        self._everyone = _covers_everything(config.allow)
        self._allow = TrustedProxies(config.allow)
        self._metrics_allow = TrustedProxies(config.metrics_allow)
        self._addresses = IdentityResolver(IdentityConfig(sources=("ip",), trusted_proxies=trusted_proxies),
                                           ("ip",))

    def claims(self, path: str) -> bool:
        """Whether ``path`` (normal form) is under the ops prefix: answered here, never passed on."""
        prefix = self.prefix
        if not self._enabled or not path.startswith(prefix):
            return False
        return len(path) == len(prefix) or path[len(prefix)] == "/"

    def _client(self, scope: Scope) -> str | None:
        return self._addresses.client_ip(scope, self._addresses.header_values(scope))

    async def answer(self, scope: Scope, send: Send) -> None:
        """Answer one ``/_gateway/*`` request (404 for a name it does not have, or a client it
        does not serve that name to)."""
        name = scope["path"][len(self.prefix):]
        known = name in ("/healthz", "/readyz", "/metrics")
        if known and not self._everyone:
            known = self._client(scope) in self._allow
        if known and name == "/metrics":
            known = self._client(scope) in self._metrics_allow
        if not known:
            await send_problem(send, status=404, type_=problem_type("not-found"), title="Not Found",
                               detail=f"{self.prefix}/ has healthz, readyz and metrics.")
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
