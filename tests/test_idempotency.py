"""IdempotencyMiddleware on the wire: key syntax, scope, fingerprint, replay, refusals, outcomes.

Every behaviour test runs on fakeredis (memory://) and on a real redis-server through the
``store`` fixture; the middleware shares that store (``store=``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway import GatewayMiddleware, IdempotencyMiddleware, mark_not_sent
from gateway._asgi import ASGIApp, Message, Receive, Scope, Send
from gateway.idempotency.lease import Lease
from gateway.store.redis import RedisStore
from gateway.store.scripts import read_script
from tests import asgi_helpers as helpers
from tests.asgi_helpers import PROBLEM, answer_lifespan, client_for, poll, run_lifespan
from tests.conftest import TEST_STORE_TIMEOUT_S, unique_prefix
from tests.redis_process import RedisProcess, free_port

KEY = "Idempotency-Key"
KEY_B = b"idempotency-key"
REPLAYED = "idempotent-replayed"
Headers = list[tuple[bytes, bytes]]



def without_request_id(raw: Headers) -> Headers:
    """Header lines less X-Request-Id (which the layer alone sets on every keyed answer)."""
    return [h for h in raw if h[0].lower() != b"x-request-id"]

class Boom(Exception):
    """What the test apps raise."""


# --------------------------------------------------------------------------------------------
# apps, a raw ASGI driver, helpers
# --------------------------------------------------------------------------------------------


class App:
    """Reads the whole body, then answers ``status``/``headers`` with ``body`` in ``chunks``.

    The default body is ``call N: <request body>`` so a reply shows which execution made it.
    ``hold_first`` parks the first execution (after it read its body) until ``release`` is set;
    ``hold`` parks the listed executions (1-based), each until ``releases[n]`` is set.
    """

    def __init__(
        self,
        *,
        status: int = 200,
        headers: Headers | None = None,
        body: bytes | None = None,
        chunks: int = 1,
        hold_first: bool = False,
        hold: Sequence[int] = (),
        read_after: bool = False,
    ) -> None:
        self.status = status
        self.headers = [(b"content-type", b"text/plain")] if headers is None else headers
        self.body = body
        self.chunks = chunks
        self.hold = {1, *hold} if hold_first else set(hold)
        self.read_after = read_after
        self.calls = 0
        self.bodies: list[bytes] = []
        self.received: list[list[Message]] = []
        self.scopes: list[Scope] = []
        self.lifespan_events: list[str] = []
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.entered_calls = {n: asyncio.Event() for n in self.hold}
        self.releases = {n: asyncio.Event() for n in self.hold}
        if 1 in self.hold:
            self.releases[1] = self.release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send, self.lifespan_events)
            return
        assert scope["type"] == "http"
        self.calls += 1
        n = self.calls
        self.scopes.append(scope)
        messages: list[Message] = []
        self.received.append(messages)
        body = b""
        while True:
            message = await receive()
            messages.append(message)
            body += message.get("body", b"")
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        if self.read_after:
            messages.append(await receive())
        self.bodies.append(body)
        self.entered.set()
        if n in self.hold:
            self.entered_calls[n].set()
            await self.releases[n].wait()
        answer = self.body if self.body is not None else b"call %d: %b" % (n, body)
        await send({"type": "http.response.start", "status": self.status, "headers": list(self.headers)})
        size = -(-len(answer) // self.chunks) if answer else 1
        parts = [answer[i:i + size] for i in range(0, len(answer), size)] or [b""]
        for part in parts[:-1]:
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": parts[-1]})


@dataclass
class Reply:
    """What a raw ASGI call sent back (filled as it arrives, so it survives an exception)."""

    status_code: int = 0
    raw: Headers = field(default_factory=list)
    content: bytes = b""
    complete: bool = False

    @property
    def headers(self) -> httpx.Headers:
        return httpx.Headers(self.raw)

    def json(self) -> Any:
        return json.loads(self.content)


async def drive(
    app: ASGIApp,
    *,
    method: str = "POST",
    path: str = "/",
    query: bytes = b"",
    headers: Sequence[tuple[bytes, bytes]] = (),
    chunks: Sequence[bytes] = (b"",),
    client: tuple[str, int] = ("203.0.113.7", 4321),
    into: Reply | None = None,
) -> Reply:
    """One HTTP request straight through ``app``: the body arrives as ``chunks`` (no
    Content-Length unless given in ``headers``), and a receive past the body gets a disconnect."""
    reply = Reply() if into is None else into
    pending: list[Message] = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)
    ]

    async def receive() -> Message:
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            reply.status_code = message["status"]
            reply.raw = [(bytes(n), bytes(v)) for n, v in message.get("headers", [])]
        elif message["type"] == "http.response.body":
            reply.content += message.get("body", b"")
            reply.complete = not message.get("more_body", False)

    scope: Scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query,
        "root_path": "", "headers": [(n.lower(), v) for n, v in headers], "client": client,
        "server": ("gateway.test", 80),
    }
    await app(scope, receive, send)
    return reply


def keyed(key: str = "k1", **extra: str) -> dict[str, str]:
    return {KEY: key, **extra}


def idem(app: ASGIApp, store: RedisStore | Any, **settings: Any) -> IdempotencyMiddleware:
    return IdempotencyMiddleware(app, idempotency=settings, store=store)


def assert_problem(r: httpx.Response | Reply, status: int, type_name: str) -> dict[str, Any]:
    """``r`` is the gateway's own RFC 9457 answer with this status and type."""
    return helpers.assert_problem(r, status, PROBLEM + type_name)


def assert_first(r: httpx.Response | Reply) -> None:
    assert REPLAYED not in r.headers


def assert_replayed(r: httpx.Response | Reply) -> None:
    assert r.headers.get_list(REPLAYED) == ["true"]


async def entered(app: App) -> None:
    async with asyncio.timeout(10):
        await app.entered.wait()


def unreachable(**extra: Any) -> dict[str, Any]:
    """A [store] section on a loopback port nobody listens on: every call fails at once."""
    return {"url": f"redis://127.0.0.1:{free_port()}/0", "timeout": "200ms", **extra}


# --------------------------------------------------------------------------------------------
# which requests are handled
# --------------------------------------------------------------------------------------------


class TestMethods:
    @pytest.mark.parametrize("method", ["POST", "PATCH"])
    async def test_post_and_patch_with_a_key_run_once(self, store: RedisStore, method: str) -> None:
        """POST and PATCH with a key run once; the retry is the stored reply, marked replayed."""
        app = App(status=201)
        async with client_for(idem(app, store)) as c:
            first = await c.request(method, "/orders", content=b"x", headers=keyed())
            again = await c.request(method, "/orders", content=b"x", headers=keyed())
        assert (first.status_code, first.content) == (201, b"call 1: x")
        assert_first(first)
        assert (again.status_code, again.content) == (201, b"call 1: x")
        assert_replayed(again)
        assert app.calls == 1

    @pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE"])
    async def test_other_methods_pass_untouched(self, store: RedisStore, method: str) -> None:
        """GET, HEAD, PUT and DELETE with a key reach the app every time, never replayed."""
        app = App()
        async with client_for(idem(app, store)) as c:
            replies = [await c.request(method, "/orders", headers=keyed()) for _ in range(3)]
        assert app.calls == 3
        assert [r.status_code for r in replies] == [200, 200, 200]
        for r in replies:
            assert_first(r)
        if method != "HEAD":
            assert [r.content for r in replies] == [b"call 1: ", b"call 2: ", b"call 3: "]

    async def test_methods_setting_decides_what_is_handled(self, store: RedisStore) -> None:
        """With methods = ["PUT"] a keyed PUT is deduplicated and a keyed POST passes."""
        app = App()
        async with client_for(idem(app, store, methods=["PUT"])) as c:
            put1 = await c.put("/r", content=b"p", headers=keyed("put"))
            put2 = await c.put("/r", content=b"p", headers=keyed("put"))
            post1 = await c.post("/r", content=b"q", headers=keyed("post"))
            post2 = await c.post("/r", content=b"q", headers=keyed("post"))
        assert put1.content == put2.content == b"call 1: p"
        assert_replayed(put2)
        assert (post1.content, post2.content) == (b"call 2: q", b"call 3: q")
        assert_first(post2)
        assert app.calls == 3


# --------------------------------------------------------------------------------------------
# key syntax
# --------------------------------------------------------------------------------------------

VISIBLE = bytes(range(0x21, 0x7F))  # every visible ASCII character, 94 of them


class TestKeySyntax:
    @pytest.mark.parametrize(
        "key",
        [b"a", b"~", VISIBLE, (VISIBLE * 3)[:255], b'"' + b"k" * 255 + b'"'],
        ids=["1-char", "tilde", "all-visible", "255-chars", "sf-255-chars"],
    )
    async def test_valid_keys_are_accepted(self, store: RedisStore, key: bytes) -> None:
        """A key of 1 to 255 visible ASCII characters (bare or as an sf-string) is used: run, then replay."""
        app = App()
        mw = idem(app, store)
        first = await drive(mw, headers=[(KEY_B, key)], chunks=[b"b"])
        again = await drive(mw, headers=[(KEY_B, key)], chunks=[b"b"])
        assert (first.status_code, first.content) == (200, b"call 1: b")
        assert_first(first)
        assert (again.status_code, again.content) == (200, b"call 1: b")
        assert_replayed(again)
        assert app.calls == 1

    @pytest.mark.parametrize(
        "key",
        [
            b"k" * 256,
            b"",
            b"a b",
            b" ab",
            b"a\tb",
            b"a\x00b",
            b"a\x1bb",
            b"a\x7fb",
            "café".encode(),
            b"\xff",
            b'"abc',
            b'"abc"x',
            b'""',
            b'"a\\x"',
            b'"a b"',
            b'"' + b"k" * 256 + b'"',
        ],
        ids=["256-chars", "empty", "inner-space", "leading-space", "tab", "nul", "esc", "del",
             "non-ascii", "latin1-byte", "unterminated-sf", "sf-trailing",
             "empty-sf", "sf-bad-escape", "sf-space", "sf-256-chars"],
    )
    async def test_bad_keys_get_400_and_never_reach_the_app(self, store: RedisStore, key: bytes) -> None:
        """A value that is not 1-255 visible ASCII characters (bare or sf-string) is a 400 problem."""
        app = App()
        r = await drive(idem(app, store), headers=[(KEY_B, key)], chunks=[b"b"])
        body = assert_problem(r, 400, "idempotency-key-invalid")
        assert "Idempotency-Key" in body["detail"]
        assert app.calls == 0

    async def test_bare_key_with_inner_quote_is_valid(self, store: RedisStore) -> None:
        """A bare key may contain '"' after its first character (0x22 is visible ASCII)."""
        app = App()
        mw = idem(app, store)
        first = await drive(mw, headers=[(KEY_B, b'abc"x')])
        again = await drive(mw, headers=[(KEY_B, b'abc"x')])
        assert first.status_code == again.status_code == 200
        assert_replayed(again)
        assert app.calls == 1

    @pytest.mark.parametrize(
        ("first_form", "second_form"),
        [
            (b'"abc"', b"abc"),
            (b"abc", b'"abc"'),
            (b'"a\\"b"', b'a"b'),
            (b'"a\\\\b"', b"a\\b"),
        ],
        ids=["sf-then-bare", "bare-then-sf", "escaped-quote", "escaped-backslash"],
    )
    async def test_sf_string_names_the_same_key_as_bare(
        self, store: RedisStore, first_form: bytes, second_form: bytes
    ) -> None:
        """The sf-string form (escapes undone) and the bare form spell one key: the second replays."""
        app = App()
        mw = idem(app, store)
        first = await drive(mw, headers=[(KEY_B, first_form)], chunks=[b"b"])
        again = await drive(mw, headers=[(KEY_B, second_form)], chunks=[b"b"])
        assert first.status_code == 200
        assert_first(first)
        assert again.content == b"call 1: b"
        assert_replayed(again)
        assert app.calls == 1

    async def test_sf_escapes_make_a_key_distinct_from_the_literal(self, store: RedisStore) -> None:
        """'"a\\"b"' is the key a"b, not the six characters a\\"b sent bare."""
        app = App()
        mw = idem(app, store)
        await drive(mw, headers=[(KEY_B, b'"a\\"b"')])
        other = await drive(mw, headers=[(KEY_B, b'a\\"b')])
        assert_first(other)
        assert app.calls == 2

    @pytest.mark.parametrize("second", [b"k1", b"k2"], ids=["same-value", "other-value"])
    async def test_two_key_lines_are_400(self, store: RedisStore, second: bytes) -> None:
        """Two Idempotency-Key header lines are a bad key (400), even when they agree."""
        app = App()
        r = await drive(idem(app, store), headers=[(KEY_B, b"k1"), (KEY_B, second)])
        assert_problem(r, 400, "idempotency-key-invalid")
        assert app.calls == 0

    async def test_custom_header_name(self, store: RedisStore) -> None:
        """header = "X-Dedup-Token" is the key header; Idempotency-Key then means nothing."""
        app = App()
        async with client_for(idem(app, store, header="X-Dedup-Token")) as c:
            a1 = await c.post("/", content=b"a", headers={"X-Dedup-Token": "t"})
            a2 = await c.post("/", content=b"a", headers={"X-Dedup-Token": "t"})
            b1 = await c.post("/", content=b"b", headers=keyed("t"))
            b2 = await c.post("/", content=b"b", headers=keyed("t"))
            bad = await c.post("/", content=b"a", headers={"X-Dedup-Token": ""})
        assert a1.content == a2.content == b"call 1: a"
        assert_replayed(a2)
        assert (b1.content, b2.content) == (b"call 2: b", b"call 3: b")
        assert_first(b2)
        body = assert_problem(bad, 400, "idempotency-key-invalid")
        assert "X-Dedup-Token" in body["detail"]
        assert app.calls == 3


# --------------------------------------------------------------------------------------------
# required_paths
# --------------------------------------------------------------------------------------------


class TestRequiredPaths:
    @pytest.mark.parametrize("path", ["/pay", "/pay/x", "/pay/x/y"])
    async def test_missing_key_on_a_required_path_is_400(self, store: RedisStore, path: str) -> None:
        """A POST without a key on /pay or below it is a 400 missing-key problem; the app never runs."""
        app = App()
        async with client_for(idem(app, store, required_paths=["/pay"])) as c:
            r = await c.post(path, content=b"x")
        body = assert_problem(r, 400, "idempotency-key-missing")
        assert "Idempotency-Key" in body["detail"]
        assert app.calls == 0

    @pytest.mark.parametrize("path", ["/payments", "/pa", "/", "/other/pay"])
    async def test_missing_key_elsewhere_passes(self, store: RedisStore, path: str) -> None:
        """Paths outside the prefix by segment (/payments is not /pay) pass without a key."""
        app = App()
        async with client_for(idem(app, store, required_paths=["/pay"])) as c:
            r1 = await c.post(path, content=b"x")
            r2 = await c.post(path, content=b"x")
        assert (r1.status_code, r2.status_code) == (200, 200)
        assert app.calls == 2

    async def test_unhandled_method_on_a_required_path_passes(self, store: RedisStore) -> None:
        """A GET (not in methods) on a required path needs no key."""
        app = App()
        async with client_for(idem(app, store, required_paths=["/pay"])) as c:
            r = await c.get("/pay")
        assert r.status_code == 200
        assert app.calls == 1

    async def test_keyed_request_on_a_required_path_is_handled(self, store: RedisStore) -> None:
        """With the key, a required path is deduplicated like any other."""
        app = App()
        async with client_for(idem(app, store, required_paths=["/pay"])) as c:
            await c.post("/pay/1", content=b"x", headers=keyed())
            again = await c.post("/pay/1", content=b"x", headers=keyed())
        assert_replayed(again)
        assert app.calls == 1


# --------------------------------------------------------------------------------------------
# the request body
# --------------------------------------------------------------------------------------------


class TestBody:
    async def test_app_gets_the_exact_buffered_body_then_the_real_receive(self, store: RedisStore) -> None:
        """A keyed body sent in several chunks reaches the app as one exact message, and the next
        receive is the client's own (its http.disconnect)."""
        app = App(read_after=True)
        body_chunks = [b"ab", b"", b"cd\x00\xff", bytes(range(256)), b"z"]
        r = await drive(idem(app, store), headers=[(KEY_B, b"k")], chunks=body_chunks)
        assert r.status_code == 200
        assert app.received == [[
            {"type": "http.request", "body": b"".join(body_chunks), "more_body": False},
            {"type": "http.disconnect"},
        ]]

    async def test_body_over_limit_with_content_length_is_413(self, store: RedisStore) -> None:
        """Content-Length over max_body_bytes: 413, app not called, nothing stored (the key then runs)."""
        app = App()
        async with client_for(idem(app, store, max_body_bytes=10)) as c:
            big = await c.post("/", content=b"x" * 11, headers=keyed())
            ok = await c.post("/", content=b"y" * 10, headers=keyed())
            again = await c.post("/", content=b"y" * 10, headers=keyed())
        body = assert_problem(big, 413, "idempotency-body-too-large")
        assert "10" in body["detail"]
        assert (ok.status_code, ok.content) == (200, b"call 1: " + b"y" * 10)
        assert_first(ok)
        assert_replayed(again)
        assert app.calls == 1

    async def test_chunked_body_over_limit_is_413(self, store: RedisStore) -> None:
        """Without Content-Length, a body whose chunks add up past max_body_bytes is a 413 too;
        the app never runs and the key stays free."""
        app = App()
        mw = idem(app, store, max_body_bytes=10)
        big = await drive(mw, headers=[(KEY_B, b"k")], chunks=[b"abcd", b"efgh", b"ijk", b"lmno"])
        ok = await drive(mw, headers=[(KEY_B, b"k")], chunks=[b"abcd", b"efghij"])
        assert_problem(big, 413, "idempotency-body-too-large")
        assert (ok.status_code, ok.content) == (200, b"call 1: abcdefghij")
        assert_first(ok)
        assert app.calls == 1

    async def test_announced_oversize_body_is_refused_unread(self, store: RedisStore) -> None:
        """When Content-Length already says the body is too large, the 413 comes without reading it."""
        app = App()
        reads = 0

        async def receive() -> Message:
            nonlocal reads
            reads += 1
            return {"type": "http.request", "body": b"x" * 11, "more_body": False}

        replies: list[Message] = []

        async def send(message: Message) -> None:
            replies.append(message)

        scope: Scope = {"type": "http", "method": "POST", "path": "/", "raw_path": b"/", "query_string": b"",
                        "headers": [(KEY_B, b"k"), (b"content-length", b"11")], "client": ("1.2.3.4", 1)}
        await idem(app, store, max_body_bytes=10)(scope, receive, send)
        assert replies[0]["status"] == 413
        assert reads == 0
        assert app.calls == 0

    @pytest.mark.parametrize(
        ("method", "headers"),
        [("POST", []), ("PUT", [(KEY_B, b"k")])],
        ids=["no-key", "unhandled-method"],
    )
    async def test_unhandled_requests_stream_unbuffered(
        self, store: RedisStore, method: str, headers: Headers
    ) -> None:
        """A request the layer does not handle streams through chunk by chunk, past max_body_bytes."""
        app = App()
        chunks = [b"0123456789"] * 4
        r = await drive(idem(app, store, max_body_bytes=16), method=method, headers=headers, chunks=chunks)
        assert r.status_code == 200
        assert app.bodies == [b"0123456789" * 4]
        requests = [m for m in app.received[0] if m["type"] == "http.request"]
        assert len(requests) == 4
        assert [m["more_body"] for m in requests] == [True, True, True, False]

    async def test_unkeyed_streaming_through_httpx(self, store: RedisStore) -> None:
        """An unkeyed POST whose body arrives as several chunks reaches the app as several messages."""
        app = App()

        async def gen() -> AsyncIterator[bytes]:
            for _ in range(5):
                yield b"x" * 8

        async with client_for(idem(app, store, max_body_bytes=16)) as c:
            r = await c.post("/", content=gen())
        assert r.status_code == 200
        assert app.bodies == [b"x" * 40]
        assert len([m for m in app.received[0] if m.get("body")]) == 5


# --------------------------------------------------------------------------------------------
# fingerprint
# --------------------------------------------------------------------------------------------


class TestFingerprint:
    @pytest.mark.parametrize(
        ("method", "url", "body"),
        [
            ("POST", "/orders?x=1", b"B"),
            ("POST", "/orders?x=2", b"A"),
            ("POST", "/orders", b"A"),
            ("POST", "/orders/1?x=1", b"A"),
            ("POST", "/other?x=1", b"A"),
            ("PATCH", "/orders?x=1", b"A"),
        ],
        ids=["body", "query", "no-query", "sub-path", "path", "method"],
    )
    async def test_same_key_on_another_request_is_422(
        self, store: RedisStore, method: str, url: str, body: bytes
    ) -> None:
        """The key reused with another method, path, query or body: 422, not run, the original kept."""
        app = App(status=201)
        async with client_for(idem(app, store)) as c:
            first = await c.post("/orders?x=1", content=b"A", headers=keyed())
            other = await c.request(method, url, content=body, headers=keyed())
            other_again = await c.request(method, url, content=body, headers=keyed())
            again = await c.post("/orders?x=1", content=b"A", headers=keyed())
        assert first.status_code == 201
        body_json = assert_problem(other, 422, "idempotency-key-reused")
        assert body_json["status"] == 422
        assert_problem(other_again, 422, "idempotency-key-reused")
        assert (again.status_code, again.content) == (201, b"call 1: A")
        assert_replayed(again)
        assert app.calls == 1

    async def test_mismatch_while_the_first_is_in_flight_is_422(self, store: RedisStore) -> None:
        """Another request under a key whose first request still runs is a 422, not a 409."""
        app = App(hold_first=True)
        async with client_for(idem(app, store)) as c:
            first = asyncio.create_task(c.post("/", content=b"A", headers=keyed()))
            await entered(app)
            other = await c.post("/", content=b"B", headers=keyed())
            app.release.set()
            r1 = await first
            again = await c.post("/", content=b"A", headers=keyed())
        assert_problem(other, 422, "idempotency-key-reused")
        assert r1.content == b"call 1: A"
        assert_replayed(again)
        assert app.calls == 1


# --------------------------------------------------------------------------------------------
# a key belongs to one client
# --------------------------------------------------------------------------------------------


class TestScope:
    async def test_same_key_from_two_api_keys_is_two_records(self, store: RedisStore) -> None:
        """Two X-API-Key values under one key run twice, and each replay is that client's own reply."""
        app = App()
        async with client_for(idem(app, store)) as c:
            a1 = await c.post("/", content=b"same", headers=keyed(**{"X-API-Key": "alice"}))
            b1 = await c.post("/", content=b"same", headers=keyed(**{"X-API-Key": "bob"}))
            a2 = await c.post("/", content=b"same", headers=keyed(**{"X-API-Key": "alice"}))
            b2 = await c.post("/", content=b"same", headers=keyed(**{"X-API-Key": "bob"}))
            anonymous = await c.post("/", content=b"same", headers=keyed())
        assert (a1.content, b1.content) == (b"call 1: same", b"call 2: same")
        assert_first(b1)
        assert a2.content == b"call 1: same"
        assert b2.content == b"call 2: same"
        assert_replayed(a2)
        assert_replayed(b2)
        assert anonymous.content == b"call 3: same"  # keyed by IP: neither client's record
        assert_first(anonymous)
        assert app.calls == 3

    async def test_a_client_no_source_names_is_refused_not_pooled(self, store: RedisStore) -> None:
        """With only a header source, keyed requests without it get 400 (never one shared
        "anonymous" record that would hand one client another's response), and the app is not run."""
        app = App()
        mw = IdempotencyMiddleware(app, identity={"sources": ["header:x-api-key"]}, store=store)
        async with client_for(mw) as c:
            first = await c.post("/", content=b"mine", headers=keyed())
            second = await c.post("/", content=b"mine", headers=keyed(), )
            named = await c.post("/", content=b"mine", headers=keyed(**{"X-API-Key": "alice"}))
            unkeyed = await c.post("/", content=b"free")
        assert_problem(first, 400, "idempotency-identity-missing")
        assert_problem(second, 400, "idempotency-identity-missing")
        assert named.content == b"call 1: mine"
        assert unkeyed.content == b"call 2: free"  # without a key nothing needs scoping
        assert app.calls == 2

    async def test_same_key_from_two_ips_is_two_records(self, store: RedisStore) -> None:
        """Without an API key, two client addresses under one key run twice, each replaying its own."""
        app = App()
        mw = idem(app, store)
        async with client_for(mw, "198.51.100.1") as one, client_for(mw, "198.51.100.2") as two:
            one1 = await one.post("/", content=b"x", headers=keyed())
            two1 = await two.post("/", content=b"x", headers=keyed())
            one2 = await one.post("/", content=b"x", headers=keyed())
            two2 = await two.post("/", content=b"x", headers=keyed())
        assert (one1.content, two1.content) == (b"call 1: x", b"call 2: x")
        assert (one2.content, two2.content) == (b"call 1: x", b"call 2: x")
        assert_replayed(one2)
        assert_replayed(two2)
        assert app.calls == 2

    async def test_same_api_key_from_two_ips_is_one_record(self, store: RedisStore) -> None:
        """The API key, not the address, names the client: a second address replays its reply."""
        app = App()
        mw = idem(app, store)
        async with client_for(mw, "198.51.100.1") as one, client_for(mw, "198.51.100.2") as two:
            await one.post("/", content=b"x", headers=keyed(**{"X-API-Key": "alice"}))
            again = await two.post("/", content=b"x", headers=keyed(**{"X-API-Key": "alice"}))
        assert again.content == b"call 1: x"
        assert_replayed(again)
        assert app.calls == 1

    async def test_empty_api_key_counts_as_absent(self, store: RedisStore) -> None:
        """An empty X-API-Key header is no API key: the client is its IP, as without the header."""
        app = App()
        async with client_for(idem(app, store)) as c:
            await c.post("/", content=b"x", headers=keyed())
            again = await c.post("/", content=b"x", headers=keyed(**{"X-API-Key": ""}))
        assert again.content == b"call 1: x"
        assert_replayed(again)
        assert app.calls == 1


# --------------------------------------------------------------------------------------------
# replay
# --------------------------------------------------------------------------------------------


class TestReplay:
    @pytest.mark.parametrize("status", [200, 201, 202, 404, 409, 422, 500, 502, 503, 504])
    async def test_whatever_the_app_answered_is_replayed(self, store: RedisStore, status: int) -> None:
        """The app's status (2xx, 4xx, 5xx) and body come back on the retry; only the first ran."""
        app = App(status=status)
        async with client_for(idem(app, store)) as c:
            first = await c.post("/", content=b"x", headers=keyed())
            again = await c.post("/", content=b"x", headers=keyed())
            third = await c.post("/", content=b"x", headers=keyed())
        assert first.status_code == again.status_code == third.status_code == status
        assert first.content == again.content == third.content == b"call 1: x"
        assert_first(first)
        assert_replayed(again)
        assert_replayed(third)
        assert app.calls == 1

    async def test_headers_are_replayed_byte_exact_in_order(self, store: RedisStore) -> None:
        """The app's storable header lines come back as sent: names' case, order, repeats, values."""
        sent: Headers = [
            (b"X-Zeta", b"1"),
            (b"content-type", b"application/json; charset=utf-8"),
            (b"Vary", b"Accept"),
            (b"x-multi", b"one"),
            (b"Location", b"/orders/7"),
            (b"x-multi", b"two, three"),
            (b"x-empty", b""),
            (b"x-alpha", b"  spaced\tvalue "),
            (b"Vary", b"Accept-Encoding"),
        ]
        app = App(status=201, headers=sent, body=b'{"id":7}')
        mw = idem(app, store)
        first = await drive(mw, headers=[(KEY_B, b"k")])
        again = await drive(mw, headers=[(KEY_B, b"k")])
        assert without_request_id(first.raw) == sent  # alone, the layer adds the request's id
        own = {b"content-length", b"idempotent-replayed", b"x-request-id"}
        assert [h for h in again.raw if h[0].lower() not in own] == sent
        assert again.headers.get_list("content-length") == ["8"]
        assert_replayed(again)
        assert again.content == b'{"id":7}'

    async def test_binary_body_in_chunks_replayed_with_its_length(self, store: RedisStore) -> None:
        """A body of all 256 byte values, streamed in chunks without Content-Length, replays byte
        for byte with a recomputed Content-Length."""
        payload = bytes(range(256)) * 4 + b"\r\n\x00"
        app = App(headers=[(b"content-type", b"application/octet-stream")], body=payload, chunks=5)
        mw = idem(app, store)
        first = await drive(mw, headers=[(KEY_B, b"k")])
        again = await drive(mw, headers=[(KEY_B, b"k")])
        assert first.content == payload
        assert "content-length" not in first.headers
        assert again.content == payload
        assert again.headers.get_list("content-length") == [str(len(payload))]
        assert_replayed(again)
        assert app.calls == 1

    async def test_app_content_length_is_not_doubled(self, store: RedisStore) -> None:
        """An app's own Content-Length is replaced, not repeated, in the replay."""
        app = App(headers=[(b"content-length", b"5"), (b"x-k", b"v")], body=b"hello")
        mw = idem(app, store)
        await drive(mw, headers=[(KEY_B, b"k")])
        again = await drive(mw, headers=[(KEY_B, b"k")])
        assert again.headers.get_list("content-length") == ["5"]
        assert again.content == b"hello"

    async def test_empty_body_is_replayed(self, store: RedisStore) -> None:
        """A 204 with no body is stored and replayed as such."""
        app = App(status=204, headers=[(b"x-done", b"1")], body=b"")
        async with client_for(idem(app, store)) as c:
            await c.post("/", headers=keyed())
            again = await c.post("/", headers=keyed())
        assert (again.status_code, again.content) == (204, b"")
        assert again.headers["x-done"] == "1"
        assert_replayed(again)
        assert app.calls == 1

    async def test_never_stored_headers(self, store: RedisStore) -> None:
        """Set-Cookie, hop-by-hop headers (and one Connection names) and the gateway's own fields
        reach the first client but are not replayed."""
        sent: Headers = [
            (b"x-keep", b"1"),
            (b"Set-Cookie", b"session=secret; HttpOnly"),
            (b"set-cookie", b"other=2"),
            (b"Connection", b"keep-alive, X-Hop"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Transfer-Encoding", b"chunked"),
            (b"X-Hop", b"per-connection"),
            (b"Proxy-Authenticate", b"Basic"),
            (b"Upgrade", b"h2c"),
            (b"Trailer", b"x-sum"),
            (b"RateLimit", b'"upstream";r=1;t=1'),
            (b"RateLimit-Policy", b'"upstream";q=1;w=1'),
            (b"X-Request-Id", b"from-the-app"),
            (b"Idempotent-Replayed", b"false"),
            (b"x-keep-2", b"2"),
        ]
        app = App(headers=sent, body=b"b")
        mw = idem(app, store)
        first = await drive(mw, headers=[(KEY_B, b"k")])
        again = await drive(mw, headers=[(KEY_B, b"k")])
        assert without_request_id(first.raw) == without_request_id(sent)
        names = [n.lower() for n, _ in again.raw]
        kept = [h for h in again.raw if h[0].startswith(b"x-keep")]
        assert kept == [(b"x-keep", b"1"), (b"x-keep-2", b"2")]
        for gone in (b"set-cookie", b"connection", b"keep-alive", b"transfer-encoding", b"x-hop",
                     b"proxy-authenticate", b"upgrade", b"trailer", b"ratelimit", b"ratelimit-policy"):
            assert gone not in names, gone
        # the app's id is not stored; each response carries its own request's (one line)
        assert first.headers.get_list("x-request-id") != ["from-the-app"]
        assert len(first.headers.get_list("x-request-id")) == 1
        assert again.headers.get_list("x-request-id") != ["from-the-app"]
        assert len(again.headers.get_list("x-request-id")) == 1
        assert again.headers.get_list(REPLAYED) == ["true"]

    async def test_replay_through_the_gateway_carries_current_fields(self, store: RedisStore) -> None:
        """Through GatewayMiddleware a replay has the current RateLimit fields and its own request id."""
        app = App(headers=[(b"content-type", b"text/plain"), (b"x-request-id", b"app-made")])
        gw = GatewayMiddleware(
            app, {"rate_limit": [{"name": "p", "limit": 10, "period": "1m", "burst": 5}]}, store=store)
        async with client_for(gw) as c:
            first = await c.post("/", content=b"x", headers=keyed())
            again = await c.post("/", content=b"x", headers=keyed())
            named = await c.post("/", content=b"x", headers=keyed(**{"X-Request-Id": "retry-42"}))
        assert first.headers.get_list("ratelimit-policy") == ['"p";q=10;w=60']
        assert first.headers.get_list("ratelimit")[0].startswith('"p";r=4;')
        assert again.headers.get_list("ratelimit-policy") == ['"p";q=10;w=60']
        assert len(again.headers.get_list("ratelimit")) == 1
        assert again.headers["ratelimit"].startswith('"p";r=3;')
        assert named.headers["ratelimit"].startswith('"p";r=2;')
        assert_replayed(again)
        ids = [r.headers.get_list("x-request-id") for r in (first, again, named)]
        assert all(len(i) == 1 for i in ids)
        assert ids[0][0] != ids[1][0]
        assert "app-made" not in (ids[0][0], ids[1][0])
        assert ids[2] == ["retry-42"]
        assert again.content == named.content == b"call 1: x"
        assert app.calls == 1


# --------------------------------------------------------------------------------------------
# the gateway's own refusals are never stored
# --------------------------------------------------------------------------------------------


class TestRefusalsNotStored:
    async def test_429_is_not_stored(self, store: RedisStore) -> None:
        """A keyed request the rate limiter denies is never claimed: later, the key runs normally."""
        app = App()
        policy = {"name": "p", "limit": 1, "period": "1h", "burst": 1, "key": "header:x-bucket"}
        gw = GatewayMiddleware(app, {"rate_limit": [policy]}, store=store)
        async with client_for(gw) as c:
            spend = await c.post("/", content=b"x", headers={"X-Bucket": "a"})
            denied = await c.post("/", content=b"x", headers=keyed(**{"X-Bucket": "a"}))
            runs = await c.post("/", content=b"x", headers=keyed(**{"X-Bucket": "b"}))
            again = await c.post("/", content=b"x", headers=keyed(**{"X-Bucket": "c"}))
        assert spend.status_code == 200
        assert denied.status_code == 429
        assert denied.headers["content-type"] == "application/problem+json"
        assert_first(denied)
        assert (runs.status_code, runs.content) == (200, b"call 2: x")
        assert_first(runs)
        assert (again.status_code, again.content) == (200, b"call 2: x")
        assert_replayed(again)
        assert app.calls == 2

    async def test_400_and_413_are_not_stored(self, store: RedisStore) -> None:
        """After a 400 (two key lines) and a 413 under a key, the key's first good request runs."""
        app = App()
        mw = idem(app, store, max_body_bytes=8)
        bad = await drive(mw, headers=[(KEY_B, b"k"), (KEY_B, b"k")], chunks=[b"x"])
        big = await drive(mw, headers=[(KEY_B, b"k")], chunks=[b"x" * 9])
        bad_again = await drive(mw, headers=[(KEY_B, b"k"), (KEY_B, b"k")], chunks=[b"x"])
        runs = await drive(mw, headers=[(KEY_B, b"k")], chunks=[b"x"])
        again = await drive(mw, headers=[(KEY_B, b"k")], chunks=[b"x"])
        assert_problem(bad, 400, "idempotency-key-invalid")
        assert_problem(big, 413, "idempotency-body-too-large")
        assert_problem(bad_again, 400, "idempotency-key-invalid")
        assert (runs.status_code, runs.content) == (200, b"call 1: x")
        assert_first(runs)
        assert_replayed(again)
        assert app.calls == 1

    async def test_409_while_in_flight_then_the_first_reply(self, store: RedisStore) -> None:
        """While the first runs, the same request gets 409 with Retry-After: 1; once it finished, the
        retry gets the first's reply (the 409 was not stored)."""
        app = App(status=201, hold_first=True)
        async with client_for(idem(app, store)) as c:
            first = asyncio.create_task(c.post("/", content=b"x", headers=keyed()))
            await entered(app)
            busy = await c.post("/", content=b"x", headers=keyed())
            busy2 = await c.post("/", content=b"x", headers=keyed())
            app.release.set()
            r1 = await first
            again = await c.post("/", content=b"x", headers=keyed())
        body = assert_problem(busy, 409, "idempotency-key-in-use")
        assert body["status"] == 409
        assert busy.headers.get_list("retry-after") == ["1"]
        assert_first(busy)
        assert busy2.status_code == 409
        assert (r1.status_code, r1.content) == (201, b"call 1: x")
        assert (again.status_code, again.content) == (201, b"call 1: x")
        assert_replayed(again)
        assert app.calls == 1

    @pytest.mark.slow
    async def test_503_is_not_stored_and_the_store_recovers(self, dedicated_redis: RedisProcess) -> None:
        """While Redis is down a keyed request is a 503; once it is back, the key runs, then replays."""
        store = RedisStore.from_url(dedicated_redis.url, key_prefix=unique_prefix(),
                                    timeout_s=TEST_STORE_TIMEOUT_S)
        app = App()
        try:
            await store.open()
            async with client_for(idem(app, store)) as c:
                dedicated_redis.stop()
                down = await c.post("/", content=b"x", headers=keyed())
                dedicated_redis.start()
                runs = await c.post("/", content=b"x", headers=keyed())
                again = await c.post("/", content=b"x", headers=keyed())
        finally:
            await store.close()
        assert_problem(down, 503, "store-unavailable")
        assert down.headers["retry-after"] == "1"
        assert (runs.status_code, runs.content) == (200, b"call 1: x")
        assert_first(runs)
        assert_replayed(again)
        assert app.calls == 1


# --------------------------------------------------------------------------------------------
# outcomes the layer cannot see whole
# --------------------------------------------------------------------------------------------


class Raising:
    """Raises ``Boom`` at a chosen point: before answering, or mid-body."""

    def __init__(self, *, after_start: bool) -> None:
        self.after_start = after_start
        self.calls = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls += 1
        await receive()
        if self.after_start:
            await send({"type": "http.response.start", "status": 200, "headers": [(b"x-a", b"1")]})
            await send({"type": "http.response.body", "body": b"part", "more_body": True})
        msg = "the app failed"
        raise Boom(msg)


class Silent:
    """Returns without finishing a response: nothing at all, or only its start."""

    def __init__(self, *, start: bool) -> None:
        self.start = start
        self.calls = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls += 1
        await receive()
        if self.start:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"half", "more_body": True})


class TestAmbiguity:
    async def test_concurrent_duplicates_run_once(self, store: RedisStore) -> None:
        """Twenty identical keyed requests at once: the app runs once; the others get 409 or the replay."""
        app = App()
        async with client_for(idem(app, store)) as c:
            replies = await asyncio.gather(*(c.post("/", content=b"x", headers=keyed()) for _ in range(20)))
        assert app.calls == 1
        first = [r for r in replies if r.status_code == 200 and REPLAYED not in r.headers]
        assert len(first) == 1
        for r in replies:
            if r.status_code == 200:
                assert r.content == b"call 1: x"
            else:
                assert_problem(r, 409, "idempotency-key-in-use")

    async def test_cancelled_request_becomes_outcome_unknown(self, store: RedisStore) -> None:
        """A request cancelled while the app runs (the server dropped it) never runs again: its
        retries get 502 outcome-unknown, replayed."""
        app = App(hold_first=True)
        mw = idem(app, store)
        task = asyncio.create_task(drive(mw, headers=[(KEY_B, b"k")], chunks=[b"x"]))
        await entered(app)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        retries: list[Reply] = []

        async def settled() -> bool:
            retries.append(await drive(mw, headers=[(KEY_B, b"k")], chunks=[b"x"]))
            return retries[-1].status_code != 409

        await poll(settled)
        assert_problem(retries[-1], 502, "outcome-unknown")
        assert_replayed(retries[-1])
        assert app.calls == 1

    async def test_client_gone_mid_response_still_stores_it(self, store: RedisStore) -> None:
        """When the client's connection fails while the response streams, the app still finishes and
        its response is stored: the retry gets it whole, without a second run."""
        app = App(body=b"0123456789", chunks=5)
        mw = idem(app, store)
        sent: list[Message] = []

        async def receive() -> Message:
            return {"type": "http.request", "body": b"x", "more_body": False}

        async def broken_send(message: Message) -> None:
            if message["type"] == "http.response.body":
                raise OSError("connection reset")
            sent.append(message)

        scope: Scope = {"type": "http", "method": "POST", "path": "/", "raw_path": b"/", "query_string": b"",
                        "headers": [(KEY_B, b"k")], "client": ("203.0.113.7", 4321)}
        await mw(scope, receive, broken_send)
        again = await drive(mw, headers=[(KEY_B, b"k")], chunks=[b"x"])
        assert [m["type"] for m in sent] == ["http.response.start"]
        assert (again.status_code, again.content) == (200, b"0123456789")
        assert_replayed(again)
        assert app.calls == 1


class TestOutcomeUnknown:
    async def test_exception_before_any_response(self, store: RedisStore) -> None:
        """The app raises before answering: the client gets a 502 outcome-unknown problem, the
        exception propagates, and every retry gets that 502 replayed without running the app."""
        app = Raising(after_start=False)
        mw = idem(app, store)
        first = Reply()
        with pytest.raises(Boom):
            await drive(mw, headers=[(KEY_B, b"k")], chunks=[b"x"], into=first)
        assert_problem(first, 502, "outcome-unknown")
        assert_first(first)
        for _ in range(2):
            again = await drive(mw, headers=[(KEY_B, b"k")], chunks=[b"x"])
            assert_problem(again, 502, "outcome-unknown")
            assert_replayed(again)
        assert app.calls == 1

    async def test_exception_before_any_response_through_httpx(self, store: RedisStore) -> None:
        """Seen by an HTTP client (app exceptions not raised): 502 outcome-unknown, then replayed."""
        app = Raising(after_start=False)
        transport = httpx.ASGITransport(app=idem(app, store), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as c:
            first = await c.post("/", content=b"x", headers=keyed())
            again = await c.post("/", content=b"x", headers=keyed())
        assert_problem(first, 502, "outcome-unknown")
        assert_first(first)
        assert_problem(again, 502, "outcome-unknown")
        assert_replayed(again)
        assert app.calls == 1

    async def test_exception_mid_response(self, store: RedisStore) -> None:
        """The app raises after its response started: the client keeps what it got (no second
        response), the exception propagates, and retries get 502 outcome-unknown, replayed."""
        app = Raising(after_start=True)
        mw = idem(app, store)
        first = Reply()
        with pytest.raises(Boom):
            await drive(mw, headers=[(KEY_B, b"k")], chunks=[b"x"], into=first)
        assert (first.status_code, first.content, first.complete) == (200, b"part", False)
        again = await drive(mw, headers=[(KEY_B, b"k")], chunks=[b"x"])
        assert_problem(again, 502, "outcome-unknown")
        assert_replayed(again)
        assert app.calls == 1

    async def test_app_returning_without_a_response(self, store: RedisStore) -> None:
        """An app that returns without answering: the client gets 502 outcome-unknown; so do retries."""
        app = Silent(start=False)
        mw = idem(app, store)
        first = await drive(mw, headers=[(KEY_B, b"k")], chunks=[b"x"])
        again = await drive(mw, headers=[(KEY_B, b"k")], chunks=[b"x"])
        assert_problem(first, 502, "outcome-unknown")
        assert_first(first)
        assert_problem(again, 502, "outcome-unknown")
        assert_replayed(again)
        assert app.calls == 1

    async def test_app_returning_mid_response(self, store: RedisStore) -> None:
        """An app that returns with its body unfinished: the client keeps the part, retries get 502."""
        app = Silent(start=True)
        mw = idem(app, store)
        first = await drive(mw, headers=[(KEY_B, b"k")], chunks=[b"x"])
        again = await drive(mw, headers=[(KEY_B, b"k")], chunks=[b"x"])
        assert (first.status_code, first.content, first.complete) == (200, b"half", False)
        assert_problem(again, 502, "outcome-unknown")
        assert_replayed(again)
        assert app.calls == 1

    async def test_starlette_error_500_is_stored(self, store: RedisStore) -> None:
        """A Starlette route that raises answers 500 through its error handler: that 500 is what the
        app answered, so it is stored and replayed, and the route runs once."""
        calls: list[bytes] = []

        async def charge(request: Request) -> Response:
            calls.append(await request.body())
            msg = "route failed"
            raise Boom(msg)

        app = Starlette(routes=[Route("/charge", charge, methods=["POST"])])
        transport = httpx.ASGITransport(app=idem(app, store), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as c:
            first = await c.post("/charge", content=b"x", headers=keyed())
            again = await c.post("/charge", content=b"x", headers=keyed())
        assert (first.status_code, first.text) == (500, "Internal Server Error")
        assert_first(first)
        assert (again.status_code, again.text) == (500, "Internal Server Error")
        assert again.headers["content-type"] == first.headers["content-type"]
        assert_replayed(again)
        assert calls == [b"x"]

    async def test_starlette_error_propagates_out_of_the_middleware(self, store: RedisStore) -> None:
        """The Starlette route's exception still leaves the middleware after its 500 went out."""
        async def charge(request: Request) -> Response:
            msg = "route failed"
            raise Boom(msg)

        app = Starlette(routes=[Route("/charge", charge, methods=["POST"])])
        first = Reply()
        with pytest.raises(Boom):
            await drive(idem(app, store), path="/charge", headers=[(KEY_B, b"k")], into=first)
        assert first.status_code == 500
        assert first.complete


# --------------------------------------------------------------------------------------------
# a response too large to keep
# --------------------------------------------------------------------------------------------


class TestLargeResponse:
    async def test_large_response_is_delivered_then_summarised(self, store: RedisStore) -> None:
        """A response over max_body_bytes reaches its client whole; a retry gets its status and
        non-body headers with a response-not-stored problem, marked replayed, without a rerun."""
        payload = bytes(range(256)) * 20  # 5120 bytes
        headers: Headers = [
            (b"content-type", b"text/csv"),
            (b"Location", b"/exports/7"),
            (b"content-language", b"en"),
            (b"etag", b'"v1"'),
            (b"x-trace", b"t-1"),
        ]
        app = App(status=201, headers=headers, body=payload, chunks=8)
        mw = idem(app, store, max_body_bytes=1000)
        first = await drive(mw, headers=[(KEY_B, b"k")], chunks=[b"q"])
        again = await drive(mw, headers=[(KEY_B, b"k")], chunks=[b"q"])
        assert (first.status_code, first.content, without_request_id(first.raw)) == (201, payload, headers)
        assert_first(first)
        assert again.status_code == 201
        body = assert_problem(again, 201, "response-not-stored")
        assert body["original-status"] == 201
        assert_replayed(again)
        assert again.headers["location"] == "/exports/7"
        assert again.headers["x-trace"] == "t-1"
        assert again.headers.get_list("content-type") == ["application/problem+json"]
        assert "content-language" not in again.headers
        assert "etag" not in again.headers
        assert app.calls == 1

    async def test_response_at_the_limit_is_stored(self, store: RedisStore) -> None:
        """A body of exactly max_body_bytes (and no headers) is kept whole."""
        app = App(headers=[], body=b"z" * 100)
        mw = idem(app, store, max_body_bytes=100)
        await drive(mw, headers=[(KEY_B, b"k")])
        again = await drive(mw, headers=[(KEY_B, b"k")])
        assert again.content == b"z" * 100
        assert_replayed(again)


# --------------------------------------------------------------------------------------------
# mark_not_sent
# --------------------------------------------------------------------------------------------


class NotSent:
    """A proxy-like app that answers 502; with ``mark`` it says the upstream was never reached."""

    def __init__(self, *, mark: bool, fail_after_mark: bool = False) -> None:
        self.mark = mark
        self.fail_after_mark = fail_after_mark
        self.calls = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls += 1
        await receive()
        if self.mark:
            mark_not_sent(scope)
        if self.fail_after_mark:
            msg = "connection refused, then the handler failed"
            raise Boom(msg)
        body = b"upstream refused %d" % self.calls
        await send({"type": "http.response.start", "status": 502,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": body})


class TestMarkNotSent:
    async def test_marked_502_frees_the_key(self, store: RedisStore) -> None:
        """mark_not_sent before a 502: the claim is released and a retry runs the request again."""
        app = NotSent(mark=True)
        async with client_for(idem(app, store)) as c:
            first = await c.post("/", content=b"x", headers=keyed())
            again = await c.post("/", content=b"x", headers=keyed())
        assert (first.status_code, first.content) == (502, b"upstream refused 1")
        assert (again.status_code, again.content) == (502, b"upstream refused 2")
        assert_first(again)
        assert app.calls == 2

    async def test_unmarked_502_is_stored(self, store: RedisStore) -> None:
        """Without mark_not_sent, an app's 502 is an answer like any other: stored and replayed."""
        app = NotSent(mark=False)
        async with client_for(idem(app, store)) as c:
            await c.post("/", content=b"x", headers=keyed())
            again = await c.post("/", content=b"x", headers=keyed())
        assert (again.status_code, again.content) == (502, b"upstream refused 1")
        assert_replayed(again)
        assert app.calls == 1

    async def test_mark_outside_a_keyed_request_does_nothing(self, store: RedisStore) -> None:
        """mark_not_sent on an unkeyed request (or a bare scope) is harmless."""
        mark_not_sent({"type": "http"})
        app = NotSent(mark=True)
        async with client_for(idem(app, store)) as c:
            r = await c.post("/", content=b"x")
        assert r.status_code == 502
        assert app.calls == 1

    async def test_marked_then_raising_frees_the_key(self, store: RedisStore) -> None:
        """An app that marked the request not sent and then raised: the upstream certainly never
        saw it, so it is not stored and a retry runs it."""
        app = NotSent(mark=True, fail_after_mark=True)
        mw = idem(app, store)
        reply = Reply()
        with pytest.raises(Boom):
            await drive(mw, headers=[(KEY_B, b"k")], chunks=[b"x"], into=reply)
        assert_problem(reply, 502, "upstream-not-reached")
        with pytest.raises(Boom):
            await drive(mw, headers=[(KEY_B, b"k")], chunks=[b"x"])
        assert app.calls == 2


# --------------------------------------------------------------------------------------------
# store failures
# --------------------------------------------------------------------------------------------


class TestStoreFailure:
    async def test_deny_answers_503_without_running(self) -> None:
        """on_store_error = "deny" (the default): a keyed request is a 503 with Retry-After, not run."""
        app = App()
        mw = IdempotencyMiddleware(app, store=unreachable())
        try:
            async with client_for(mw) as c:
                r = await c.post("/", content=b"x", headers=keyed())
                unkeyed = await c.post("/", content=b"x")
        finally:
            await mw.store.close()
        body = assert_problem(r, 503, "store-unavailable")
        assert body["status"] == 503
        assert r.headers["retry-after"] == "1"
        assert unkeyed.status_code == 200  # an unkeyed request never needs the store
        assert app.calls == 1
        assert app.bodies == [b"x"]

    async def test_allow_runs_the_app_unguarded_with_its_body(self) -> None:
        """on_store_error = "allow": a keyed request runs without a record, with its exact body."""
        app = App()
        mw = IdempotencyMiddleware(app, idempotency={"on_store_error": "allow"}, store=unreachable())
        try:
            first = await drive(mw, headers=[(KEY_B, b"k")], chunks=[b"ab", b"cd"])
            again = await drive(mw, headers=[(KEY_B, b"k")], chunks=[b"ab", b"cd"])
        finally:
            await mw.store.close()
        assert (first.status_code, first.content) == (200, b"call 1: abcd")
        assert (again.status_code, again.content) == (200, b"call 2: abcd")
        assert_first(again)
        assert app.received[0][0] == {"type": "http.request", "body": b"abcd", "more_body": False}


# --------------------------------------------------------------------------------------------
# time: ttl and leases
# --------------------------------------------------------------------------------------------


class TestTime:
    async def test_completed_key_runs_again_after_ttl(self, store: RedisStore) -> None:
        """With ttl = "1s" (the least it takes), a completed key replays at first and runs again
        once it expired."""
        app = App()
        async with client_for(idem(app, store, ttl="1s")) as c:
            await c.post("/", content=b"x", headers=keyed())
            soon = await c.post("/", content=b"x", headers=keyed())
            assert soon.content == b"call 1: x"
            assert_replayed(soon)

            async def ran_again() -> bool:
                r = await c.post("/", content=b"x", headers=keyed())
                return REPLAYED not in r.headers and r.content == b"call 2: x"

            await poll(ran_again)
        assert app.calls == 2

    async def test_live_holder_keeps_its_claim_past_lock_ttl(self, store: RedisStore) -> None:
        """A request running for several lock_ttl keeps its claim (renewed): retries get 409 all along,
        then the first's reply."""
        app = App(hold_first=True)
        async with client_for(idem(app, store, lock_ttl="300ms")) as c:
            first = asyncio.create_task(c.post("/", content=b"x", headers=keyed()))
            await entered(app)
            started = time.monotonic()
            statuses: list[int] = []

            async def long_enough() -> bool:
                statuses.append((await c.post("/", content=b"x", headers=keyed())).status_code)
                return time.monotonic() - started > 1.2  # four lock_ttl

            await poll(long_enough, every_s=0.05)
            app.release.set()
            r1 = await first
            again = await c.post("/", content=b"x", headers=keyed())
        assert set(statuses) == {409}
        assert r1.content == b"call 1: x"
        assert again.content == b"call 1: x"
        assert_replayed(again)
        assert app.calls == 1

    @pytest.mark.parametrize("mode", ["unknown", "retry"])
    async def test_dead_holder_loses_its_claim(
        self, store: RedisStore, monkeypatch: pytest.MonkeyPatch, mode: str
    ) -> None:
        """A holder that stops renewing loses its claim after lock_ttl: with "unknown" a retry gets
        a replayed 502 outcome-unknown, until the holder (alive after all) stores its real
        response late, which replaces it; with "retry" the key runs again, the old holder's
        completion is refused, and its client's response is cut off rather than contradicted."""
        monkeypatch.setattr(Lease, "renew_now", lambda self: None)
        app = App(hold_first=True)
        async with client_for(idem(app, store, lock_ttl="300ms", on_lost_claim=mode)) as c:
            first = asyncio.create_task(c.post("/", content=b"x", headers=keyed()))
            await entered(app)
            seen: list[httpx.Response] = []

            async def claim_lapsed() -> bool:
                seen.append(await c.post("/", content=b"x", headers=keyed()))
                return seen[-1].status_code != 409

            await poll(claim_lapsed)
            app.release.set()
            r1 = await asyncio.gather(first, return_exceptions=True)
            later = await c.post("/", content=b"x", headers=keyed())
        lapsed = seen[-1]
        if mode == "unknown":
            assert_problem(lapsed, 502, "outcome-unknown")
            assert_replayed(lapsed)
            assert isinstance(r1[0], httpx.Response)
            assert r1[0].content == b"call 1: x"  # the holder's client gets its response ...
            assert later.content == b"call 1: x"  # ... and so does every retry from now on
            assert_replayed(later)
            assert app.calls == 1
        else:
            assert isinstance(r1[0], httpx.RemoteProtocolError)  # not "call 1", which nobody replays
            assert (lapsed.status_code, lapsed.content) == (200, b"call 2: x")
            assert_first(lapsed)
            assert later.content == b"call 2: x"
            assert_replayed(later)
            assert app.calls == 2

    async def test_lost_holder_cannot_complete_over_the_new_claim(
        self, store: RedisStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With on_lost_claim = "retry", a dead holder finishing while the new holder still runs
        is refused: its client's response is cut off, and the record ends with the new holder's
        response."""
        leases: list[Lease] = []
        init, due = Lease.__init__, Lease.renew_now

        def tracking_init(self: Lease, *args: Any, **kwargs: Any) -> None:
            init(self, *args, **kwargs)
            leases.append(self)

        def first_holder_dead(self: Lease) -> None:
            if self is not leases[0]:
                due(self)

        monkeypatch.setattr(Lease, "__init__", tracking_init)
        monkeypatch.setattr(Lease, "renew_now", first_holder_dead)
        app = App(hold=(1, 2))
        async with client_for(idem(app, store, lock_ttl="300ms", on_lost_claim="retry")) as c:
            first = asyncio.create_task(c.post("/", content=b"x", headers=keyed()))
            await entered(app)
            second: list[asyncio.Task[httpx.Response]] = []

            async def second_claimed() -> bool:
                task = asyncio.create_task(c.post("/", content=b"x", headers=keyed()))
                waiter = asyncio.create_task(app.entered_calls[2].wait())
                done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if waiter in done:
                    second.append(task)
                    return True
                waiter.cancel()
                assert task.result().status_code == 409
                return False

            await poll(second_claimed)
            app.releases[1].set()
            with pytest.raises(httpx.RemoteProtocolError):
                await first
            app.releases[2].set()
            r2 = await second[0]
            later = await c.post("/", content=b"x", headers=keyed())
        assert r2.content == b"call 2: x"
        assert later.content == b"call 2: x"
        assert_replayed(later)
        assert app.calls == 2


# --------------------------------------------------------------------------------------------
# problems through the whole stack
# --------------------------------------------------------------------------------------------


class TestProblemsThroughTheGateway:
    async def test_refusals_carry_the_request_id(self, store: RedisStore) -> None:
        """Through GatewayMiddleware every idempotency refusal is a problem carrying the request's id."""
        app = App(hold_first=True)
        gw = GatewayMiddleware(app, {"idempotency": {"required_paths": ["/pay"], "max_body_bytes": 4}},
                               store=store)
        rid = {"X-Request-Id": "req-1"}
        async with client_for(gw) as c:
            missing = await c.post("/pay", content=b"x", headers=rid)
            invalid = await c.post("/pay", content=b"x", headers=keyed("a b", **rid))
            too_big = await c.post("/pay", content=b"xxxxx", headers=keyed(**rid))
            first = asyncio.create_task(c.post("/pay", content=b"x", headers=keyed()))
            await entered(app)
            busy = await c.post("/pay", content=b"x", headers=keyed(**rid))
            reused = await c.post("/pay", content=b"y", headers=keyed(**rid))
            app.release.set()
            await first
        for r, status, name in [(missing, 400, "idempotency-key-missing"),
                                (invalid, 400, "idempotency-key-invalid"),
                                (too_big, 413, "idempotency-body-too-large"),
                                (busy, 409, "idempotency-key-in-use"),
                                (reused, 422, "idempotency-key-reused")]:
            assert_problem(r, status, name)
            assert r.headers.get_list("x-request-id") == ["req-1"]
        assert app.calls == 1


# --------------------------------------------------------------------------------------------
# other scopes
# --------------------------------------------------------------------------------------------


class TestOtherScopes:
    async def test_websocket_passes_untouched(self, store: RedisStore) -> None:
        """A websocket scope (even with the key header) reaches the app as it came."""
        seen: list[tuple[Scope, Message]] = []

        async def ws_app(scope: Scope, receive: Receive, send: Send) -> None:
            seen.append((scope, await receive()))
            await send({"type": "websocket.accept"})

        sent: list[Message] = []

        async def receive() -> Message:
            return {"type": "websocket.connect"}

        async def send(message: Message) -> None:
            sent.append(message)

        scope: Scope = {"type": "websocket", "path": "/ws", "headers": [(KEY_B, b"k")],
                        "client": ("1.2.3.4", 1)}
        await idem(ws_app, store)(scope, receive, send)
        assert seen == [(scope, {"type": "websocket.connect"})]
        assert seen[0][0] is scope
        assert sent == [{"type": "websocket.accept"}]

    async def test_lifespan_passes_to_the_app_with_a_shared_store(self, store: RedisStore) -> None:
        """With a shared store, lifespan goes to the app as is and leaves the store to its owner."""
        app = App()
        sent = await run_lifespan(idem(app, store))
        assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
        assert app.lifespan_events == ["lifespan.startup", "lifespan.shutdown"]
        await store.ping()  # not closed by the middleware

    async def test_lone_middleware_opens_its_own_memory_store(self) -> None:
        """IdempotencyMiddleware given "memory://" loads its scripts at startup and serves requests."""
        app = App()
        mw = IdempotencyMiddleware(app, store="memory://")
        sha = hashlib.sha1(read_script("idempotency_claim").encode()).hexdigest()
        client = mw.store.client  # type: ignore[attr-defined]
        assert await client.script_exists(sha) == [False]
        loaded: list[list[bool]] = []
        replies: list[httpx.Response] = []

        async def serve() -> None:
            loaded.append(await client.script_exists(sha))
            async with client_for(mw) as c:
                replies.extend([await c.post("/", content=b"x", headers=keyed()) for _ in range(2)])

        sent = await run_lifespan(mw, between=serve)
        assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
        assert app.lifespan_events == ["lifespan.startup", "lifespan.shutdown"]
        assert loaded == [[True]]
        assert_first(replies[0])
        assert_replayed(replies[1])
        assert app.calls == 1


# --------------------------------------------------------------------------------------------
# log lines (CONTRACT "Operations": one line per replay, conflict, store error, with the request id)
# --------------------------------------------------------------------------------------------


class TestLogLines:
    async def test_replay_conflict_and_mismatch_each_log_one_line_with_the_request_id(
        self, store: RedisStore, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A 409, a replay and a 422 each write one record naming its event and request id; a
        first execution writes none."""
        app = App(hold_first=True)
        gw = GatewayMiddleware(app, store=store)
        with caplog.at_level(logging.INFO, logger="gateway"):
            async with client_for(gw) as c:
                rid1 = keyed(**{"X-Request-Id": "r-1"})
                first = asyncio.create_task(c.post("/", content=b"A", headers=rid1))
                await entered(app)
                busy = await c.post("/", content=b"A", headers=keyed(**{"X-Request-Id": "r-2"}))
                app.release.set()
                await first
                replay = await c.post("/", content=b"A", headers=keyed(**{"X-Request-Id": "r-3"}))
                other = await c.post("/", content=b"B", headers=keyed(**{"X-Request-Id": "r-4"}))
        assert (busy.status_code, replay.status_code, other.status_code) == (409, 200, 422)
        events = [(getattr(r, "event", None), getattr(r, "request_id", None)) for r in caplog.records
                  if r.name.startswith("gateway.idempotency")]
        assert events == [("idempotency.in_flight", "r-2"), ("idempotency.replayed", "r-3"),
                          ("idempotency.mismatch", "r-4")]

    async def test_store_error_logs_a_warning_with_the_action(self, caplog: pytest.LogCaptureFixture) -> None:
        """A failed claim writes one warning naming the event, the action taken and the error."""
        dead = {"url": f"redis://127.0.0.1:{free_port()}/0", "timeout": "200ms"}
        mw = IdempotencyMiddleware(App(), store=dead)
        with caplog.at_level(logging.INFO, logger="gateway"):
            async with client_for(mw) as c:
                r = await c.post("/", content=b"A", headers=keyed())
        await mw.store.close()
        assert r.status_code == 503
        [record] = [r for r in caplog.records if getattr(r, "event", "") == "idempotency.store_error"]
        assert record.levelno == logging.WARNING
        assert getattr(record, "action", None) == "deny"
        assert getattr(record, "error", "")
