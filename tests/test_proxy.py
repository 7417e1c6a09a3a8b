"""ProxyApp in-process against a real upstream socket: headers, URL, bodies, failures, full stack.

The client side runs in the test (httpx.ASGITransport, or a raw ASGI driver where the exact
messages matter); the upstream is a real aiohttp server, or a raw asyncio server for broken
exchanges, on a free 127.0.0.1 port in the test's own event loop, so the proxy's pooled aiohttp
client talks to a real socket. ``tests/test_serve_e2e.py`` covers ``gateway serve`` as a process.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import itertools
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from aiohttp import ClientPayloadError, web

from gateway.config import UpstreamConfig, load_config
from gateway.metrics import Metrics
from gateway.proxy import HOP_BY_HOP, ProxyApp, hop_by_hop
from gateway.requestid import RequestIdMiddleware
from gateway.server import build_app
from gateway.stack import GatewayMiddleware
from tests import asgi_helpers as helpers
from tests.asgi_helpers import PROBLEM, client_for, lifespan_running, poll
from tests.redis_process import HOST, free_port

NOT_REACHED = "upstream-not-reached"
UNKNOWN = "outcome-unknown"
CLIENT = ("203.0.113.7", 4321)
KEY = "Idempotency-Key"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Headers = list[tuple[bytes, bytes]]


# --------------------------------------------------------------------------------------------
# a real upstream, a broken one, a raw ASGI driver
# --------------------------------------------------------------------------------------------


@dataclass
class Seen:
    """One request as the upstream received it."""

    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body: bytes

    def values(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def raw(self, name: str) -> list[bytes]:
        """The values as the bytes on the wire."""
        return [v.encode("latin-1") for v in self.values(name)]

    def one(self, name: str) -> str | None:
        values = self.values(name)
        assert len(values) <= 1, (name, values)
        return values[0] if values else None


class Upstream:
    """An aiohttp server on 127.0.0.1 that records every request; ``routes`` override the
    default answer (200 ``ok``) per path."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.seen: list[Seen] = []
        self.routes: dict[str, Handler] = {}
        self.release = asyncio.Event()  # what the slow handlers wait for (bounded)
        self.started = 0
        self.finished = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    async def start(self) -> Upstream:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, HOST, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def record(self, request: web.Request, body: bytes | None = None) -> Seen:
        seen = Seen(
            request.method,
            request.raw_path,
            [(n.decode("latin-1"), v.decode("latin-1")) for n, v in request.raw_headers],
            await request.read() if body is None else body,
        )
        self.seen.append(seen)
        return seen

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        handler = self.routes.get(request.path)
        if handler is not None:
            return await handler(request)
        await self.record(request)
        return web.Response(text="ok")

    async def slow(self, request: web.Request) -> web.StreamResponse:
        """Records the start, waits (at most 10 s) for ``release``, records the end, 201."""
        await self.record(request)
        self.started += 1
        async with asyncio.timeout(10):
            await self.release.wait()
        self.finished += 1
        return web.Response(status=201, text="done")


@asynccontextmanager
async def upstream_running(port: int = 0) -> AsyncIterator[Upstream]:
    up = await Upstream(port).start()
    try:
        yield up
    finally:
        await up.stop()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with upstream_running() as up:
        yield up


class RawUpstream:
    """A TCP server that, on each connection, reads requests (head and Content-Length body) and
    answers them with ``replies`` in turn; at a None, or when they run out, it closes."""

    def __init__(self, *replies: bytes | None) -> None:
        self.replies = replies or (None,)
        self.connections = 0
        self.requests: list[bytes] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    async def __aenter__(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._handle, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            async with asyncio.timeout(10):
                for reply in self.replies:
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = 0
                    for line in head.split(b"\r\n"):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":", 1)[1])
                    body = await reader.readexactly(length) if length else b""
                    self.requests.append(head + body)
                    if reply is None:
                        break
                    writer.write(reply)
                    await writer.drain()
        except asyncio.IncompleteReadError:
            pass  # the client closed the connection
        finally:
            writer.close()
            await writer.wait_closed()


@dataclass
class Reply:
    """What a raw ASGI call sent back, message by message."""

    messages: list[dict[str, Any]] = field(default_factory=list)

    @property
    def status(self) -> int:
        starts = [m for m in self.messages if m["type"] == "http.response.start"]
        assert len(starts) == 1, self.messages
        return int(starts[0]["status"])

    @property
    def status_code(self) -> int:  # what an httpx response calls it
        return self.status

    @property
    def headers(self) -> httpx.Headers:
        (start,) = [m for m in self.messages if m["type"] == "http.response.start"]
        return httpx.Headers([(bytes(n), bytes(v)) for n, v in start["headers"]])

    @property
    def bodies(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["type"] == "http.response.body"]

    @property
    def content(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.bodies)

    @property
    def complete(self) -> bool:
        """The last body message said no more body follows."""
        return bool(self.bodies) and not self.bodies[-1].get("more_body", False)


async def drive(
    app: Any,
    *,
    method: str = "GET",
    raw_path: bytes = b"/",
    query: bytes = b"",
    headers: Sequence[tuple[bytes, bytes]] = ((b"host", b"gateway.test"),),
    chunks: Sequence[bytes] = (b"",),
    client: tuple[str, int] | None = CLIENT,
    receive: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    into: Reply | None = None,
) -> Reply:
    """One HTTP request straight through ``app``: exactly ``headers`` (nothing added), the body
    as ``chunks``; a receive past the body waits for the request to end, then disconnects."""
    reply = Reply() if into is None else into
    pending = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
               for i, c in enumerate(chunks)]
    done = asyncio.Event()

    async def receive_chunks() -> dict[str, Any]:
        if pending:
            return pending.pop(0)
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        reply.messages.append(dict(message))

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": unquote(raw_path.decode()), "raw_path": raw_path,
        "query_string": query, "root_path": "", "headers": list(headers), "client": client,
        "server": ("gateway.test", 80),
    }
    try:
        await app(scope, receive or receive_chunks, send)
    finally:
        done.set()
    return reply


@asynccontextmanager
async def proxying(
    url: str, *, timeout_s: float = 10.0, connect_timeout_s: float = 2.0,
    trusted: Sequence[str] = (), metrics: Metrics | None = None,
) -> AsyncIterator[ProxyApp]:
    """A ProxyApp to ``url``, its session closed afterwards."""
    proxy = ProxyApp(UpstreamConfig(url=url, connect_timeout_s=connect_timeout_s, timeout_s=timeout_s),
                     trusted_proxies=trusted, metrics=metrics)
    try:
        yield proxy
    finally:
        await proxy.close()




def stack(upstream_url: str, store: dict[str, Any], **upstream: Any) -> GatewayMiddleware:
    """``build_app`` for ``upstream_url`` on the ``[store]`` section ``store``."""
    config = load_config({"upstream": {"url": upstream_url, **upstream}, "store": store}, env={})
    return build_app(config)


def assert_problem(r: httpx.Response | Reply, status: int, type_name: str) -> dict[str, Any]:
    """``r`` is the gateway's own problem+json with this status and type (a raw reply, whole)."""
    if isinstance(r, Reply):
        assert r.complete
    return helpers.assert_problem(r, status, PROBLEM + type_name)


def events(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == event]


def upstream_errors(metrics: Metrics, kind: str) -> float:
    return metrics.registry.get_sample_value("gateway_upstream_errors_total", {"kind": kind}) or 0.0


# --------------------------------------------------------------------------------------------
# hop_by_hop()
# --------------------------------------------------------------------------------------------


class TestHopByHop:
    def test_fixed_list_without_connection_header(self) -> None:
        """With no Connection header the set is exactly RFC 9110's fixed list."""
        assert hop_by_hop([(b"x-a", b"1")]) == HOP_BY_HOP
        assert {b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
                b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade"} == HOP_BY_HOP

    def test_connection_tokens_added_lowercase(self) -> None:
        """Tokens Connection names are added lowercase, trimmed, from every Connection line;
        empty tokens are ignored."""
        got = hop_by_hop([
            (b"Connection", b"X-Secret ,  , Keep-Alive,,x-other"),
            (b"x-a", b"1"),
            (b"CONNECTION", b"  X-Third"),
        ])
        assert got == HOP_BY_HOP | {b"x-secret", b"x-other", b"x-third"}
        assert b"" not in got

    def test_only_commas_add_nothing(self) -> None:
        """A Connection header of only commas and spaces adds no name."""
        assert hop_by_hop([(b"connection", b" , ,")]) == HOP_BY_HOP


# --------------------------------------------------------------------------------------------
# request headers
# --------------------------------------------------------------------------------------------


class TestRequestHeaders:
    async def test_hop_by_hop_and_connection_named_headers_stripped(self, upstream: Upstream) -> None:
        """Hop-by-hop headers and every header Connection names stay behind; the rest go upstream."""
        async with proxying(upstream.url) as proxy:
            r = await drive(proxy, headers=[
                (b"host", b"gateway.test"), (b"connection", b"close, X-Secret"), (b"x-secret", b"s"),
                (b"keep-alive", b"timeout=5"), (b"te", b"trailers"), (b"trailer", b"x-t"),
                (b"upgrade", b"h2c"), (b"proxy-authorization", b"Basic eA=="),
                (b"proxy-connection", b"keep-alive"), (b"x-kept", b"yes"),
            ])
        assert r.status == 200
        (seen,) = upstream.seen
        names = {n.lower() for n, _ in seen.headers}
        for name in ("x-secret", "keep-alive", "te", "trailer", "upgrade", "proxy-authorization",
                     "proxy-connection"):
            assert name not in names, seen.headers
        assert seen.values("connection") == []
        assert seen.one("x-kept") == "yes"

    async def test_host_is_the_upstreams(self, upstream: Upstream) -> None:
        """Host sent upstream is the upstream URL's host:port, once; the client's goes to X-Forwarded-Host."""
        async with proxying(upstream.url) as proxy, client_for(proxy) as c:
            r = await c.get("/x", headers={"Host": "public.example"})
        assert r.status_code == 200
        (seen,) = upstream.seen
        assert seen.values("host") == [f"{HOST}:{upstream.port}"]
        assert seen.one("x-forwarded-host") == "public.example"

    async def test_forwarded_for_is_the_client_address(self, upstream: Upstream) -> None:
        """X-Forwarded-For is the ASGI client address; X-Forwarded-Proto the scope's scheme."""
        async with proxying(upstream.url) as proxy, client_for(proxy, "198.51.100.9") as c:
            await c.get("/")
        (seen,) = upstream.seen
        assert seen.values("x-forwarded-for") == ["198.51.100.9"]
        assert seen.values("x-forwarded-proto") == ["http"]

    async def test_untrusted_peer_cannot_forge_the_chain(self, upstream: Upstream) -> None:
        """From an untrusted peer, X-Forwarded-For/-Proto/-Host the client sent are replaced."""
        async with proxying(upstream.url, trusted=["10.0.0.0/8"]) as proxy:
            await drive(proxy, headers=[
                (b"host", b"real.example"), (b"x-forwarded-for", b"1.2.3.4"),
                (b"x-forwarded-proto", b"https"), (b"x-forwarded-host", b"forged.example"),
            ])
        (seen,) = upstream.seen
        assert seen.values("x-forwarded-for") == ["203.0.113.7"]
        assert seen.values("x-forwarded-proto") == ["http"]
        assert seen.values("x-forwarded-host") == ["real.example"]

    async def test_trusted_peer_chain_is_extended(self, upstream: Upstream) -> None:
        """From a trusted peer, the chain is extended with the peer and its Proto/Host are kept."""
        async with proxying(upstream.url, trusted=["203.0.113.0/24"]) as proxy:
            await drive(proxy, headers=[
                (b"host", b"lb.internal"), (b"x-forwarded-for", b"1.2.3.4"),
                (b"x-forwarded-proto", b"https"), (b"x-forwarded-host", b"shop.example"),
            ])
        (seen,) = upstream.seen
        assert seen.values("x-forwarded-for") == ["1.2.3.4, 203.0.113.7"]
        assert seen.values("x-forwarded-proto") == ["https"]
        assert seen.values("x-forwarded-host") == ["shop.example"]

    async def test_trusted_peer_without_forwarded_headers(self, upstream: Upstream) -> None:
        """A trusted peer that sent no X-Forwarded-* gets them made from its own request."""
        async with proxying(upstream.url, trusted=["203.0.113.0/24"]) as proxy:
            await drive(proxy, headers=[(b"host", b"lb.internal")])
        (seen,) = upstream.seen
        assert seen.values("x-forwarded-for") == ["203.0.113.7"]
        assert seen.values("x-forwarded-proto") == ["http"]
        assert seen.values("x-forwarded-host") == ["lb.internal"]

    async def test_trusted_peer_xff_lines_are_joined(self, upstream: Upstream) -> None:
        """Several X-Forwarded-For lines from a trusted peer become one chain, in order, then the peer."""
        async with proxying(upstream.url, trusted=["203.0.113.7/32"]) as proxy:
            await drive(proxy, headers=[
                (b"host", b"h"), (b"x-forwarded-for", b"1.1.1.1"), (b"x-other", b"o"),
                (b"x-forwarded-for", b"2.2.2.2, 3.3.3.3"),
            ])
        (seen,) = upstream.seen
        assert seen.values("x-forwarded-for") == ["1.1.1.1, 2.2.2.2, 3.3.3.3, 203.0.113.7"]

    async def test_repeated_headers_keep_their_order(self, upstream: Upstream) -> None:
        """Repeated ordinary headers arrive as separate lines in the order sent."""
        async with proxying(upstream.url) as proxy:
            await drive(proxy, headers=[
                (b"host", b"h"), (b"x-multi", b"one"), (b"x-between", b"b"), (b"x-multi", b"two"),
                (b"x-multi", b"three"),
            ])
        (seen,) = upstream.seen
        assert seen.values("x-multi") == ["one", "two", "three"]
        names = [n.lower() for n, _ in seen.headers]
        assert names.index("x-between") < names.index("x-multi", names.index("x-multi") + 1)

    async def test_nothing_added_the_client_did_not_send(self, upstream: Upstream) -> None:
        """No User-Agent, Accept, Accept-Encoding or Content-Type is added when the client sent none."""
        async with proxying(upstream.url) as proxy:
            get = await drive(proxy, headers=[(b"host", b"h")])
            post = await drive(proxy, method="POST", headers=[(b"host", b"h"), (b"content-length", b"3")],
                               chunks=[b"abc"])
        assert (get.status, post.status) == (200, 200)
        for seen in upstream.seen:
            names = {n.lower() for n, _ in seen.headers}
            assert not names & {"user-agent", "accept", "accept-encoding", "content-type", "cookie"}, seen
        assert upstream.seen[1].body == b"abc"

    async def test_client_user_agent_passes_unchanged(self, upstream: Upstream) -> None:
        """A User-Agent and Accept-Encoding the client sent reach the upstream unchanged, once."""
        async with proxying(upstream.url) as proxy:
            await drive(proxy, headers=[(b"host", b"h"), (b"user-agent", b"curl/8.0"),
                                        (b"accept-encoding", b"br")])
        (seen,) = upstream.seen
        assert seen.values("user-agent") == ["curl/8.0"]
        assert seen.values("accept-encoding") == ["br"]

    async def test_utf8_header_value_bytes_unchanged(self, upstream: Upstream) -> None:
        """A header value with UTF-8 bytes (obs-text, which uvicorn accepts) reaches the upstream
        byte for byte, not re-encoded."""
        value = "café ☕".encode()
        async with proxying(upstream.url) as proxy:
            r = await drive(proxy, headers=[(b"host", b"h"), (b"x-name", value)])
        assert r.status == 200
        (seen,) = upstream.seen
        assert seen.raw("x-name") == [value]

    async def test_non_utf8_header_value_is_a_400(self, upstream: Upstream) -> None:
        """A header value that is not UTF-8 (which the client library would re-encode) is a 400
        problem naming the header, and nothing goes upstream."""
        async with proxying(upstream.url) as proxy:
            r = await drive(proxy, headers=[(b"host", b"h"), (b"x-name", b"caf\xe9")])
        assert r.status == 400
        problem = json.loads(r.content)
        assert problem["type"] == "urn:gateway:problem:bad-request"
        assert "x-name" in problem["detail"]
        assert upstream.seen == []

    @pytest.mark.parametrize("trusted", [False, True], ids=["untrusted", "trusted"])
    async def test_other_forwarding_claims_only_from_a_trusted_peer(
        self, upstream: Upstream, trusted: bool
    ) -> None:
        """Forwarded, X-Real-IP, X-Forwarded-Port and -Prefix pass only from a trusted proxy."""
        claims = [(b"forwarded", b"for=1.2.3.4"), (b"x-real-ip", b"1.2.3.4"),
                  (b"x-forwarded-port", b"443"), (b"x-forwarded-prefix", b"/shop")]
        async with proxying(upstream.url, trusted=["203.0.113.0/24"] if trusted else []) as proxy:
            await drive(proxy, headers=[(b"host", b"h"), *claims])
        (seen,) = upstream.seen
        for name, value in claims:
            assert seen.raw(name.decode()) == ([value] if trusted else []), name


# --------------------------------------------------------------------------------------------
# URL
# --------------------------------------------------------------------------------------------


class TestURL:
    @pytest.mark.parametrize(("base", "path", "expected"), [
        ("/base/", b"/x", "/base/x"),
        ("/base", b"/x/y", "/base/x/y"),
        ("/base/", b"/", "/base/"),
        ("", b"/x", "/x"),
    ])
    async def test_path_prefix(self, upstream: Upstream, base: str, path: bytes, expected: str) -> None:
        """The upstream URL's path prefixes the request's path, with one slash between them."""
        async with proxying(upstream.url + base) as proxy:
            r = await drive(proxy, raw_path=path)
        assert r.status == 200
        assert [s.raw_path for s in upstream.seen] == [expected]

    @pytest.mark.parametrize(("raw_path", "query"), [
        (b"/a%2Fb", b"q=%20&x=1"),
        (b"/a%2fb/%7e/%zz;p=1", b"e=%C3%A9&plus=a+b&empty=&&raw=%2F"),
        (b"/sp%20ace/", b"q"),
    ])
    async def test_path_and_query_byte_exact(self, upstream: Upstream, raw_path: bytes, query: bytes) -> None:
        """The raw path and query reach the upstream byte for byte: no decoding, no re-encoding."""
        async with proxying(upstream.url) as proxy:
            r = await drive(proxy, raw_path=raw_path, query=query)
        assert r.status == 200
        assert [s.raw_path for s in upstream.seen] == [(raw_path + b"?" + query).decode()]

    async def test_asterisk_form_is_answered(self, upstream: Upstream) -> None:
        """OPTIONS * (asterisk-form, which uvicorn passes as raw_path b"*") gets a complete answer
        instead of an exception, and nothing odd like "/*" or "/base*" goes upstream."""
        async with proxying(upstream.url + "/base") as proxy:
            r = await drive(proxy, method="OPTIONS", raw_path=b"*")
        assert r.complete
        assert r.status == 400  # only origin-form targets are forwarded
        assert upstream.seen == []

    @pytest.mark.parametrize("target", ["@{host}:{port}/x", "x/y"], ids=["userinfo-trick", "relative"])
    async def test_target_not_origin_form_stays_on_the_upstream(
        self, upstream: Upstream, target: str
    ) -> None:
        """A raw path not starting with "/" (uvicorn's h11 passes such targets through) never sends
        the request to another host, and is answered rather than raised."""
        async with upstream_running() as other, proxying(upstream.url) as proxy:
            raw_path = target.format(host=HOST, port=other.port).encode()
            r = await drive(proxy, raw_path=raw_path)
        assert other.seen == [], "the request went to a host other than the upstream"
        assert r.complete
        assert r.status == 400
        assert upstream.seen == []

    async def test_httpx_client_percent_encoding_survives(self, upstream: Upstream) -> None:
        """Through an httpx client, /a%2Fb?q=%20&x=1 reaches the upstream as sent."""
        async with proxying(upstream.url + "/base/") as proxy, client_for(proxy) as c:
            await c.get("/a%2Fb?q=%20&x=1")
        assert [s.raw_path for s in upstream.seen] == ["/base/a%2Fb?q=%20&x=1"]


# --------------------------------------------------------------------------------------------
# bodies
# --------------------------------------------------------------------------------------------


class TestBodies:
    async def test_content_length_body_forwarded_with_its_length(self, upstream: Upstream) -> None:
        """A body with Content-Length goes upstream with that Content-Length, not chunked."""
        body = bytes(range(256)) * 100
        async with proxying(upstream.url) as proxy, client_for(proxy) as c:
            r = await c.post("/up", content=body)
        assert r.status_code == 200
        (seen,) = upstream.seen
        assert seen.body == body
        assert seen.values("content-length") == [str(len(body))]
        assert seen.values("transfer-encoding") == []

    async def test_chunked_body_streamed(self, upstream: Upstream) -> None:
        """A body without Content-Length goes upstream chunked, intact."""
        parts = [b"alpha-" * 1000, b"beta-" * 10, b"gamma"]

        async def gen() -> AsyncIterator[bytes]:
            for p in parts:
                yield p

        async with proxying(upstream.url) as proxy, client_for(proxy) as c:
            r = await c.post("/up", content=gen())
        assert r.status_code == 200
        (seen,) = upstream.seen
        assert seen.body == b"".join(parts)
        assert seen.values("transfer-encoding") == ["chunked"]
        assert seen.values("content-length") == []

    async def test_get_without_body_sends_no_body(self, upstream: Upstream) -> None:
        """A GET without a body goes upstream with neither Content-Length nor Transfer-Encoding."""
        async with proxying(upstream.url) as proxy:
            r = await drive(proxy, headers=[(b"host", b"h")])
        assert r.status == 200
        (seen,) = upstream.seen
        assert seen.values("content-length") == []
        assert seen.values("transfer-encoding") == []
        assert seen.body == b""

    async def test_empty_post_sends_one_zero_length(self, upstream: Upstream) -> None:
        """A POST with Content-Length: 0 goes upstream with exactly one Content-Length: 0."""
        async with proxying(upstream.url) as proxy:
            r = await drive(proxy, method="POST", headers=[(b"host", b"h"), (b"content-length", b"0")])
        assert r.status == 200
        (seen,) = upstream.seen
        assert seen.values("content-length") == ["0"]
        assert seen.values("transfer-encoding") == []

    async def test_response_streamed_back_in_chunks(self, upstream: Upstream) -> None:
        """An upstream response written in pieces reaches the client piece by piece (each before
        the upstream writes the next), intact, the last body message final."""
        pieces = [b"first-" * 2000, b"second-" * 2000, b"third"]
        reply = Reply()
        held_back = False

        async def stream(request: web.Request) -> web.StreamResponse:
            nonlocal held_back
            response = web.StreamResponse(status=200, headers={"Content-Type": "application/octet-stream"})
            await response.prepare(request)
            total = 0
            for p in pieces:
                await response.write(p)
                total += len(p)
                try:
                    await poll(lambda: len(reply.content) >= total, deadline_s=5)  # noqa: B023
                except AssertionError:
                    held_back = True  # the proxy did not pass this piece on by itself
            await response.write_eof()
            return response

        upstream.routes["/stream"] = stream
        async with proxying(upstream.url) as proxy:
            await drive(proxy, raw_path=b"/stream", into=reply)
        assert not held_back, "the proxy buffered the response"
        assert reply.status == 200
        assert reply.content == b"".join(pieces)
        assert reply.complete
        assert len([m for m in reply.bodies if m.get("body")]) >= len(pieces)

    async def test_head_returns_headers_without_body(self, upstream: Upstream) -> None:
        """HEAD comes back with the upstream's headers (its Content-Length) and no body."""

        async def head(request: web.Request) -> web.StreamResponse:
            return web.Response(body=b"x" * 1234, headers={"X-Up": "1"})

        upstream.routes["/h"] = head
        async with proxying(upstream.url) as proxy:
            r = await drive(proxy, method="HEAD", raw_path=b"/h")
        assert r.status == 200
        assert r.headers["content-length"] == "1234"
        assert r.headers["x-up"] == "1"
        assert r.content == b""
        assert r.complete

    async def test_gzip_passes_through_compressed(self, upstream: Upstream) -> None:
        """A gzip'd response arrives with Content-Encoding kept and the compressed bytes unchanged."""
        compressed = gzip.compress(b"hello gateway " * 500)

        async def gz(request: web.Request) -> web.StreamResponse:
            return web.Response(body=compressed, headers={"Content-Encoding": "gzip",
                                                          "Content-Type": "text/plain"})

        upstream.routes["/gz"] = gz
        async with proxying(upstream.url) as proxy:
            r = await drive(proxy, raw_path=b"/gz", headers=[(b"host", b"h"), (b"accept-encoding", b"gzip")])
        assert r.status == 200
        assert r.headers["content-encoding"] == "gzip"
        assert r.headers["content-length"] == str(len(compressed))
        assert r.content == compressed

    async def test_redirect_is_not_followed(self, upstream: Upstream) -> None:
        """A 302 goes back to the client as is; its Location is never fetched."""

        async def redirect(request: web.Request) -> web.StreamResponse:
            await upstream.record(request)
            return web.Response(status=302, headers={"Location": "/target"})

        upstream.routes["/go"] = redirect
        async with proxying(upstream.url) as proxy, client_for(proxy) as c:
            r = await c.get("/go")
        assert r.status_code == 302
        assert r.headers["location"] == "/target"
        assert [s.raw_path for s in upstream.seen] == ["/go"]

    async def test_set_cookie_reaches_client_and_no_jar_is_kept(self, upstream: Upstream) -> None:
        """Set-Cookie lines reach the client; the proxy keeps no jar, so another client's next
        request carries no Cookie upstream."""

        async def cookie(request: web.Request) -> web.StreamResponse:
            await upstream.record(request)
            response = web.Response(text="c")
            response.headers.add("Set-Cookie", "session=alice-secret; Path=/")
            response.headers.add("Set-Cookie", "pref=1; Path=/")
            return response

        upstream.routes["/login"] = cookie
        async with proxying(upstream.url) as proxy:
            async with client_for(proxy) as alice:
                r = await alice.get("/login")
            async with client_for(proxy, "198.51.100.2") as bob:
                await bob.get("/account")
        assert r.headers.get_list("set-cookie") == ["session=alice-secret; Path=/", "pref=1; Path=/"]
        assert upstream.seen[1].raw_path == "/account"
        assert upstream.seen[1].values("cookie") == []

    @pytest.mark.parametrize("with_length", [False, True], ids=["chunked", "content-length"])
    async def test_request_body_is_not_buffered(self, upstream: Upstream, with_length: bool) -> None:
        """A non-keyed body streams: the upstream has the first chunk before the client sends the rest."""
        first, rest = b"a" * 5000, b"b" * 5000
        got_first = asyncio.Event()
        buffered = False

        async def upload(request: web.Request) -> web.StreamResponse:
            received = b""
            async for data in request.content.iter_any():
                received += data
                if len(received) >= len(first):
                    got_first.set()
            await upstream.record(request, received)
            return web.Response(text=str(len(received)))

        sent = [{"type": "http.request", "body": first, "more_body": True}]

        async def receive() -> dict[str, Any]:
            nonlocal buffered
            if sent:
                return sent.pop()
            if not got_first.is_set():
                try:
                    async with asyncio.timeout(5):
                        await got_first.wait()
                except TimeoutError:
                    buffered = True  # the upstream never saw chunk 1 on its own: held back
            sent.append({"type": "http.disconnect"})
            return {"type": "http.request", "body": rest, "more_body": False}

        upstream.routes["/upload"] = upload
        headers = [(b"host", b"h")]
        headers.append((b"content-length", b"10000") if with_length else (b"transfer-encoding", b"chunked"))
        async with proxying(upstream.url) as proxy:
            r = await drive(proxy, method="POST", raw_path=b"/upload", headers=headers, receive=receive)
        assert not buffered, "the proxy held chunk 1 until the whole body arrived"
        assert (r.status, r.content) == (200, b"10000")
        assert upstream.seen[0].body == first + rest


# --------------------------------------------------------------------------------------------
# failures
# --------------------------------------------------------------------------------------------


class TestClientLeaves:
    @staticmethod
    def endless(up: Upstream, flowing: asyncio.Event, closed: asyncio.Event) -> Handler:
        """A chunked stream that runs until its connection drops (bounded: 10 s), then says so."""

        async def handler(request: web.Request) -> web.StreamResponse:
            await up.record(request)
            response = web.StreamResponse()
            await response.prepare(request)
            try:
                async with asyncio.timeout(10):
                    for i in itertools.count():
                        await response.write(b"tick\n")
                        if i == 10:
                            flowing.set()
                        await asyncio.sleep(0.01)
            except (ConnectionResetError, OSError, asyncio.CancelledError):
                closed.set()
                raise
            return response

        return handler

    async def test_endless_stream_is_closed_when_the_client_leaves(
        self, upstream: Upstream, caplog: pytest.LogCaptureFixture
    ) -> None:
        """An open-ended response (no Content-Length) whose client disconnects is closed upstream
        at once, not read forever, and it is not logged or counted as an upstream error."""
        flowing, closed = asyncio.Event(), asyncio.Event()
        upstream.routes["/events"] = self.endless(upstream, flowing, closed)
        metrics = Metrics()
        reply = Reply()
        leave = asyncio.Event()
        messages = [{"type": "http.request", "body": b"", "more_body": False}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop(0)
            await leave.wait()
            return {"type": "http.disconnect"}

        async with proxying(upstream.url, metrics=metrics) as proxy:
            task = asyncio.ensure_future(drive(proxy, raw_path=b"/events", receive=receive, into=reply))
            async with asyncio.timeout(5):
                await flowing.wait()
            leave.set()
            async with asyncio.timeout(5):
                await closed.wait()
                await task
        assert reply.status == 200
        assert reply.bodies  # the stream reached the client
        assert not any(m.get("more_body") is False for m in reply.bodies)  # cut, not finished
        for kind in ("unreachable", "timeout", "broken"):
            assert metrics.registry.get_sample_value("gateway_upstream_errors_total", {"kind": kind}) == 0
        assert not events(caplog, "upstream.broken")


class TestFailures:
    async def test_refused_is_502_not_reached(self, caplog: pytest.LogCaptureFixture) -> None:
        """A refused connection is a 502 upstream-not-reached, logged with the request id and counted."""
        caplog.set_level(logging.INFO, logger="gateway")
        metrics = Metrics()
        async with proxying(f"http://{HOST}:{free_port()}", metrics=metrics) as proxy:
            r = await drive(RequestIdMiddleware(proxy), method="POST",
                            headers=[(b"host", b"h"), (b"x-request-id", b"rid-refused"),
                                     (b"content-length", b"2")], chunks=[b"hi"])
        assert_problem(r, 502, NOT_REACHED)
        assert r.headers["x-request-id"] == "rid-refused"
        (record,) = events(caplog, "upstream.unreachable")
        assert record.name == "gateway.proxy"
        assert record.request_id == "rid-refused"  # type: ignore[attr-defined]
        assert upstream_errors(metrics, "unreachable") == 1
        assert upstream_errors(metrics, "timeout") == upstream_errors(metrics, "broken") == 0

    async def test_connect_timeout_is_502_not_reached(self, caplog: pytest.LogCaptureFixture) -> None:
        """No connection within connect_timeout (a listener whose accept queue is full) is a 502
        upstream-not-reached, after the connect timeout."""
        caplog.set_level(logging.INFO, logger="gateway")
        metrics = Metrics()
        listener = socket.socket()
        fillers: list[socket.socket] = []
        try:
            listener.bind((HOST, 0))
            listener.listen(0)
            port = listener.getsockname()[1]
            for _ in range(3):  # never accepted: the queue fills and further SYNs go unanswered
                filler = socket.socket()
                filler.setblocking(False)
                fillers.append(filler)
                with contextlib.suppress(BlockingIOError):
                    filler.connect((HOST, port))
            async with proxying(f"http://{HOST}:{port}", connect_timeout_s=0.3, metrics=metrics) as proxy:
                started = time.monotonic()
                r = await drive(RequestIdMiddleware(proxy))
                took = time.monotonic() - started
        finally:
            for filler in fillers:
                filler.close()
            listener.close()
        assert_problem(r, 502, NOT_REACHED)
        assert 0.25 <= took < 5
        assert len(events(caplog, "upstream.unreachable")) == 1
        assert upstream_errors(metrics, "unreachable") == 1

    async def test_slow_upstream_is_504(self, upstream: Upstream, caplog: pytest.LogCaptureFixture) -> None:
        """No response within the timeout is a 504 outcome-unknown, logged as upstream.timeout."""
        caplog.set_level(logging.INFO, logger="gateway")
        upstream.routes["/slow"] = upstream.slow
        metrics = Metrics()
        async with proxying(upstream.url, timeout_s=0.3, metrics=metrics) as proxy:
            started = time.monotonic()
            r = await drive(RequestIdMiddleware(proxy), raw_path=b"/slow")
            took = time.monotonic() - started
        assert_problem(r, 504, UNKNOWN)
        assert 0.25 <= took < 5
        assert upstream.started == 1
        assert len(events(caplog, "upstream.timeout")) == 1
        assert upstream_errors(metrics, "timeout") == 1

    async def test_closed_before_answer_is_502_outcome_unknown(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """An upstream that reads the request and closes without answering is a 502 outcome-unknown,
        tried once."""
        caplog.set_level(logging.INFO, logger="gateway")
        metrics = Metrics()
        async with RawUpstream(None) as raw, proxying(raw.url, metrics=metrics) as proxy:
            r = await drive(RequestIdMiddleware(proxy), method="POST",
                            headers=[(b"host", b"h"), (b"content-length", b"3")], chunks=[b"abc"])
        assert_problem(r, 502, UNKNOWN)
        assert raw.connections == 1
        assert raw.requests[0].startswith(b"POST / HTTP/1.1\r\n")
        assert len(events(caplog, "upstream.broken")) == 1
        assert upstream_errors(metrics, "broken") == 1

    async def test_close_mid_body_cuts_the_response(self, caplog: pytest.LogCaptureFixture) -> None:
        """Headers then part of the body then a close: the client's 200 started and never ends."""
        caplog.set_level(logging.INFO, logger="gateway")
        metrics = Metrics()
        reply = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nContent-Type: text/plain\r\n\r\n" + b"x" * 10
        async with RawUpstream(reply) as raw, proxying(raw.url, metrics=metrics) as proxy:
            r = await drive(RequestIdMiddleware(proxy), headers=[(b"host", b"h"), (b"x-request-id", b"cut")])
        assert r.status == 200
        assert r.content == b"x" * 10
        assert not r.complete
        assert all(m.get("more_body") for m in r.bodies)
        (record,) = events(caplog, "upstream.broken")
        assert record.request_id == "cut"  # type: ignore[attr-defined]
        assert upstream_errors(metrics, "broken") == 1

    async def test_stall_mid_body_cuts_the_response(
        self, upstream: Upstream, caplog: pytest.LogCaptureFixture
    ) -> None:
        """An upstream that stops sending mid-body for longer than the timeout: the client's 200
        is cut off, logged as upstream.timeout and counted."""
        caplog.set_level(logging.INFO, logger="gateway")

        async def stall(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(status=200, headers={"Content-Length": "20"})
            await response.prepare(request)
            await response.write(b"0123456789")
            async with asyncio.timeout(10):
                await upstream.release.wait()
            await response.write(b"0123456789")
            return response

        upstream.routes["/stall"] = stall
        metrics = Metrics()
        async with proxying(upstream.url, timeout_s=0.3, metrics=metrics) as proxy:
            r = await drive(RequestIdMiddleware(proxy), raw_path=b"/stall")
        assert r.status == 200
        assert r.content == b"0123456789"
        assert not r.complete
        assert len(events(caplog, "upstream.timeout")) == 1
        assert upstream_errors(metrics, "timeout") == 1
        assert upstream_errors(metrics, "broken") == 0

    async def test_client_gone_mid_upload_answers_nothing(
        self, upstream: Upstream, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A client that disconnects mid-body gets no answer, no upstream error is counted, and the
        upstream sees a cut-off request."""
        caplog.set_level(logging.INFO, logger="gateway")
        cut = asyncio.Event()

        async def upload(request: web.Request) -> web.StreamResponse:
            try:
                await request.read()
            except (ConnectionError, ClientPayloadError):
                cut.set()
                raise
            return web.Response(text="whole")

        upstream.routes["/upload"] = upload
        messages = [{"type": "http.request", "body": b"a" * 100, "more_body": True}]

        async def receive() -> dict[str, Any]:
            return messages.pop() if messages else {"type": "http.disconnect"}

        metrics = Metrics()
        async with proxying(upstream.url, metrics=metrics) as proxy:
            r = await drive(proxy, method="POST", raw_path=b"/upload",
                            headers=[(b"host", b"h"), (b"content-length", b"1000")], receive=receive)
            async with asyncio.timeout(5):
                await cut.wait()
        assert r.messages == []
        assert [upstream_errors(metrics, k) for k in ("unreachable", "timeout", "broken")] == [0, 0, 0]
        assert not [r for r in caplog.records if r.name == "gateway.proxy"]

    async def test_dropped_pooled_connection_is_not_resent(self) -> None:
        """A GET written to a pooled connection the upstream then drops is a 502 outcome-unknown,
        never silently resent on a new connection (aiohttp's retry of idempotent methods is off)."""
        ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        async with RawUpstream(ok, None) as raw, proxying(raw.url) as proxy:
            first = await drive(proxy, raw_path=b"/1")
            second = await drive(proxy, raw_path=b"/2")
        assert (first.status, first.content) == (200, b"ok")
        assert_problem(second, 502, UNKNOWN)
        assert raw.connections == 1
        assert [r.split(b" ", 2)[1] for r in raw.requests] == [b"/1", b"/2"]


# --------------------------------------------------------------------------------------------
# the full stack (build_app): the idempotency layer and the upstream's failures
# --------------------------------------------------------------------------------------------


class TestFullStack:
    async def test_not_reached_then_runs_once(self, store_section: dict[str, Any]) -> None:
        """A keyed POST to an unreachable upstream is a 502 not-reached; once the upstream is up the
        same key runs, exactly once."""
        port = free_port()
        app = stack(f"http://{HOST}:{port}", store_section)
        async with lifespan_running(app), client_for(app) as c:
            first = await c.post("/charges", content=b"pay", headers={KEY: "k1"})
            assert_problem(first, 502, NOT_REACHED)
            async with upstream_running(port) as up:

                async def created(request: web.Request) -> web.StreamResponse:
                    await up.record(request)
                    return web.Response(status=201, text="charged")

                up.routes["/charges"] = created
                second = await c.post("/charges", content=b"pay", headers={KEY: "k1"})
                third = await c.post("/charges", content=b"pay", headers={KEY: "k1"})
        assert (second.status_code, second.content) == (201, b"charged")
        assert "idempotent-replayed" not in second.headers
        assert (third.status_code, third.content) == (201, b"charged")
        assert third.headers["idempotent-replayed"] == "true"
        assert [s.body for s in up.seen] == [b"pay"]
        assert upstream_errors(app.metrics, "unreachable") == 1

    async def test_slow_keyed_is_504_replayed(
        self, upstream: Upstream, store_section: dict[str, Any]
    ) -> None:
        """A keyed POST that times out is a 504 outcome-unknown; the retry replays that 504 and the
        upstream runs the request once."""
        upstream.routes["/charges"] = upstream.slow
        app = stack(upstream.url, store_section, timeout="300ms")
        async with lifespan_running(app), client_for(app) as c:
            first = await c.post("/charges", content=b"pay", headers={KEY: "slow"})
            assert_problem(first, 504, UNKNOWN)
            assert "idempotent-replayed" not in first.headers
            upstream.release.set()
            await poll(lambda: upstream.finished == 1)
            again = await c.post("/charges", content=b"pay", headers={KEY: "slow"})
        assert_problem(again, 504, UNKNOWN)
        assert again.headers["idempotent-replayed"] == "true"
        assert upstream.started == 1
        assert len(upstream.seen) == 1

    async def test_dropped_keyed_is_502_replayed(self, store_section: dict[str, Any]) -> None:
        """A keyed POST whose upstream drops the connection is a stored 502 outcome-unknown; the
        retry replays it without reaching the upstream."""
        async with RawUpstream(None) as raw:
            app = stack(raw.url, store_section)
            async with lifespan_running(app), client_for(app) as c:
                first = await c.post("/charges", content=b"pay", headers={KEY: "drop"})
                again = await c.post("/charges", content=b"pay", headers={KEY: "drop"})
        assert_problem(first, 502, UNKNOWN)
        assert "idempotent-replayed" not in first.headers
        assert_problem(again, 502, UNKNOWN)
        assert again.headers["idempotent-replayed"] == "true"
        assert raw.connections == 1

    async def test_request_id_reaches_upstream(
        self, upstream: Upstream, store_section: dict[str, Any]
    ) -> None:
        """Through the stack the upstream gets the X-Request-Id echoed to the client."""
        app = stack(upstream.url, store_section)
        async with lifespan_running(app), client_for(app) as c:
            r = await c.get("/x")
        assert r.status_code == 200
        (seen,) = upstream.seen
        assert seen.values("x-request-id") == [r.headers["x-request-id"]]
