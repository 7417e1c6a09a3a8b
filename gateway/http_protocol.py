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
* **A request the local load shedder sheds is refused here**, once its head is parsed and
  before a scope, a ``RequestResponseCycle`` or a task exists (``connection_shed.py`` decides,
  as the stack would; the answer is the stack's 503 byte for byte). Under a flood this is most
  requests, and the ASGI path made each cost the event loop the critical requests share. The
  framing stays the connection's: a request with no body leaves the connection as the stack's
  answer would (kept alive unless the request or HTTP/1.0 says otherwise); a request's body is
  read and dropped by the parser, never parsed as the next request, and the connection is kept
  alive for a ``Content-Length`` body up to ``SHED_DRAIN_MAX_BYTES``. A chunked body, a longer
  one, or one behind ``Expect: 100-continue`` (whose client may never send it) is answered with
  ``Connection: close`` and the connection closes once the body is read (or at
  ``SHED_DRAIN_MAX_BYTES``, or ``server.header_timeout``). A request queued behind one still
  being answered (pipelining), an upgrade, or one met while the connection's writes are paused
  goes the ASGI way, whose answer keeps its order and its backpressure.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.connection_shed import ADMITTED, ConnectionShedder
from gateway.problem import PROBLEM_RENDERER, STRIPE_RENDERER, Renderer, problem_type
from gateway.requestid import HEADER as REQUEST_ID_HEADER
from gateway.requestid import new_request_id

__all__ = ["DEFAULT_HEADER_TIMEOUT_S", "DEFAULT_MAX_CONNECTIONS", "SHED_DRAIN_MAX_BYTES",
           "GatewayHttpProtocol"]

DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_MAX_CONNECTIONS = 1024
#: The longest body of a shed request read and dropped on a connection kept alive (and the most
#: read from one announced with ``Connection: close`` before the connection closes).
SHED_DRAIN_MAX_BYTES = 64 * 1024
_CONTENT_LENGTH = b"content-length"
_TRANSFER_ENCODING = b"transfer-encoding"

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


def _body_ahead(headers: Sequence[tuple[bytes, bytes]]) -> tuple[bool, bool]:
    """(a body follows the head, it may be dropped on a connection kept alive): the parser has
    checked the framing headers (one Content-Length, never beside Transfer-Encoding, and a
    request's Transfer-Encoding ends in chunked)."""
    for name, value in headers:
        if name == _TRANSFER_ENCODING:
            return True, False
        if name == _CONTENT_LENGTH:
            try:
                length = int(value)
            except ValueError:
                return True, False
            return length > 0, length <= SHED_DRAIN_MAX_BYTES
    return False, True


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with trailers dropped, a head timeout, a connection cap, and
    shed requests refused before they become ASGI requests.

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
        # the app's early shedder (a GatewayMiddleware with the local shedder enforced); none
        # under a root path, which the stack's paths would include and the connection's not
        shedder = getattr(self.app, "connection_shedder", None)
        self._shedder = shedder if isinstance(shedder, ConnectionShedder) and not self.root_path else None
        self._discarding = False  # the current message is not served: its body is dropped
        self._discarded = 0  # bytes of that body dropped so far
        self._close_after = False  # and the connection closes once it is read

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

    def handle_websocket_upgrade(self) -> None:
        if self.transport.is_closing():
            return  # an upgrade behind a request the connection closes after: never served
        super().handle_websocket_upgrade()

    def send_400_response(self, msg: str) -> None:
        self._cancel_head_timer()
        self.transport.write(self._refusals.bad_request.bytes())
        self.transport.close()

    # -- parser callbacks --------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._in_head = True
        self._head_done = False
        # what uvicorn's on_message_begin resets for the parser's callbacks; its scope is made
        # only for a request that is not shed (``_make_scope``)
        self.url = b""
        self.expect_100_continue = False
        self.headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._head_done:
            return  # a trailer field: never a request header
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_done = True
        self._cancel_head_timer()
        if self.transport.is_closing():
            # behind a request the connection closes after, in the same read: never served
            self._discard(close=True)
            return
        shedder = self._shedder
        admitted = False
        if shedder is not None and shedder.may_shed() and self._may_answer_now():
            started = time.perf_counter()
            method = self.parser.get_method().decode("ascii")
            k = shedder.decide(method, self.url, self.parser.get_http_version(), self.headers, self.client)
            if k >= 0:
                self._shed(shedder, k, method, started)
                return
            admitted = k == ADMITTED
        self._make_scope()
        if admitted and shedder is not None:
            shedder.mark_admitted(cast("dict[str, Any]", self.scope))
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._discarding:
            self._discarded += len(body)
            if self._discarded > SHED_DRAIN_MAX_BYTES and not self.transport.is_closing():
                self.transport.close()  # bounded: past it, the body is not worth reading
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self._discarding:
            self._discarding = False
            if self._close_after and not self.transport.is_closing():
                self.transport.close()
            return
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:
            self._arm_head_timer()  # nothing queued behind it: the next head is on the clock

    # -- the early shed ----------------------------------------------------------------------
    def _make_scope(self) -> None:
        """uvicorn's scope for the request whose head was just parsed (its on_message_begin,
        keeping what the parser's callbacks gathered since)."""
        url, headers, expect = self.url, self.headers, self.expect_100_continue
        super().on_message_begin()
        self.url, self.headers, self.expect_100_continue = url, headers, expect
        self.scope["headers"] = headers

    def _may_answer_now(self) -> bool:
        """No response ahead of this request's (pipelining), no upgrade, writes not paused: an
        answer written now is in order and within the transport's buffer bound."""
        cycle = self.cycle
        return ((cycle is None or cycle.response_complete) and not self.parser.should_upgrade()
                and not self.flow.write_paused)

    def _shed(self, shedder: ConnectionShedder, k: int, method: str, started: float) -> None:
        """Write the 503 of a request of class ``k``; drop its body, or close, as the module says."""
        keep_alive = self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
        body, drainable = _body_ahead(self.headers)
        close = not keep_alive or (body and (not drainable or self.expect_100_continue))
        self.transport.write(shedder.answer(k, self.headers, started=started, head_only=method == "HEAD",
                                            close=close, server_headers=self.server_state.default_headers))
        if self.access_log:
            self.access_logger.info('%s - "%s %s HTTP/%s" %d', _address(self.client), method,
                                    self.url.decode("latin-1"), self.parser.get_http_version(), 503)
        self._discard(close=close)  # until its message completes, with or without a body
        if close and not body:
            self.transport.close()
        self.on_response_complete()  # as after any response: the keep-alive and head timers

    def _discard(self, *, close: bool) -> None:
        self._discarding = True
        self._discarded = 0
        self._close_after = close

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
