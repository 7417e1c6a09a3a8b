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
from typing import Any

from gateway._asgi import Send
from gateway.requestid import HEADER as REQUEST_ID_HEADER
from gateway.requestid import current_request_id, new_request_id

__all__ = [
    "PROBLEM_HEADERS",
    "QUOTA_EXCEEDED",
    "STORE_UNAVAILABLE",
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
        out.append((REQUEST_ID_HEADER, new_request_id()))
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": payload})
