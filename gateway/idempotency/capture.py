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
from gateway.requestid import current_request_id, new_request_id
from gateway.store import StoredResponse

__all__ = ["REPLAYED", "Capture", "decode_headers", "encode_headers", "send_replay", "storable_headers"]

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


async def send_replay(send: Send, response: StoredResponse) -> None:
    """Answer with a stored response: same status, headers and body, marked as a replay."""
    headers = decode_headers(response.headers)
    headers.append((b"content-length", b"%d" % len(response.body)))
    headers.append(REPLAYED)
    if current_request_id() is None:
        headers.append((REQUEST_ID_HEADER, new_request_id().encode()))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": response.body})


class Capture:
    """A ``send`` that streams the app's response on and keeps it (up to ``limit`` bytes).

    When the last body message arrives, ``on_end`` runs before that message goes out: by the
    time the client has the whole response, its record is settled, so an immediate retry gets
    the replay and not a 409. If the client has gone, the rest of the response is dropped
    instead of failing the app, so the request still finishes and is stored.
    """

    __slots__ = ("_chunks", "_limit", "_on_end", "_send", "_size", "client_gone", "ended",
                 "headers", "started", "status", "too_large")

    def __init__(self, send: Send, limit: int, on_end: Callable[[Capture], Awaitable[None]]) -> None:
        self._send = send
        self._limit = limit
        self._on_end = on_end
        self._chunks: list[bytes] = []
        self._size = 0
        self.status = 0
        self.headers: Headers = []
        self.started = False
        self.ended = False
        self.too_large = False
        self.client_gone = False

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.body":
            chunk = message.get("body", b"")
            if chunk and not self.too_large:
                self._size += len(chunk)
                if self._size > self._limit:
                    self.too_large = True
                    self._chunks.clear()
                else:
                    self._chunks.append(chunk)
            if not message.get("more_body", False) and self.started and not self.ended:
                self.ended = True
                await self._on_end(self)
        elif kind == "http.response.start":
            self.started = True
            self.status = message["status"]
            self.headers = storable_headers(message.get("headers", ()))
        if self.client_gone:
            return
        try:
            await self._send(message)
        except OSError:
            # the client went away mid-response; the request runs on and its outcome is stored
            self.client_gone = True

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

