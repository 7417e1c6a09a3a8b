"""The local load shedder's refusal made by the HTTP connection, before a scope or a task exists.

Under a flood most requests are shed, and on the ASGI path each one still costs the event loop
the critical requests share a scope, a ``RequestResponseCycle``, a task, the stack's entry
(request id, context, request check) and a 503 through uvicorn's ``send``
(``loadtests/RESULTS.md``, "Locust: overload"). ``gateway serve``'s connection
(``GatewayHttpProtocol``) asks a ``ConnectionShedder`` as soon as a request's head is parsed;
when the local shedder sheds the request, the connection writes the canned 503 itself and no
scope, cycle or task is made.

The decision is the stack's, in the stack's order, so a request gets the answer it would have
got from the stack:

* nothing to do while the local shedder admits every class (``LocalShedder.may_shed``): the
  common case costs one call;
* a request the request check would refuse (``RequestCheck.passing_path``) or one for the
  ops routes (``/_gateway/*``, ``OpsRoutes.claims``) goes on to the stack, which answers it as
  before;
* the class from the method, the path in normal form and the ``[[priority]]`` header, as
  ``PriorityClasses`` finds it in the stack; then ``LocalShedder.admits``. A request admitted
  here carries that draw into the scope (``DRAWN_SCOPE_KEY``): the stack's shedder checks the
  in-flight bound again but does not draw the class's share a second time.

A shed request is counted where the stack counts it (``gateway_shed_total``,
``gateway_requests_total{code="503"}``, ``gateway_added_latency_seconds``) and noted in the
shedder's aggregated log line. Its answer is the stack's byte for byte, in the ``[errors]
format`` the stack writes: the class's ``CannedProblem`` (``Retry-After: 1``), the request's own
``X-Request-Id`` when well formed (else a new one; in Stripe's format ``Request-Id`` too),
``Date`` when the stack adds it. The connection owns the framing (keep-alive,
``HEAD``, the request body): ``http_protocol.py``.

Only the local shedder in ``enforce`` mode sheds here: a shadow one sheds nothing, and the fleet
shedder needs a store call, which the stack makes.
"""

from __future__ import annotations

import time
from collections.abc import MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

import httptools

from gateway.entry import http_date
from gateway.requestid import HEADER as REQUEST_ID_HEADER
from gateway.requestid import new_request_id, valid_request_id
from gateway.shedding import DRAWN_SCOPE_KEY

if TYPE_CHECKING:
    from gateway._asgi import Headers
    from gateway.metrics import Metrics
    from gateway.ops import OpsRoutes
    from gateway.request_check import RequestCheck
    from gateway.shedding import LoadSheddingMiddleware, LocalShedder

__all__ = ["ADMITTED", "PASS", "ConnectionShedder", "request_id_of"]

#: ``decide``: the stack decides (no draw was made here).
PASS = -2
#: ``decide``: the local shedder admitted the request here (its draw is made).
ADMITTED = -1
_DATE = b"date: "
_CRLF = b"\r\n"
_CLOSE = b"connection: close\r\n"
_REQUEST_ID = REQUEST_ID_HEADER + b": "


def request_id_of(headers: Sequence[tuple[bytes, bytes]]) -> bytes:
    """The request's id as the stack takes it: its first ``X-Request-Id`` when well formed,
    else a new one (``requestid.take_request_id``)."""
    for name, value in headers:
        if name == REQUEST_ID_HEADER:
            return value if valid_request_id(value) else new_request_id()
    return new_request_id()


class ConnectionShedder:
    """The local shedder of one stack, as the HTTP connection asks it (see the module docstring).

    Built by ``GatewayMiddleware`` when ``[shedding.local]`` is enabled and enforced; the
    connection finds it as the app's ``connection_shedder``."""

    def __init__(self, shedding: LoadSheddingMiddleware, local: LocalShedder, check: RequestCheck,
                 ops: OpsRoutes, metrics: Metrics, *, date_header: bool) -> None:
        self.local = local
        self._shedding = shedding
        self._classes = shedding.classes
        self._check = check
        self._ops = ops
        self._metrics = metrics
        self._date_header = date_header
        self._answers = shedding.answers["local"]

    def may_shed(self) -> bool:
        """Whether any request could be shed now (else the connection asks nothing more)."""
        return self.local.may_shed()

    def decide(self, method: str, url: bytes, http_version: str, headers: Headers,
               client: Sequence[Any] | None) -> int:
        """The class to shed the request as (0 the most critical), or ``PASS`` (the stack
        decides), or ``ADMITTED`` (admitted here, its draw made)."""
        try:
            raw_path = httptools.parse_url(url).path
        except httptools.HttpParserInvalidURLError:
            return PASS  # uvicorn refuses it the same way
        if not raw_path.isascii():
            return PASS
        path = self._check.passing_path(http_version, headers, raw_path)
        if path is None or self._ops.claims(path):
            return PASS
        k = self._classes.of_request(method, path, headers, client)
        return ADMITTED if self.local.admits(k) else k

    def mark_admitted(self, scope: MutableMapping[str, Any]) -> None:
        """Note in the scope of a request ``decide`` admitted that its share was drawn for."""
        scope[DRAWN_SCOPE_KEY] = self.local

    def answer(self, k: int, headers: Sequence[tuple[bytes, bytes]], *, started: float, head_only: bool,
               close: bool, server_headers: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
        """The whole 503 for a request of class ``k`` shed here (its body left out for ``HEAD``,
        ``Connection: close`` when the connection will close, the server's own default headers
        first, where uvicorn puts them), counted and noted in the log."""
        rid = request_id_of(headers)
        answer = self._answers[k]
        parts = [answer.status_line]
        for name, value in server_headers:
            parts += [name, b": ", value, _CRLF]
        # the renderer's headers, its lines naming the request, then the entry's X-Request-Id
        parts += [answer.fields, answer.id_lines(rid), _REQUEST_ID, rid, _CRLF]
        if self._date_header:
            parts += [_DATE, http_date(), _CRLF]
        if close:
            parts.append(_CLOSE)
        parts.append(_CRLF)
        if not head_only:
            parts.append(answer.body)
        self._shedding.count_shed(k, rid)
        metrics = self._metrics
        metrics.count_response(503)
        metrics.added_latency.observe(time.perf_counter() - started)
        return b"".join(parts)
