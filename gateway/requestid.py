"""X-Request-Id: take a well-formed one from the request or make one; echo it on every response.

The id is sent downstream (the app or the upstream sees it in the request headers) and kept in
a ContextVar for the log lines the gateway writes. A malformed id (over 128 characters, or a
character outside ``A-Z a-z 0-9 . _ ~ : / + = @ -``) is replaced, which keeps log lines clean.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextvars import ContextVar, Token
from random import getrandbits

from gateway._asgi import ASGIApp, Message, Receive, Scope, Send

__all__ = ["RequestIdMiddleware", "bind_request_id", "current_request_id", "current_request_line",
           "new_request_id", "sending_request_id", "take_request_id", "unbind_request_id", "valid_request_id",
           "with_request_id"]

HEADER = b"x-request-id"
_HEADER_LEN = len(HEADER)
_MAX_LEN = 128
_ALLOWED = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._~:/+=@-"
# the request being handled: its id as the header's bytes (decoded only when a log line or a
# problem asks for it) and its scope, whose method and path log lines name
_request: ContextVar[tuple[bytes, Scope | None] | None] = ContextVar("gateway_request", default=None)


def current_request_id() -> str | None:
    """The id of the request being handled, when ``RequestIdMiddleware`` is in the stack."""
    bound = _request.get()
    return bound[0].decode("ascii") if bound is not None else None


def current_request_line() -> tuple[str, str] | None:
    """The method and path of the request being handled (as bound with its id), for log lines."""
    bound = _request.get()
    if bound is None or bound[1] is None:
        return None
    scope = bound[1]
    return scope.get("method", ""), scope.get("path", "")


def bind_request_id(rid: bytes, scope: Scope | None = None) -> Token[tuple[bytes, Scope | None] | None]:
    """Make ``rid`` (a valid id: ASCII) the current request's id, for log lines and problems,
    until the token is reset; ``scope``: the request, whose method and path log lines name."""
    return _request.set((rid, scope))


def unbind_request_id(token: Token[tuple[bytes, Scope | None] | None]) -> None:
    """Back to the id that was current before ``bind_request_id``."""
    _request.reset(token)


def new_request_id() -> bytes:
    """128 random bits, hex: unique without coordination between processes. From ``random``
    (seeded from the OS, and again in each forked worker), not ``os.urandom``: an id is no
    secret, and a system call per request is measurable on the hot path."""
    return b"%032x" % getrandbits(128)


def valid_request_id(value: bytes) -> bool:
    """1-128 characters of the contract's safe set (a C-speed check, no regex)."""
    return 0 < len(value) <= _MAX_LEN and not value.translate(None, _ALLOWED)


def take_request_id(scope: Scope) -> tuple[bytes, Scope]:
    """The request's id (its own when well formed, else a new one) and the scope to pass on:
    downstream sees exactly one, well-formed ``X-Request-Id`` line (the first line decides)."""
    given = None
    lines = 0
    for name, value in scope["headers"]:
        if name == HEADER:
            lines += 1
            if given is None:
                given = value
    rid = given if given is not None and valid_request_id(given) else new_request_id()
    if rid is not given or lines > 1:
        headers = [h for h in scope["headers"] if h[0] != HEADER]
        headers.append((HEADER, rid))
        scope = {**scope, "headers": headers}
    return rid, scope


def with_request_id(headers: Iterable[tuple[bytes, bytes]], rid: bytes) -> list[tuple[bytes, bytes]]:
    """Response headers with exactly one ``X-Request-Id``: ``rid`` (an app's own is replaced)."""
    out = list(headers)
    for name, _ in out:
        if len(name) == _HEADER_LEN and name.lower() == HEADER:  # rare: the app set its own
            out = [h for h in out if h[0].lower() != HEADER]
            break
    out.append((HEADER, rid))
    return out


def sending_request_id(send: Send, rid: bytes) -> Send:
    """``send`` with exactly one ``X-Request-Id`` (``rid``) on the response start."""

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = with_request_id(message.get("headers", ()), rid)
        await send(message)

    return sending


class RequestIdMiddleware:
    """Pure ASGI: every HTTP response carries ``X-Request-Id``, the same one sent downstream."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid, scope = take_request_id(scope)
        token = bind_request_id(rid, scope)
        try:
            await self.app(scope, receive, sending_request_id(send, rid))
        finally:
            unbind_request_id(token)
