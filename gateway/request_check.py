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
rate limit, the identity and the Idempotency-Key gate read them there, not from the list again.

Each refusal is problem+json, closes the connection (the rest of the request may not be framed
the way the gateway read it) and is counted in ``gateway_requests_refused{reason}``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from urllib.parse import quote, unquote

from gateway._asgi import Scope, Send
from gateway._paths import normal_target
from gateway.config import Config
from gateway.context import HeaderValues, RequestContext
from gateway.identity import header_name
from gateway.metrics import Metrics
from gateway.problem import problem_type, send_problem
from gateway.requestid import current_request_id

__all__ = ["RequestCheck", "decided_headers"]

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


def decided_headers(config: Config) -> frozenset[bytes]:
    """The lowercase names of the headers a decision reads, each allowed one line."""
    names = {_HOST, config.idempotency.header.lower().encode("latin-1")}
    keys: Iterable[str] = (*config.identity.sources, *(p.key for p in config.rate_limits),
                           *(c.key for c in config.concurrency_limits))
    names |= {header_name(k) for k in keys if k.startswith("header:")}
    return frozenset(names)


class RequestCheck:
    """The check itself, for the stack's entry layer to run inline (no layer of its own)."""

    def __init__(self, config: Config, *, metrics: Metrics) -> None:
        self._single = decided_headers(config)
        self._read = self._single | {_CONTENT_LENGTH, _XFF}
        self._reject_non_normal = config.request.path_normalization == "reject"
        self._refused = metrics.refused

    async def admit(self, scope: Scope, send: Send, ctx: RequestContext) -> Scope | None:
        """The scope to go on with (its path in normal form), or None once a refusal is sent;
        the values of the headers the decisions read go into ``ctx.headers``."""
        values: dict[bytes, bytes] = {}
        refusal = self._refusal(scope.get("http_version", "1.1"), scope["headers"], values)
        ctx.headers = HeaderValues(self._read, values)
        if refusal is not None:
            reason, status, detail = refusal
            name = "expectation-failed" if status == 417 else "ambiguous-request"
            await self._refuse(send, reason, status, name, detail)
            return None
        # a server that gives no raw_path: the path as it would be sent (the proxy does the same)
        raw_path: bytes = scope.get("raw_path") or quote(scope["path"]).encode("ascii")
        target = normal_target(raw_path)
        if target is None:
            await self._refuse(send, "path", 400, "ambiguous-path",
                               "the path holds a '\\' (raw or encoded), an encoded NUL or a malformed "
                               "escape: servers disagree on what it names")
            return None
        if target is not raw_path:
            if self._reject_non_normal:
                await self._refuse(send, "path", 400, "non-normal-path",
                                   f"the path is not in normal form; send {target.decode('latin-1')}")
                return None
            scope = {**scope, "raw_path": target, "path": unquote(target.decode("latin-1"))}
        return scope

    def passing_path(self, http_version: str, headers: Iterable[tuple[bytes, bytes]],
                     raw_path: bytes) -> str | None:
        """The path (decoded, in normal form) ``admit`` would go on with, or None when it would
        refuse the request: for the connection's early shed (``connection_shed.py``), which
        leaves every request the check refuses to the check, so its answer stays the same."""
        if self._refusal(http_version, headers, {}) is not None:
            return None
        target = normal_target(raw_path)
        if target is None or (target is not raw_path and self._reject_non_normal):
            return None
        return unquote(target.decode("latin-1"))

    async def _refuse(self, send: Send, reason: str, status: int, name: str, detail: str) -> None:
        self._refused[reason].inc()
        _log.info("request refused: %s", detail,
                  extra={"event": "request.refused", "reason": reason, "request_id": current_request_id()})
        title = "Expectation Failed" if status == 417 else "Bad Request"
        await send_problem(send, status=status, type_=problem_type(name), title=title, detail=detail,
                           headers=_CLOSE)

    def _refusal(self, version: str, headers: Iterable[tuple[bytes, bytes]],
                 values: dict[bytes, bytes]) -> tuple[str, int, str] | None:
        """(reason, status, detail) when the request is ambiguous, else None; ``values`` gets the
        values of the headers the decisions read (see ``HeaderValues``)."""
        if version not in _VERSIONS:
            return "http_version", 400, f"HTTP/{version} is not served; send HTTP/1.1"
        single = self._single
        read = self._read
        host: bytes | None = None
        for name, value in headers:
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
                else:
                    values[name] = value  # Content-Length: the last line, as the server framed it
            elif name == _EXPECT and value.lower() != _CONTINUE:
                return "expect", 417, "only Expect: 100-continue is supported"
        if host is None:
            if version == "1.1":
                return "host", 400, "an HTTP/1.1 request needs a Host header"
        elif not _HOST_VALUE.fullmatch(host):
            return "host", 400, "the Host header is not host[:port]"
        return None
