"""Every response the gateway makes itself, in the shape ``[errors] format`` names.

The only place that writes a gateway-made response. A layer describes a refusal once, as an
RFC 9457 problem (``type``, ``title``, ``status``, ``detail``, extension members, headers such as
``Retry-After``); the ``Renderer`` the layer was given turns it into bytes on the wire:

* ``ProblemRenderer`` (``format = "problem"``, the default): ``application/problem+json`` with
  those members, ``Cache-Control: no-store`` (RFC 6585 §4: a 429 must not be cached) and
  ``X-Request-Id``. Type URIs are identifiers (``urn:gateway:problem:<name>``), listed in the
  README, except where a registered type exists (the IANA ``quota-exceeded`` of the RateLimit
  draft).
* ``StripeRenderer`` (``format = "stripe"``): Stripe's error envelope, ``{"error": {"type",
  "code", "message", ...}}``, with Stripe's status where it differs (a key reused with other
  parameters is a 400 ``idempotency_error``, which stripe-python raises as ``IdempotencyError``
  only for 400/404; a too-large body a 400 ``invalid_request_error``), ``Request-Id`` (what Stripe
  clients read as the request id: ``StripeError.request_id``) and ``Stripe-Should-Retry``
  (``true``/``false``), which every Stripe client library consults before its own rules
  (stripe-python ``_http_client.HTTPClient._should_retry``: the header first, then 409 and
  5xx retried, nothing else). The mapping is ``STRIPE_ERRORS``.

Layers get the renderer at construction (``renderer_for(config.errors.format)``): the format is
chosen here, never branched on per layer. An answer sent many times alike (a shed request's 503)
is built once by the renderer (``Renderer.canned``: a ``CannedProblem``), with only the request
id added per request.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Protocol

from gateway._asgi import Headers, Send
from gateway.requestid import HEADER as REQUEST_ID_HEADER
from gateway.requestid import current_request_id, new_request_id

__all__ = [
    "PROBLEM_HEADERS",
    "PROBLEM_RENDERER",
    "QUOTA_EXCEEDED",
    "STORE_UNAVAILABLE",
    "STRIPE_ERRORS",
    "STRIPE_RENDERER",
    "CannedProblem",
    "ProblemRenderer",
    "Renderer",
    "StripeError",
    "StripeRenderer",
    "problem_body",
    "problem_type",
    "renderer_for",
    "send_problem",
]

_PREFIX = "urn:gateway:problem:"


def problem_type(name: str) -> str:
    """The type URI of one of the gateway's own problems."""
    return f"{_PREFIX}{name}"


# draft-ietf-httpapi-ratelimit-headers §"Problem Types": quota-exceeded, 429
QUOTA_EXCEEDED = "https://iana.org/assignments/http-problem-types#quota-exceeded"
STORE_UNAVAILABLE = problem_type("store-unavailable")

#: The headers every problem response carries (besides Content-Length and X-Request-Id).
PROBLEM_HEADERS = (
    (b"content-type", b"application/problem+json"),
    (b"cache-control", b"no-store"),
)
_STRIPE_HEADERS = (
    (b"content-type", b"application/json"),
    (b"cache-control", b"no-store"),
)
_STRIPE_REQUEST_ID = b"request-id"
_SHOULD_RETRY = b"stripe-should-retry"


class Renderer(Protocol):
    """Turns a problem into the response the client gets."""

    format: str
    #: headers a replayed response gets besides ``Idempotent-Replayed``, in place of any stored
    #: line of the same name (none for problem+json)
    replay_headers: tuple[tuple[bytes, bytes], ...]

    def replay_defaults(self) -> Headers:
        """Headers a replayed response gets when the stored one has no line of that name."""
        ...

    async def send(
        self, send: Send, *, status: int, type_: str, title: str, detail: str,
        headers: Iterable[tuple[bytes, bytes]] = (), extensions: Mapping[str, Any] | None = None,
    ) -> None:
        """Send one complete response for this problem."""
        ...

    def record(
        self, *, status: int, type_: str, title: str, detail: str,
        extensions: Mapping[str, Any] | None = None,
    ) -> tuple[int, Headers, bytes]:
        """The status, headers and body to store for this problem (replayed later, as it is)."""
        ...

    def canned(
        self, *, status: int, type_: str, title: str, detail: str,
        headers: Iterable[tuple[bytes, bytes]] = (), extensions: Mapping[str, Any] | None = None,
    ) -> CannedProblem:
        """This problem built once, to be sent many times as ``send`` would send it."""
        ...


def problem_body(
    *, status: int, type_: str, title: str, detail: str, extensions: Mapping[str, Any] | None = None
) -> bytes:
    """The RFC 9457 JSON document, for a response sent now or stored for replay."""
    body: dict[str, Any] = {"type": type_, "title": title, "status": status, "detail": detail}
    if extensions:
        body.update(extensions)
    return json.dumps(body, separators=(",", ":")).encode()


def _request_id() -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The request's id, and the ``X-Request-Id`` line to add when no stack entry adds it (a
    lone middleware still names its reply)."""
    rid = current_request_id()
    if rid is None:
        made = new_request_id()
        return made, [(REQUEST_ID_HEADER, made)]
    return rid.encode(), []


async def _send_whole(send: Send, status: int, headers: list[tuple[bytes, bytes]], payload: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


class CannedProblem:
    """One problem, rendered once and sent many times (a shed request's 503): the bytes
    ``Renderer.send`` would send, without encoding the document per request.

    ``headers`` are the response's headers in the renderer's order up to those naming the
    request, ``id_names`` the headers the renderer sets to the request's id (Stripe's
    ``Request-Id``). For an HTTP/1.1 connection that writes the answer itself
    (``gateway/connection_shed.py``): ``status_line`` (with its CRLF), ``fields`` (the lines of
    ``headers``), and ``id_lines(rid)``."""

    __slots__ = ("body", "fields", "headers", "id_names", "status", "status_line")

    def __init__(self, status: int, headers: Iterable[tuple[bytes, bytes]], body: bytes,
                 id_names: tuple[bytes, ...] = ()) -> None:
        self.status = status
        self.body = body
        self.headers = tuple(headers)
        self.id_names = id_names
        self.status_line = b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode())
        self.fields = b"".join(name + b": " + value + b"\r\n" for name, value in self.headers)

    def id_lines(self, rid: bytes) -> bytes:
        """The header lines the renderer adds that carry the request's id."""
        return b"".join(name + b": " + rid + b"\r\n" for name in self.id_names)

    async def send(self, send: Send) -> None:
        """Send it, as the renderer's ``send`` would (a lone middleware still names its reply)."""
        rid, own = _request_id()
        out = [*self.headers, *((name, rid) for name in self.id_names), *own]
        await _send_whole(send, self.status, out, self.body)


class ProblemRenderer:
    """RFC 9457 ``application/problem+json`` (``[errors] format = "problem"``)."""

    format = "problem"
    replay_headers: tuple[tuple[bytes, bytes], ...] = ()

    def replay_defaults(self) -> Headers:
        return []

    async def send(
        self, send: Send, *, status: int, type_: str, title: str, detail: str,
        headers: Iterable[tuple[bytes, bytes]] = (), extensions: Mapping[str, Any] | None = None,
    ) -> None:
        payload = problem_body(status=status, type_=type_, title=title, detail=detail,
                               extensions=extensions)
        out = [*PROBLEM_HEADERS, (b"content-length", b"%d" % len(payload)), *headers]
        out += _request_id()[1]
        await _send_whole(send, status, out, payload)

    def record(
        self, *, status: int, type_: str, title: str, detail: str,
        extensions: Mapping[str, Any] | None = None,
    ) -> tuple[int, Headers, bytes]:
        body = problem_body(status=status, type_=type_, title=title, detail=detail, extensions=extensions)
        return status, list(PROBLEM_HEADERS), body

    def canned(
        self, *, status: int, type_: str, title: str, detail: str,
        headers: Iterable[tuple[bytes, bytes]] = (), extensions: Mapping[str, Any] | None = None,
    ) -> CannedProblem:
        payload = problem_body(status=status, type_=type_, title=title, detail=detail,
                               extensions=extensions)
        return CannedProblem(status, [*PROBLEM_HEADERS, (b"content-length", b"%d" % len(payload)), *headers],
                             payload)


@dataclass(frozen=True, slots=True)
class StripeError:
    """How one problem looks in Stripe's shape: its status (None: the problem's own), Stripe's
    error ``type``, the ``code``, and whether a client should retry the same request."""

    status: int | None
    type: str
    code: str
    retry: bool


#: Problem type -> Stripe's shape. Stripe's own codes where Stripe has one (``rate_limit``,
#: ``idempotency_key_in_use``); otherwise the problem's name, in Stripe's snake case. ``retry``
#: is what ``Stripe-Should-Retry`` says: true where the same request may well pass after the
#: client's short backoff (a key in use, a concurrency or capacity refusal, a store outage, a
#: request that never reached the upstream), false where a retry cannot help (a rate limit
#: before its Retry-After, as Stripe's libraries never retry one; a replayed or unknown outcome;
#: a request the client must change).
_INVALID, _API, _IDEMPOTENCY = "invalid_request_error", "api_error", "idempotency_error"
STRIPE_ERRORS: Mapping[str, StripeError] = {
    QUOTA_EXCEEDED: StripeError(None, _INVALID, "rate_limit", retry=False),
    problem_type("concurrency-limit-exceeded"): StripeError(None, _INVALID, "rate_limit", retry=True),
    problem_type("load-shed"): StripeError(None, _API, "load_shed", retry=True),
    STORE_UNAVAILABLE: StripeError(None, _API, "store_unavailable", retry=True),
    problem_type("idempotency-key-in-use"):
        StripeError(None, _IDEMPOTENCY, "idempotency_key_in_use", retry=True),
    problem_type("idempotency-key-reused"):
        StripeError(400, _IDEMPOTENCY, "idempotency_key_reused", retry=False),
    problem_type("idempotency-body-too-large"): StripeError(400, _INVALID, "body_too_large", retry=False),
    problem_type("outcome-unknown"): StripeError(None, _API, "outcome_unknown", retry=False),
    problem_type("upstream-not-reached"): StripeError(None, _API, "upstream_not_reached", retry=True),
    problem_type("response-not-stored"): StripeError(None, _API, "response_not_stored", retry=False),
    problem_type("too-many-connections"): StripeError(None, _API, "too_many_connections", retry=True),
}


def stripe_error(status: int, type_: str) -> StripeError:
    """The Stripe shape of a problem: from ``STRIPE_ERRORS``, else by its status class (a 4xx
    the client's to fix, ``invalid_request_error``; a 5xx ``api_error``), never retried."""
    known = STRIPE_ERRORS.get(type_)
    if known is not None:
        return known
    name = type_.removeprefix(_PREFIX).replace("-", "_")
    return StripeError(None, _INVALID if status < 500 else _API, name, retry=False)


class StripeRenderer:
    """Stripe's error envelope and statuses (``[errors] format = "stripe"``)."""

    format = "stripe"
    # a replay is the answer for good: retrying it gets the same replay (Stripe's libraries
    # would otherwise retry a replayed 5xx, as stripe-python's comment on 500s expects)
    replay_headers: tuple[tuple[bytes, bytes], ...] = ((_SHOULD_RETRY, b"false"),)

    def replay_defaults(self) -> Headers:
        # a stored outcome-unknown record keeps no Request-Id: the replay names this request
        # (an upstream's own Request-Id, stored with its response, stays what it said)
        return [(_STRIPE_REQUEST_ID, _request_id()[0])]

    def _document(
        self, status: int, type_: str, title: str, detail: str, extensions: Mapping[str, Any] | None,
    ) -> tuple[int, StripeError, bytes]:
        shape = stripe_error(status, type_)
        error: dict[str, Any] = {"type": shape.type, "code": shape.code, "message": detail or title}
        for name, value in (extensions or {}).items():
            error[name.replace("-", "_")] = value
        payload = json.dumps({"error": error}, separators=(",", ":")).encode()
        return shape.status or status, shape, payload

    async def send(
        self, send: Send, *, status: int, type_: str, title: str, detail: str,
        headers: Iterable[tuple[bytes, bytes]] = (), extensions: Mapping[str, Any] | None = None,
    ) -> None:
        status, shape, payload = self._document(status, type_, title, detail, extensions)
        rid, own = _request_id()
        out = [*_STRIPE_HEADERS, (b"content-length", b"%d" % len(payload)), *headers,
               (_SHOULD_RETRY, b"true" if shape.retry else b"false"), (_STRIPE_REQUEST_ID, rid), *own]
        await _send_whole(send, status, out, payload)

    def record(
        self, *, status: int, type_: str, title: str, detail: str,
        extensions: Mapping[str, Any] | None = None,
    ) -> tuple[int, Headers, bytes]:
        status, shape, payload = self._document(status, type_, title, detail, extensions)
        # Request-Id is the current request's, added by ``send`` only: a stored one would name
        # the first request on every replay
        return status, [*_STRIPE_HEADERS, (_SHOULD_RETRY, b"true" if shape.retry else b"false")], payload

    def canned(
        self, *, status: int, type_: str, title: str, detail: str,
        headers: Iterable[tuple[bytes, bytes]] = (), extensions: Mapping[str, Any] | None = None,
    ) -> CannedProblem:
        status, shape, payload = self._document(status, type_, title, detail, extensions)
        fixed = [*_STRIPE_HEADERS, (b"content-length", b"%d" % len(payload)), *headers,
                 (_SHOULD_RETRY, b"true" if shape.retry else b"false")]
        return CannedProblem(status, fixed, payload, (_STRIPE_REQUEST_ID,))


PROBLEM_RENDERER = ProblemRenderer()
STRIPE_RENDERER = StripeRenderer()


def renderer_for(format_: str) -> Renderer:
    """The renderer of an ``[errors] format``."""
    return STRIPE_RENDERER if format_ == "stripe" else PROBLEM_RENDERER


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
    """Send one complete problem+json response (``PROBLEM_RENDERER.send``): for the answers that
    are problem+json whatever ``[errors] format`` says (``/_gateway/*``, for operators).

    Args:
        send: the ASGI send of the request being answered.
        status: the HTTP status, repeated in the body as RFC 9457 asks.
        type_, title, detail: the RFC 9457 members.
        headers: extra response headers (``Retry-After``, ``RateLimit``...).
        extensions: extra members, e.g. ``violated-policies``.
    """
    await PROBLEM_RENDERER.send(send, status=status, type_=type_, title=title, detail=detail,
                                headers=headers, extensions=extensions)
