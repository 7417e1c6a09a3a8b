"""Every response the gateway makes itself: RFC 9457 ``application/problem+json``.

The only place that writes a gateway-made response, so each one has ``type``, ``title``,
``status`` and ``detail``, ``Cache-Control: no-store`` (RFC 6585 §4: a 429 must not be cached)
and ``X-Request-Id``. Type URIs are identifiers (``urn:gateway:problem:<name>``), listed in the
README, except where a registered type exists (the IANA ``quota-exceeded`` of the RateLimit
draft).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from http import HTTPStatus
from typing import Any

from gateway._asgi import Send
from gateway.requestid import HEADER as REQUEST_ID_HEADER
from gateway.requestid import current_request_id, new_request_id

__all__ = [
    "PROBLEM_HEADERS",
    "QUOTA_EXCEEDED",
    "STORE_UNAVAILABLE",
    "CannedProblem",
    "problem_body",
    "problem_type",
    "send_problem",
]


def problem_type(name: str) -> str:
    """The type URI of one of the gateway's own problems."""
    return f"urn:gateway:problem:{name}"


# draft-ietf-httpapi-ratelimit-headers §"Problem Types": quota-exceeded, 429
QUOTA_EXCEEDED = "https://iana.org/assignments/http-problem-types#quota-exceeded"
STORE_UNAVAILABLE = problem_type("store-unavailable")

#: The headers every problem response carries (besides Content-Length and X-Request-Id).
PROBLEM_HEADERS = (
    (b"content-type", b"application/problem+json"),
    (b"cache-control", b"no-store"),
)


def problem_body(
    *, status: int, type_: str, title: str, detail: str, extensions: Mapping[str, Any] | None = None
) -> bytes:
    """The RFC 9457 JSON document, for a response sent now or stored for replay."""
    body: dict[str, Any] = {"type": type_, "title": title, "status": status, "detail": detail}
    if extensions:
        body.update(extensions)
    return json.dumps(body, separators=(",", ":")).encode()


async def send_problem(
    send: Send,
    *,
    status: int,
    type_: str,
    title: str,
    detail: str,
    headers: Iterable[tuple[bytes, bytes]] = (),
    extensions: Mapping[str, Any] | None = None,
) -> None:
    """Send one complete problem+json response.

    Args:
        send: the ASGI send of the request being answered.
        status: the HTTP status, repeated in the body as RFC 9457 asks.
        type_, title, detail: the RFC 9457 members.
        headers: extra response headers (``Retry-After``, ``RateLimit``...).
        extensions: extra members, e.g. ``violated-policies``.
    """
    payload = problem_body(status=status, type_=type_, title=title, detail=detail, extensions=extensions)
    out = [*PROBLEM_HEADERS, (b"content-length", str(len(payload)).encode()), *headers]
    if current_request_id() is None:
        # no RequestIdMiddleware outside us to add it: a lone middleware still names the reply
        out.append((REQUEST_ID_HEADER, new_request_id().encode()))
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": payload})


class CannedProblem:
    """One problem response built once and sent many times (a shed request's 503): the same
    body and headers ``send_problem`` would send, without the JSON encoding per request.

    For an HTTP/1.1 connection that writes the answer itself (``gateway/connection_shed.py``):
    ``status_line`` (with its CRLF), and ``fields``: the header lines (Content-Length included),
    then ``x-request-id: ``, for the caller to end."""

    __slots__ = ("body", "fields", "headers", "status", "status_line")

    def __init__(
        self,
        *,
        status: int,
        type_: str,
        title: str,
        detail: str,
        headers: Iterable[tuple[bytes, bytes]] = (),
        extensions: Mapping[str, Any] | None = None,
    ) -> None:
        self.status = status
        self.body = problem_body(status=status, type_=type_, title=title, detail=detail,
                                 extensions=extensions)
        self.headers = (*PROBLEM_HEADERS, (b"content-length", str(len(self.body)).encode()), *headers)
        self.status_line = b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode())
        self.fields = b"".join(name + b": " + value + b"\r\n" for name, value in self.headers)
        self.fields += REQUEST_ID_HEADER + b": "

    async def send(self, send: Send) -> None:
        """Send it, as ``send_problem`` would: with a new ``X-Request-Id`` when no layer outside
        names the request."""
        out = list(self.headers)
        if current_request_id() is None:
            out.append((REQUEST_ID_HEADER, new_request_id().encode()))
        await send({"type": "http.response.start", "status": self.status, "headers": out})
        await send({"type": "http.response.body", "body": self.body})
