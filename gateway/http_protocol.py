"""The HTTP/1.1 connection ``gateway serve`` runs: uvicorn's httptools protocol, made strict.

What uvicorn's ``HttpToolsProtocol`` leaves open, closed here:

* **Trailer fields never become headers.** llhttp reports a chunked body's trailer fields
  through the same ``on_header`` callback as the head; uvicorn appends them to the list the
  request's scope already holds, so when the whole message arrives in one read the app sees
  them as request headers (an ``Idempotency-Key`` or ``X-Forwarded-For`` the head never had).
  Here every field after the end of the head is dropped (RFC 9110 §6.5.1: a recipient may
  discard trailers; it must not merge them into the header section unasked).
* **A bounded time to receive a request head** (``server.header_timeout``), counted from the
  moment the connection is ready for a request (accepted, or its last response sent): a client
  that dribbles a head gets a 408 and the connection closes; one that sent nothing is closed.
  uvicorn's keep-alive timer is cancelled by any byte, so alone it bounds neither.
* **A bound on open connections per process** (``server.max_connections``): one past it is
  answered 503 and closed at once, before it can hold a slot.
* A request the parser rejects gets a problem+json 400, like every other gateway refusal.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.problem import PROBLEM_RENDERER, STRIPE_RENDERER, Renderer, problem_type
from gateway.requestid import HEADER as REQUEST_ID_HEADER
from gateway.requestid import new_request_id

__all__ = ["DEFAULT_HEADER_TIMEOUT_S", "DEFAULT_MAX_CONNECTIONS", "GatewayHttpProtocol"]

DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_MAX_CONNECTIONS = 1024

_log = logging.getLogger("gateway.http")


class _Refusal:
    """A response the connection itself sends, then closes, in the ``[errors] format`` its
    renderer writes: head and body built once, only the request id new each time (every
    gateway-made response carries one: ``X-Request-Id``, and ``Request-Id`` in Stripe's format)."""

    __slots__ = ("_body", "_head", "_ids")

    def __init__(self, renderer: Renderer, status: int, reason: bytes, name: str, detail: str, *,
                 extra: tuple[bytes, ...] = ()) -> None:
        status, headers, self._body = renderer.record(
            status=status, type_=problem_type(name), title=reason.decode(), detail=detail)
        lines = [b"HTTP/1.1 %d %s" % (status, reason)]
        lines += [name_ + b": " + value for name_, value in headers]
        lines += [b"content-length: %d" % len(self._body), b"connection: close", *extra]
        self._head = b"\r\n".join(lines) + b"\r\n"
        stripe = renderer.format == "stripe"
        self._ids = (REQUEST_ID_HEADER, b"request-id") if stripe else (REQUEST_ID_HEADER,)

    def bytes(self) -> bytes:
        rid = new_request_id()
        ids = b"".join(name + b": " + rid + b"\r\n" for name in self._ids)
        return self._head + ids + b"\r\n" + self._body


class _Refusals:
    """The three answers of the connection, in one format."""

    __slots__ = ("bad_request", "head_timeout", "too_many")

    def __init__(self, renderer: Renderer) -> None:
        self.head_timeout = _Refusal(
            renderer, 408, b"Request Timeout", "request-header-timeout",
            "the request head did not arrive within server.header_timeout")
        self.too_many = _Refusal(
            renderer, 503, b"Service Unavailable", "too-many-connections",
            "this gateway process has server.max_connections connections open", extra=(b"retry-after: 1",))
        self.bad_request = _Refusal(
            renderer, 400, b"Bad Request", "malformed-request", "the request is not valid HTTP/1.1")


# built once per format at import (immutable afterwards), picked per connection
_REFUSALS = {r.format: _Refusals(r) for r in (PROBLEM_RENDERER, STRIPE_RENDERER)}


def _address(client: tuple[str, int] | None) -> str | None:
    return f"{client[0]}:{client[1]}" if client else None


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with trailers dropped, a head timeout and a connection cap.

    ``gateway serve`` passes the ``[server]`` settings with ``functools.partial``; used
    directly (``uvicorn.run(app, http=GatewayHttpProtocol)``) it takes the defaults.
    """

    def __init__(self, *args: Any, header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS, error_format: str = "problem",
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._refusals = _REFUSALS.get(error_format, _REFUSALS["problem"])
        self._header_timeout_s = header_timeout_s
        self._max_connections = max_connections
        self._head_timer: asyncio.TimerHandle | None = None
        self._in_head = False  # a request head has begun and is not complete
        self._head_done = False  # the current message's head is complete: fields now are trailers

    # -- connection ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self._max_connections:
            _log.warning("connection refused: server.max_connections (%d) are open", self._max_connections,
                         extra={"event": "connection.refused", "client": _address(self.client)})
            transport.write(self._refusals.too_many.bytes())
            transport.close()
            return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        self._cancel_head_timer()
        self.transport.write(self._refusals.bad_request.bytes())
        self.transport.close()

    # -- parser callbacks --------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._in_head = True
        self._head_done = False
        super().on_message_begin()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._head_done:
            return  # a trailer field: never a request header
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_done = True
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:
            self._arm_head_timer()  # nothing queued behind it: the next head is on the clock

    # -- the head timer ----------------------------------------------------------------------
    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self._header_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a response is under way; its completion re-arms the timer
        if self._in_head:
            _log.warning("request head not received within server.header_timeout (%ss)",
                         self._header_timeout_s,
                         extra={"event": "request.header_timeout", "client": _address(self.client)})
            self.transport.write(self._refusals.head_timeout.bytes())
        self.transport.close()
