"""ProxyApp: the innermost app of ``gateway serve``, forwarding to ``[upstream].url`` over aiohttp.

The only module that imports the HTTP client (aiohttp, chosen over httpx by measurement:
``loadtests/results/proxy-clients.md``). One pooled ``ClientSession`` per process, opened at
lifespan startup and closed at shutdown.

What goes upstream (CONTRACT.md "Proxy"): method, raw path (after the upstream URL's own path),
query, headers less the hop-by-hop ones (RFC 9110 §7.6.1: the fixed list plus every header
``Connection`` names), and the body, streamed as it arrives; ``Host`` is the upstream's, and
``X-Forwarded-For/-Proto/-Host`` say who asked. A chain a client sent is extended only when the
client is a trusted proxy; from anyone else it is replaced, so the upstream can believe it.
The response streams back the same way, hop-by-hop headers stripped, bytes untouched (no
decompression, no redirects followed, no cookie jar).

How a failure is answered, and what the idempotency layer is told:

* refused, or no connection within ``connect_timeout``: 502 ``upstream-not-reached``; the request
  certainly never left, so ``mark_not_sent`` frees a keyed request's claim for a retry;
* sent, but no response (or next body bytes) within ``timeout``: 504 ``outcome-unknown``;
* the connection broke before the response started: 502 ``outcome-unknown``;
* the connection broke after it started: the client's response is cut off.

The ambiguous answers are stored by the idempotency layer like any upstream answer, so a retry
gets them replayed and the upstream never sees the request twice. aiohttp's silent retry of
idempotent methods is turned off for the same reason: each failure is classified from the one
attempt that was made.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable
from ipaddress import ip_address, ip_network
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
from yarl import URL

from gateway._asgi import Headers, Message, Receive, Scope, Send
from gateway.config import UpstreamConfig
from gateway.idempotency import mark_not_sent
from gateway.idempotency.middleware import ATTEMPT_SCOPE_KEY, mark_outcome_unknown
from gateway.idempotency.problems import NOT_SENT, OUTCOME_UNKNOWN
from gateway.metrics import Metrics
from gateway.problem import PROBLEM_RENDERER, Renderer, problem_type
from gateway.requestid import current_request_id

__all__ = ["HOP_BY_HOP", "KEEPALIVE_S", "MAX_CONNECTIONS", "ProxyApp", "hop_by_hop"]

_log = logging.getLogger("gateway.proxy")

#: RFC 9110 §7.6.1 and RFC 9112 §9.6: meaningful for one connection only, never forwarded.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization",
    b"te", b"trailer", b"transfer-encoding", b"upgrade",
})
#: An idle upstream connection is closed after this, sooner than common servers (uvicorn, Node:
#: 5 s) close theirs, so a request is rarely written to a connection the upstream just dropped.
KEEPALIVE_S = 4.0
#: Upstream connections one process opens at most; past it a request waits for one, and that wait
#: counts against ``connect_timeout`` (then 502, not sent): back-pressure instead of a flood.
MAX_CONNECTIONS = 1024
# rewritten by the proxy (the forwarding headers, Host), or answered by it: the client's
# "Expect: 100-continue" was already answered by the gateway's own server when it read the body
_REQUEST_ONLY = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"host", b"expect"})
_REQUEST_DROP = HOP_BY_HOP | _REQUEST_ONLY
# other ways of saying who asked: believed (passed on) only from a trusted proxy
_FORWARDING_CLAIMS = frozenset({b"forwarded", b"x-real-ip", b"x-forwarded-port", b"x-forwarded-prefix"})
_BAD_REQUEST = problem_type("bad-request")
# request messages the disconnect watch may skip: a bodiless request's one empty http.request
_UNREAD_MESSAGES = 4
# aiohttp adds these unless told not to; a proxy sends only what the client sent
_SKIP_AUTO = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


def hop_by_hop(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """The lowercase names not to forward: the fixed list plus those ``Connection`` names."""
    named = [
        token.strip().lower()
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.split(b",")
    ]
    return HOP_BY_HOP.union(t for t in named if t) if named else HOP_BY_HOP


class _ClientGone(Exception):
    """The client disconnected while its request body was being forwarded."""


class _Unforwardable(Exception):
    """The request cannot be sent upstream as it is (the message says why)."""


class ProxyApp:
    """ASGI app forwarding every HTTP request to one upstream.

    Args:
        upstream: the ``[upstream]`` section: URL (a path in it prefixes every request's path)
            and timeouts.
        trusted_proxies: CIDRs whose ``X-Forwarded-*`` headers are extended rather than replaced
            (``[identity].trusted_proxies``).
        metrics: where upstream errors are counted; none when None.
        renderer: how the proxy's own answers (400, 502, 504) look (``[errors] format``).
    """

    def __init__(
        self, upstream: UpstreamConfig, *, trusted_proxies: Iterable[str] = (),
        metrics: Metrics | None = None, renderer: Renderer = PROBLEM_RENDERER,
    ) -> None:
        parts = urlsplit(upstream.url)
        # the request's path is appended to this URL's path, never parsed as a URL of its own
        self._scheme, self._authority, self._prefix = parts.scheme, parts.netloc, parts.path.rstrip("/")
        self._upstream = upstream
        self._trusted = tuple(ip_network(n, strict=False) for n in trusted_proxies)
        self._metrics = metrics
        self._render = renderer
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=upstream.connect_timeout_s,  # waiting for a pooled connection counts too
            sock_connect=upstream.connect_timeout_s,
            sock_read=upstream.timeout_s,
        )
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=MAX_CONNECTIONS, keepalive_timeout=KEEPALIVE_S, ttl_dns_cache=10
        )
        session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),  # one client's cookies must never reach another
            skip_auto_headers=_SKIP_AUTO,
            raise_for_status=False,
        )
        # one attempt per request: a silent resend would make "sent or not" unknowable
        session._retry_connection = False
        self._session = session
        return session

    async def close(self) -> None:
        """Close the pooled connections."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._forward(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1003})  # not proxied: refused at handshake

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        """Open the pool at startup, close it at shutdown: the lifespan's two messages."""
        if (await receive())["type"] == "lifespan.startup":
            if self._session is None:
                self._open()
            await send({"type": "lifespan.startup.complete"})
            if (await receive())["type"] != "lifespan.shutdown":
                return
        await self.close()
        await send({"type": "lifespan.shutdown.complete"})

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        session = self._session or self._open()
        try:
            target = self._target(scope)
            headers, has_body = self._request_headers(scope)
        except _Unforwardable as exc:
            await self._render.send(send, status=400, type_=_BAD_REQUEST, title="Bad Request",
                                    detail=str(exc))
            return
        body = _Body(receive) if has_body else None
        try:
            response = await session.request(
                scope["method"], target, headers=headers, data=body.chunks() if body else None,
                allow_redirects=False,
            )
        except _ClientGone:
            return  # nobody to answer; the upstream saw a cut-off request body
        except (aiohttp.ConnectionTimeoutError, aiohttp.ClientConnectorError) as exc:
            mark_not_sent(scope)
            await self._fail(send, "unreachable", exc, status=502, type_=NOT_SENT,
                             title="Upstream unreachable",
                             detail="The upstream could not be reached; the request was not sent.")
            return
        except (aiohttp.ServerTimeoutError, TimeoutError) as exc:
            mark_outcome_unknown(scope)
            await self._fail(send, "timeout", exc, status=504, type_=OUTCOME_UNKNOWN,
                             title="Upstream timed out; outcome unknown",
                             detail=f"The upstream did not answer within {self._upstream.timeout_s:g}s; "
                             "it may or may not have acted on the request.")
            return
        except (aiohttp.ClientError, OSError) as exc:
            if isinstance(exc.__cause__, _ClientGone) or isinstance(exc.__context__, _ClientGone):
                return
            mark_outcome_unknown(scope)
            await self._fail(send, "broken", exc, status=502, type_=OUTCOME_UNKNOWN,
                             title="Upstream connection broken; outcome unknown",
                             detail="The connection to the upstream broke before it answered; it may "
                             "or may not have acted on the request.")
            return
        watch = None
        open_ended = response.content_length is None and scope["method"] != "HEAD"
        if open_ended and (body is None or body.done) and scope.get(ATTEMPT_SCOPE_KEY) is None:
            # an open-ended stream (no Content-Length) could run forever after its client left,
            # and the server drops sends to a gone client silently: close it when the client goes.
            # A keyed request's response is read to the end whatever the client does: it is stored.
            watch = _DisconnectWatch(receive, response)
        try:
            whole = await self._relay(scope, response, send, watch)
        except BaseException:
            response.close()  # mid-body: the connection is out of step, never pooled again
            raise
        finally:
            if watch is not None:
                watch.stop()
        if whole:
            response.release()  # read to the end: the connection goes back to the pool
        else:
            # return without finishing the response: the server closes the client's connection,
            # and the idempotency layer stores the outcome as unknown
            response.close()

    def _target(self, scope: Scope) -> URL:
        """The upstream URL: its path plus the request's raw path and query, bytes unchanged."""
        raw_path = scope.get("raw_path") or quote(scope["path"]).encode()
        if not raw_path.startswith(b"/"):
            # "*", "@host/x", "x/y": only an origin-form target is appended to the upstream's path,
            # so a request can never choose another host
            msg = "the gateway forwards only origin-form request targets (a path starting with /)"
            raise _Unforwardable(msg)
        try:
            return URL.build(scheme=self._scheme, authority=self._authority,
                             path=self._prefix + raw_path.decode("ascii"),
                             query_string=scope["query_string"].decode("ascii"), encoded=True)
        except (UnicodeDecodeError, ValueError) as exc:
            msg = f"the request target cannot be forwarded: {exc}"
            raise _Unforwardable(msg) from None

    def _request_headers(self, scope: Scope) -> tuple[list[tuple[str, str]], bool]:
        """The headers to send upstream, and whether the request has a body."""
        raw: Headers = scope["headers"]
        client = scope.get("client")
        peer = client[0] if client else None
        trusted = peer is not None and self._is_trusted(peer)
        named = hop_by_hop(raw)
        drop = _REQUEST_DROP if named is HOP_BY_HOP else named | _REQUEST_ONLY
        if not trusted:
            drop = drop | _FORWARDING_CLAIMS
        headers: list[tuple[str, str]] = []
        has_body = False
        prior_for = prior_proto = prior_host = host = None
        for name, value in raw:
            if name in drop:
                if name == b"transfer-encoding":
                    has_body = True
                elif name == b"host":
                    host = value
                elif name == b"x-forwarded-for":
                    prior_for = value if prior_for is None else prior_for + b", " + value
                elif name == b"x-forwarded-proto" and prior_proto is None:
                    prior_proto = value
                elif name == b"x-forwarded-host" and prior_host is None:
                    prior_host = value
                continue
            if name == b"content-length" and value.strip() not in (b"", b"0"):
                has_body = True
            try:
                # aiohttp writes header lines as UTF-8: only a UTF-8 value goes out byte for byte
                headers.append((name.decode("latin-1"), value.decode("utf-8")))
            except UnicodeDecodeError:
                msg = f"the {name.decode('latin-1')} header is not UTF-8 and cannot be forwarded unchanged"
                raise _Unforwardable(msg) from None
        chain = [] if not trusted or prior_for is None else [prior_for.decode("latin-1")]
        if peer is not None:
            chain.append(peer)
        if chain:
            headers.append(("X-Forwarded-For", ", ".join(chain)))
        proto = prior_proto if trusted and prior_proto else scope.get("scheme", "http").encode()
        headers.append(("X-Forwarded-Proto", proto.decode("latin-1")))
        fwd_host = prior_host if trusted and prior_host else host
        if fwd_host:
            headers.append(("X-Forwarded-Host", fwd_host.decode("latin-1")))
        return headers, has_body

    def _is_trusted(self, peer: str) -> bool:
        if not self._trusted:
            return False
        try:
            address = ip_address(peer)
        except ValueError:
            return False
        return any(address in net for net in self._trusted)

    async def _relay(
        self, scope: Scope, response: aiohttp.ClientResponse, send: Send, watch: _DisconnectWatch | None
    ) -> bool:
        """Stream the upstream's response to the client; False when it broke off mid-body (or
        the client left)."""
        raw = response.raw_headers
        drop = hop_by_hop(raw)
        headers = [(n.lower(), v) for n, v in raw if n.lower() not in drop]
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        if scope["method"] == "HEAD":
            await send({"type": "http.response.body", "body": b""})
            return True
        content = response.content
        try:
            while True:
                chunk = await content.readany()
                if not chunk:
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            if watch is not None and watch.gone:
                return False  # the client left and the watch closed the stream: not the upstream's fault
            kind = "timeout" if isinstance(exc, TimeoutError) else "broken"
            self._count(kind)
            _log.warning("upstream response broke off; the client's response is cut short",
                         extra={"event": f"upstream.{kind}", "request_id": current_request_id(),
                                "error": _describe(exc)})
            return False
        await send({"type": "http.response.body", "body": b""})
        return True

    async def _fail(self, send: Send, kind: str, exc: BaseException, **problem: Any) -> None:
        self._count(kind)
        _log.warning("upstream %s", kind, extra={
            "event": f"upstream.{kind}", "request_id": current_request_id(), "upstream": self._upstream.url,
            "error": _describe(exc),
        })
        await self._render.send(send, **problem)

    def _count(self, kind: str) -> None:
        if self._metrics is not None:
            self._metrics.upstream_error[kind].inc()


class _Body:
    """The request body as it arrives, without keeping it; ``done`` once it all went."""

    __slots__ = ("done", "receive")

    def __init__(self, receive: Receive) -> None:
        self.receive = receive
        self.done = False

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            message: Message = await self.receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                self.done = True
                return


class _DisconnectWatch:
    """Closes the upstream response when the client disconnects: after the request body (a
    bodiless request still has its one empty ``http.request`` to read), the next message is
    ``http.disconnect``."""

    __slots__ = ("_task", "gone")

    def __init__(self, receive: Receive, response: aiohttp.ClientResponse) -> None:
        self.gone = False
        self._task = asyncio.ensure_future(self._watch(receive, response))

    async def _watch(self, receive: Receive, response: aiohttp.ClientResponse) -> None:
        for _ in range(_UNREAD_MESSAGES):
            message = await receive()
            if message["type"] == "http.disconnect":
                self.gone = True
                response.close()
                return

    def stop(self) -> None:
        self._task.cancel()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

