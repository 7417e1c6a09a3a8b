"""Refuse what two readers could read two ways, and give every later layer one request to decide on.

The stack's entry layer runs ``RequestCheck.admit`` right after taking the request id, before
``/_gateway/*``, the rate limit and the Idempotency-Key gate, so each of them and the upstream see
the same request:

* an HTTP version other than 1.0, 1.1, 2 or 3 (an HTTP/0.9-style request line): ``400``;
* HTTP/1.1 without ``Host``, more than one ``Host`` line, or a ``Host`` that is no
  ``host[:port]``: ``400`` (RFC 9112 §3.2);
* more than one line of a header the gateway decides on (``Host``, the Idempotency-Key header,
  every ``header:NAME`` of ``identity.sources`` and of the policies' ``key``): ``400``, since
  the gateway would read one and the upstream might read another;
* ``Expect`` with anything but ``100-continue``: ``417`` (RFC 9110 §10.1.1);
* the path (``gateway/_paths.py``): with ``request.path_normalization = "normalize"`` (the
  default) a target that is not in normal form is rewritten to it, and the rewritten target is
  what every later layer matches and what the upstream receives; with ``"reject"`` it is a
  ``400``. A target with no one meaning (a ``\\``, raw or encoded; an encoded NUL; a malformed
  escape) is a ``400`` either way.

The same pass over the header list keeps the values of those headers (and of
``Content-Length`` and ``X-Forwarded-For``) in the request's context (``HeaderValues``): the
rate limit, the identity and the Idempotency-Key gate read them there, not from the list again;
and it finds the ``X-Request-Id`` lines, so the entry takes the request id without a pass of its
own (``RequestCheck.request_id``).

Each refusal is problem+json, closes the connection (the rest of the request may not be framed
the way the gateway read it) and is counted in ``gateway_requests_refused{reason}``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from urllib.parse import quote, unquote

from gateway._asgi import Headers, Scope, Send
from gateway._kept import Kept
from gateway._paths import normal_target
from gateway.config import Config, IdentitySource
from gateway.context import HeaderValues, RequestContext
from gateway.identity import COOKIE, cookie_names, header_name, source_headers
from gateway.metrics import Metrics
from gateway.problem import problem_type, renderer_for
from gateway.requestid import HEADER as _REQUEST_ID
from gateway.requestid import current_request_id, new_request_id, valid_request_id

__all__ = ["RequestCheck", "decided_cookies", "decided_headers"]

_HOST = b"host"
_CONTENT_LENGTH = b"content-length"
_XFF = b"x-forwarded-for"
_EXPECT = b"expect"
_CONTINUE = b"100-continue"
_VERSIONS = frozenset({"1.0", "1.1", "2", "3"})
# RFC 3986 host (reg-name or IP literal) with an optional port
_HOST_VALUE = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]*)(?::[0-9]*)?")
_CLOSE = ((b"connection", b"close"),)
_log = logging.getLogger(__name__)
#: Why a request is refused: (reason, status, detail), as the header pass finds it
Refusal = tuple[str, int, str]
#: Normal paths (and valid Host values) remembered, each set at most this many, each value at
#: most _REMEMBERED_LEN bytes
REMEMBERED = 4096
_REMEMBERED_LEN = 256
#: The problem a refusal is answered with: (reason, status, problem type name, detail)
Problem = tuple[str, int, str, str]


def decided_headers(config: Config) -> frozenset[bytes]:
    """The lowercase names of the headers a decision reads, each allowed one line.

    ``Authorization`` is one of them when a source reads it (``bearer``, ``jwt:``): a client
    must not be one client to the gateway and another to the app. ``Cookie`` is not: HTTP/2
    sends each cookie as a line of its own (RFC 9113 §8.2.3), so its lines form one list, and
    what is refused is a cookie a source reads named twice (``decided_cookies``)."""
    names = {_HOST, config.idempotency.header.lower().encode("latin-1")}
    keys: Iterable[str] = (*(p.key for p in config.rate_limits), *(c.key for c in config.concurrency_limits))
    names |= {header_name(k) for k in keys if k.startswith("header:")}
    names |= source_headers(_sources(config))
    names.discard(COOKIE)
    return frozenset(names)


def decided_cookies(config: Config) -> frozenset[bytes]:
    """The cookies a decision reads (``cookie:NAME`` sources), each allowed once per request."""
    return frozenset(s[len("cookie:"):].encode("latin-1") for s in _sources(config)
                     if isinstance(s, str) and s.startswith("cookie:"))


def _sources(config: Config) -> tuple[IdentitySource, ...]:
    """Every source a decision reads: the identity chain and the rate limits' plans."""
    plans = tuple(p.plan for p in config.rate_limits if isinstance(p.plan, str))
    return (*config.identity.sources, *plans)


class RequestCheck:
    """The check itself, for the stack's entry layer to run inline (no layer of its own).

    In steps, so that a refusal carries the request's id: ``examine`` (one pass over the
    headers, which also finds the ``X-Request-Id`` lines), ``request_id``, then ``admit`` (the
    path), all without a coroutine; ``refuse`` answers only the requests refused."""

    def __init__(self, config: Config, *, metrics: Metrics) -> None:
        self._single = decided_headers(config)
        self._cookies = decided_cookies(config)
        self._read = self._single | {_CONTENT_LENGTH, _XFF, _REQUEST_ID}
        if self._cookies:
            self._read |= {COOKIE}
        self._reject_non_normal = config.request.path_normalization == "reject"
        # the normal paths and valid hosts seen lately: most requests repeat them, and a set
        # lookup costs a tenth of the regular-expression check (bounded by REMEMBERED each)
        self._normal_paths: Kept[bytes, bool] = Kept(REMEMBERED)
        self._hosts: Kept[bytes, bool] = Kept(REMEMBERED)
        self._render = renderer_for(config.errors.format)
        self._refused = metrics.refused

    def examine(self, scope: Scope, ctx: RequestContext) -> Refusal | None:
        """The header pass: the values the decisions read go into ``ctx.headers``; the refusal
        (reason, status, detail) an ambiguous request gets, else None."""
        found = ctx.headers = HeaderValues(self._read, {})
        refusal = self._refusal(scope, found)
        if refusal is not None and _REQUEST_ID not in found.values:
            # the pass may have stopped before the id: the refusal echoes the client's id too
            given = next((v for n, v in scope["headers"] if n == _REQUEST_ID), None)
            if given is not None:
                found.values[_REQUEST_ID] = given
        return refusal

    @staticmethod
    def request_id(scope: Scope, found: HeaderValues | None) -> tuple[bytes, Headers | None]:
        """The request's id (its own when well formed, else a new one), and the header list to
        pass on when it is not the scope's own: downstream sees exactly one, well-formed
        ``X-Request-Id`` line (the first line decides), as ``requestid.take_request_id`` has it,
        from what ``examine`` found."""
        given = found.values.get(_REQUEST_ID) if found is not None else None
        if given is not None and valid_request_id(given):
            if found is None or not found.request_id_repeated:
                return given, None
            rid = given
        else:
            rid = new_request_id()
        if given is None:
            return rid, [*scope["headers"], (_REQUEST_ID, rid)]
        headers = [h for h in scope["headers"] if h[0] != _REQUEST_ID]
        headers.append((_REQUEST_ID, rid))
        return rid, headers

    def admit(self, scope: Scope, refusal: Refusal | None) -> Problem | None:
        """None when the request goes on, its path made normal in ``scope`` (the entry's own
        copy, changed in place); else the problem to ``refuse`` it with: the refusal ``examine``
        found, or the path's."""
        if refusal is not None:
            reason, status, detail = refusal
            return reason, status, "expectation-failed" if status == 417 else "ambiguous-request", detail
        # a server that gives no raw_path: the path as it would be sent (the proxy does the same)
        raw_path: bytes = scope.get("raw_path") or quote(scope["path"]).encode("ascii")
        normal = self._normal_paths
        if raw_path in normal:  # checked lately: already in normal form
            return None
        target = normal_target(raw_path)
        if target is raw_path and len(raw_path) <= _REMEMBERED_LEN:
            normal.keep(raw_path, True)
        if target is None:
            return ("path", 400, "ambiguous-path", "the path holds a '\\' (raw or encoded), an encoded "
                    "NUL or a malformed escape: servers disagree on what it names")
        if target is not raw_path:
            if self._reject_non_normal:
                return ("path", 400, "non-normal-path",
                        f"the path is not in normal form; send {target.decode('latin-1')}")
            scope["raw_path"] = target
            scope["path"] = unquote(target.decode("latin-1"))
        return None

    def passing_path(self, http_version: str, headers: Headers, raw_path: bytes) -> str | None:
        """The path (decoded, in normal form) the check would let the request go on with, or
        None when it would refuse the request: for the connection's early shed
        (``connection_shed.py``), which leaves every request the check refuses to the check, so
        its answer stays the same."""
        if self._refusal({"http_version": http_version, "headers": headers},
                         HeaderValues(self._read, {})) is not None:
            return None
        target = normal_target(raw_path)
        if target is None or (target is not raw_path and self._reject_non_normal):
            return None
        return unquote(target.decode("latin-1"))

    async def refuse(self, send: Send, problem: Problem) -> None:
        """Answer a refused request (counted, logged, the connection closed)."""
        reason, status, name, detail = problem
        self._refused[reason].inc()
        _log.info("request refused: %s", detail,
                  extra={"event": "request.refused", "reason": reason, "request_id": current_request_id()})
        title = "Expectation Failed" if status == 417 else "Bad Request"
        await self._render.send(send, status=status, type_=problem_type(name), title=title, detail=detail,
                                headers=_CLOSE)

    def _refusal(self, scope: Scope, found: HeaderValues) -> Refusal | None:
        """(reason, status, detail) when the request is ambiguous, else None; ``found`` gets the
        values of the headers the decisions read (see ``HeaderValues``)."""
        values = found.values
        version = scope.get("http_version", "1.1")
        if version not in _VERSIONS:
            return "http_version", 400, f"HTTP/{version} is not served; send HTTP/1.1"
        single = self._single
        read = self._read
        host: bytes | None = None
        for name, value in scope["headers"]:
            if name in read:
                if name in single:
                    if name in values:
                        reason = "host" if name == _HOST else "duplicate_header"
                        return reason, 400, f"more than one {name.decode('latin-1')} header line"
                    values[name] = value
                    if name == _HOST:
                        host = value
                elif name == _XFF:
                    if value:  # several lines form one list
                        values[name] = values[name] + b"," + value if name in values else value
                elif name == _REQUEST_ID:  # the first line decides; more are dropped downstream
                    if name in values:
                        found.request_id_repeated = True
                    else:
                        values[name] = value
                elif name == COOKIE:
                    if value:  # HTTP/2 sends one line per cookie (RFC 9113 §8.2.3): one list
                        values[name] = values[name] + b"; " + value if name in values else value
                else:
                    values[name] = value  # Content-Length: the last line, as the server framed it
            elif name == _EXPECT and value.lower() != _CONTINUE:
                return "expect", 417, "only Expect: 100-continue is supported"
        if self._cookies and COOKIE in values:
            names = cookie_names(values[COOKIE])
            for cookie in self._cookies:
                if names.count(cookie) > 1:
                    # servers disagree on which one counts (the first, or the last)
                    return "duplicate_header", 400, f"more than one {cookie.decode('latin-1')} cookie"
        if host is None:
            if version == "1.1":
                return "host", 400, "an HTTP/1.1 request needs a Host header"
        elif host not in self._hosts:
            if not _HOST_VALUE.fullmatch(host):
                return "host", 400, "the Host header is not host[:port]"
            if len(host) <= _REMEMBERED_LEN:
                self._hosts.keep(host, True)
        return None
