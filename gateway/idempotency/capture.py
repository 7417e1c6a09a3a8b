"""Keeping a response for replay while it streams to the client, and giving it back.

What is kept: the status, the storable headers in their order (repeated ones included, each
line as it was: ``Set-Cookie``-style values are never joined or split), and the body, byte for
byte, up to the size limit. What is not: hop-by-hop headers (RFC 9110 §7.6.1, and any named in
``Connection``), ``Set-Cookie`` (another client's session must never be replayed), framing the
replay recomputes (``Content-Length``, ``Date``) and the gateway's own fields (``RateLimit*``,
``X-Request-Id``, ``Idempotent-Replayed``): a replay carries the current ones.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable, Iterable

from gateway._asgi import Headers, Message, Send
from gateway.requestid import HEADER as REQUEST_ID_HEADER
from gateway.store import StoredResponse

__all__ = ["REPLAYED", "Capture", "ResponseCutOff", "decode_headers", "encode_headers", "send_replay",
           "storable_headers"]

REPLAYED = (b"idempotent-replayed", b"true")
_NEVER_STORED = frozenset({
    # hop-by-hop (RFC 9110 §7.6.1)
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
    b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    # another exchange's cookies, and framing the replay recomputes
    b"set-cookie", b"content-length", b"date",
    # the gateway's own: a replay carries the current ones
    b"ratelimit", b"ratelimit-policy", REQUEST_ID_HEADER, REPLAYED[0],
})
_LENGTHS = struct.Struct(">II")
_CUT_OFF = "the response was cut off: its outcome is not stored"


def storable_headers(headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """The response headers a replay repeats, in their order."""
    headers = list(headers)
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(token.strip().lower() for token in value.split(b","))
    return [
        (name, value) for name, value in headers
        if (low := name.lower()) not in _NEVER_STORED and low not in named
    ]


def encode_headers(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Header lines as one binary-safe string: per line, two lengths then name and value."""
    return b"".join(_LENGTHS.pack(len(n), len(v)) + n + v for n, v in headers)


def decode_headers(blob: bytes) -> Headers:
    """The inverse of ``encode_headers``."""
    out: Headers = []
    pos, end = 0, len(blob)
    while pos < end:  # bounded: every line moves pos forward by at least 8 bytes
        n_len, v_len = _LENGTHS.unpack_from(blob, pos)
        pos += _LENGTHS.size
        name = blob[pos:pos + n_len]
        pos += n_len
        out.append((name, blob[pos:pos + v_len]))
        pos += v_len
    return out


def _declared_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    """The body length one valid ``Content-Length`` declares; None when unframed or unclear."""
    found = None
    for name, value in headers:
        if name.lower() == b"content-length":
            if found is not None or not value.isdigit():
                return None
            found = int(value)
    return found


async def send_replay(
    send: Send, response: StoredResponse, extra: Iterable[tuple[bytes, bytes]] = (),
    defaults: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """Answer with a stored response: same status, headers and body, marked as a replay; with
    ``extra`` in place of stored lines of the same names, and ``defaults`` where none is stored
    (Stripe's error format: ``Stripe-Should-Retry: false``, and a ``Request-Id``)."""
    headers = decode_headers(response.headers)
    headers.append((b"content-length", b"%d" % len(response.body)))
    headers.append(REPLAYED)
    extra = list(extra)
    if extra:  # said now, in place of what the first answer said
        names = {name for name, _ in extra}
        headers = [line for line in headers if line[0].lower() not in names]
        headers += extra
    for name, value in defaults:
        if not any(n.lower() == name for n, _ in headers):
            headers.append((name, value))
    # X-Request-Id: the current one, set by the request-id layer outside
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": response.body})


class ResponseCutOff(Exception):
    """Raised to the app by ``send``: its response's outcome is not stored, so the response may
    not end (the server then closes the connection with the response unfinished)."""


class Capture:
    """A ``send`` that streams the app's response on and keeps it (up to ``limit`` bytes).

    What would complete the response on the wire is held back until ``on_end`` has settled the
    record: the last message, the bytes that reach the declared ``Content-Length``, a head that
    is a whole response by itself (``Content-Length: 0``, 204, 304). So by the time the client
    has the whole response, every retry gets its replay, and a stream goes out as it comes.
    When ``on_end`` says the outcome is not stored, the end never goes out (``cut_off``): the
    client has a response that visibly lacks its end (a short body, or no last chunk) and a
    closed connection, never a whole one its retries would contradict. If the client has gone,
    the rest of the response is dropped instead of failing the app, so the request still
    finishes and is stored.
    """

    __slots__ = ("_chunks", "_framed", "_held", "_left", "_limit", "_on_end", "_send", "_size",
                 "client_gone", "cut_off", "ended", "head_sent", "headers", "started", "status",
                 "too_large", "unanswered")

    def __init__(self, send: Send, limit: int, on_end: Callable[[Capture], Awaitable[bool]], *,
                 http_version: str = "1.1") -> None:
        self._send = send
        self._limit = limit
        self._on_end = on_end
        self._chunks: list[bytes] = []
        self._size = 0
        self._held: Message | None = None  # what would complete the response, until it may
        self._left: int | None = None  # body bytes still to come, when Content-Length says
        # whether a head can be left visibly unfinished (HTTP/1.0 ends a body at the close)
        self._framed = http_version != "1.0"
        self.status = 0
        self.headers: Headers = []
        self.started = False
        self.head_sent = False
        self.ended = False
        self.too_large = False
        self.client_gone = False
        self.cut_off = False
        self.unanswered = False  # cut off with nothing sent, where a head alone would be whole

    async def send(self, message: Message) -> None:
        if self.cut_off:
            raise ResponseCutOff(_CUT_OFF)
        kind = message["type"]
        if kind == "http.response.start":
            self.started = True
            self.status = message["status"]
            raw = message.get("headers", ())
            self.headers = storable_headers(raw)
            self._left = _declared_length(raw)
            if self._left == 0 or self.status in (204, 304):
                self._held = message  # the head alone is the whole response
            else:
                await self._forward(message)
            return
        if kind != "http.response.body":
            await self._forward(message)
            return
        chunk = message.get("body", b"")
        if chunk:
            self._keep(chunk)
        if message.get("more_body", False):
            if not chunk:
                return
            held = self._held
            if held is not None:  # bytes past the declared end (the server refuses them): in order
                if held["type"] == "http.response.start":
                    await self._forward(held)
                    self._held = {"type": "http.response.body", "body": chunk}
                else:
                    self._held = {"type": "http.response.body", "body": held["body"] + chunk}
                return
            if self._left is not None:
                self._left -= len(chunk)
                if self._left <= 0:  # these bytes complete the body: held until it is stored
                    self._held = {"type": "http.response.body", "body": chunk}
                    return
            await self._forward(message)
            return
        if self.started and not self.ended:
            self.ended = True
            if not await self._on_end(self):
                await self._cut_off()
        held, self._held = self._held, None
        if held is not None:
            if held["type"] == "http.response.body":
                message = {"type": "http.response.body", "body": held["body"] + chunk}
            else:
                await self._forward(held)
        await self._forward(message)

    def _keep(self, chunk: bytes) -> None:
        if self.too_large:
            return
        self._size += len(chunk)
        if self._size > self._limit:
            self.too_large = True
            self._chunks.clear()
        else:
            self._chunks.append(chunk)

    async def _forward(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.head_sent = True
        if self.client_gone:
            return
        try:
            await self._send(message)
        except OSError:
            # the client went away mid-response; the request runs on and its outcome is stored
            self.client_gone = True

    async def _cut_off(self) -> None:
        """Leave the response unfinished, then stop the app's sending (``ResponseCutOff``)."""
        self.cut_off = True
        held, self._held = self._held, None
        if held is not None and held["type"] == "http.response.start":
            # a head that alone would be whole (Content-Length: 0): sent without its length, it
            # visibly lacks its end (no last chunk); where even that is whole (204, 304, or
            # HTTP/1.0's body that ends at the close) nothing goes out and the caller answers
            if self._framed and self.status not in (204, 304):
                headers = [(n, v) for n, v in held.get("headers", ()) if n.lower() != b"content-length"]
                await self._forward({**held, "headers": headers})
            else:
                self.unanswered = True
        raise ResponseCutOff(_CUT_OFF)

    @property
    def body(self) -> bytes:
        return b"".join(self._chunks)

    def stored(self) -> StoredResponse | None:
        """The response as a record keeps it; None when it is over the limit."""
        if self.too_large:
            return None
        headers = encode_headers(self.headers)
        if len(headers) + self._size > self._limit:
            return None
        return StoredResponse(self.status, headers, self.body)

