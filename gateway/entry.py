"""The stack's outermost HTTP layer: the request id, the request's context, and one ``send`` wrapper.

``StackEntry`` does, once per request and in one frame, what used to take three layers: it makes
the ``RequestContext`` the layers inside add to, runs the request check inline
(``request_check.RequestCheck``: one pass over the headers, which also finds the request id;
ambiguous requests refused, the path made normal) and answers ``/_gateway/*`` itself
(``ops.OpsRoutes``, uncounted). It wraps ``send`` once: at ``http.response.start`` that wrapper sets
``X-Request-Id``, adds the fields the layers asked for (``RateLimit``, ``RateLimit-Policy``), and
counts the response by status with the upstream's latency and the gateway's own.
"""

from __future__ import annotations

import time
from email.utils import formatdate

from gateway._asgi import ASGIApp, Message, Receive, Scope, Send
from gateway.context import CONTEXT_SCOPE_KEY, RequestContext
from gateway.metrics import Metrics
from gateway.ops import OpsRoutes
from gateway.request_check import RequestCheck
from gateway.requestid import bind_request_id, unbind_request_id, with_request_id

__all__ = ["StackEntry", "http_date"]

_DATE = b"date"
_dates: dict[int, bytes] = {}


def http_date() -> bytes:
    """Now as an IMF-fixdate (RFC 9110 §5.6.7), formatted once a second."""
    second = int(time.time())
    value = _dates.get(second)
    if value is None:
        _dates.clear()  # bounded: one entry
        value = _dates[second] = formatdate(second, usegmt=True).encode("ascii")
    return value


class StackEntry:
    """Pure ASGI: one context and one response decoration per HTTP request.

    ``GatewayMiddleware`` is one (a subclass that opens the store with the lifespan), so the
    stack's first frame is this one. Non-HTTP scopes go to ``not_http``, which passes them on."""

    def __init__(
        self, inner: ASGIApp, *, metrics: Metrics, check: RequestCheck, ops: OpsRoutes,
        date_header: bool = False,
    ) -> None:
        self._inner = inner
        self._date_header = date_header
        self._metrics = metrics
        self._check = check
        self._ops = ops

    async def not_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A scope that is not HTTP (lifespan, websocket): passed on untouched."""
        await self._inner(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.not_http(scope, receive, send)
            return
        ctx = RequestContext()
        check = self._check
        refusal = check.examine(scope, ctx)  # the one pass over the headers
        rid, headers = check.request_id(scope, ctx.headers)
        # the one copy of the scope: a stack nested in this one's app makes its own context, and
        # must not replace ours; the request check makes its path normal in it
        scope = {**scope, CONTEXT_SCOPE_KEY: ctx}
        if headers is not None:
            scope["headers"] = headers
        started = False

        async def send_decorated(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = with_request_id(message.get("headers", ()), rid)
                if ctx.response_headers:
                    headers += ctx.response_headers
                if self._date_header and not any(name.lower() == _DATE for name, _ in headers):
                    headers.append((_DATE, http_date()))
                message["headers"] = headers
                if ctx.counted:
                    self._count(ctx, message["status"])
            await send(message)

        token = bind_request_id(rid, scope)
        try:
            problem = check.admit(scope, refusal)
            if problem is not None:
                await check.refuse(send_decorated, problem)
                return
            if self._ops.claims(scope["path"]):
                ctx.counted = False
                await self._ops.answer(scope, send_decorated)
                return
            await self._inner(scope, receive, send_decorated)
        except Exception:
            if not started and ctx.counted:  # the server answers 500 for an app that raised first
                self._count(ctx, 500)
            raise
        finally:
            unbind_request_id(token)

    def _count(self, ctx: RequestContext, status: int) -> None:
        """At response start: the status, the upstream's latency (from the hand-off) and ours."""
        now = time.perf_counter()
        metrics = self._metrics
        if ctx.app_start:
            metrics.upstream_latency.observe(now - ctx.app_start)
            metrics.added_latency.observe(ctx.app_start - ctx.start)
        else:
            metrics.added_latency.observe(now - ctx.start)
        metrics.count_response(status)
