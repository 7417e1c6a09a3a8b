"""X-Request-Id: kept when well formed, generated otherwise, seen downstream and echoed once.

CONTRACT.md section 5 "Proxy": the id is taken from the request when it is 1-128 characters of
``A-Z a-z 0-9 . _ ~ : / + = @ -``, generated otherwise, sent downstream and echoed on the
response. "Errors": every response the gateway makes itself is problem+json with ``type``,
``title``, ``status``, ``detail`` and carries ``X-Request-Id``.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway._asgi import ASGIApp, Message, Receive, Scope, Send
from gateway.problem import QUOTA_EXCEEDED, problem_type, send_problem
from gateway.requestid import RequestIdMiddleware, current_request_id, valid_request_id

HEADER = b"x-request-id"
ALLOWED = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._~:/+=@-"
# fullmatch, not ``^...$``: ``$`` also matches before a trailing newline
REFERENCE = re.compile(rb"[A-Za-z0-9._~:/+=@-]{1,128}")
GENERATED = re.compile(r"[0-9a-f]{32}")


class Recorder:
    """A tiny ASGI app that records what it saw and answers 200 (optionally with its own id)."""

    def __init__(self, *, own_ids: tuple[bytes, ...] = ()) -> None:
        self.own_ids = own_ids
        self.ids: list[bytes] = []
        self.current: str | None = None
        self.calls = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls += 1
        self.ids = [v for n, v in scope["headers"] if n == HEADER]
        self.current = current_request_id()
        headers = [(b"content-type", b"text/plain")]
        headers += [(name, b"from-the-app") for name in self.own_ids]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})


@asynccontextmanager
async def client(app: ASGIApp) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


def echoed(response: httpx.Response) -> list[str]:
    return response.headers.get_list("x-request-id")


class TestWellFormedIdIsKept:
    @pytest.mark.parametrize(
        "rid",
        [
            "a",
            "abc",
            "x" * 128,
            ALLOWED,
            "3f2504e0-4f89-11d3-9a0c-0305e82c3301",
            "req-1.2_3~4:5/6+7=8@9",
            "dGVzdA==",
        ],
    )
    async def test_echoed_and_sent_downstream(self, rid: str) -> None:
        """A well-formed id is what the app sees and what the response echoes, once."""
        app = Recorder()
        async with client(RequestIdMiddleware(app)) as c:
            response = await c.get("/", headers={"X-Request-Id": rid})
        assert response.status_code == 200
        assert echoed(response) == [rid]
        assert app.ids == [rid.encode()]
        assert app.current == rid

    @pytest.mark.parametrize(
        "own",
        [(b"x-request-id",), (b"X-Request-ID",), (b"x-request-id", b"X-REQUEST-ID")],
    )
    async def test_app_set_id_is_replaced(self, own: tuple[bytes, ...]) -> None:
        """The response carries exactly one X-Request-Id even when the app set its own."""
        app = Recorder(own_ids=own)
        async with client(RequestIdMiddleware(app)) as c:
            response = await c.get("/", headers={"X-Request-Id": "given-1"})
            generated = await c.get("/")
        assert echoed(response) == ["given-1"]
        assert len(echoed(generated)) == 1
        assert GENERATED.fullmatch(echoed(generated)[0])
        assert "from-the-app" not in response.headers.get_list("x-request-id")

    async def test_duplicate_incoming_ids_reach_app_as_one(self) -> None:
        """With two incoming X-Request-Id lines the app still sees exactly the one id echoed."""
        app = Recorder()
        async with client(RequestIdMiddleware(app)) as c:
            response = await c.get(
                "/", headers=[("X-Request-Id", "good-1"), ("X-Request-Id", "<script>")]
            )
        assert echoed(response) == ["good-1"]
        assert app.ids == [b"good-1"]


BAD_IDS = [
    pytest.param(None, id="missing"),
    pytest.param(b"", id="empty"),
    pytest.param(b"x" * 129, id="129-chars"),
    pytest.param(b"a b", id="space"),
    pytest.param(b'a"b', id="quote"),
    pytest.param(b"<script>", id="angle"),
    pytest.param(b"50%25", id="percent"),
    pytest.param(b"a,b", id="comma"),
    pytest.param(b"a;b", id="semicolon"),
    pytest.param(b"a\\b", id="backslash"),
    pytest.param(b"caf\xc3\xa9", id="utf8"),
    pytest.param(b"\xff\xfe", id="high-bytes"),
]


class TestBadIdIsReplaced:
    @pytest.mark.parametrize("given_id", BAD_IDS)
    async def test_replaced_by_generated(self, given_id: bytes | None) -> None:
        """A missing or malformed id is replaced by a generated 32-hex id, sent on and echoed."""
        app = Recorder()
        headers = {} if given_id is None else {b"x-request-id": given_id}
        async with client(RequestIdMiddleware(app)) as c:
            response = await c.get("/", headers=headers)
        ids = echoed(response)
        assert len(ids) == 1
        assert GENERATED.fullmatch(ids[0])
        assert app.ids == [ids[0].encode()]
        assert app.current == ids[0]

    async def test_generated_ids_differ(self) -> None:
        """Two requests without an id get two different generated ids."""
        app = Recorder()
        async with client(RequestIdMiddleware(app)) as c:
            first = echoed(await c.get("/"))
            second = echoed(await c.get("/", headers={"X-Request-Id": "bad id"}))
        assert len(first) == len(second) == 1
        assert first != second

    async def test_other_headers_survive_replacement(self) -> None:
        """Replacing a bad id leaves the app's other request headers in place."""
        seen: dict[str, Any] = {}

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            seen["headers"] = list(scope["headers"])
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        async with client(RequestIdMiddleware(app)) as c:
            await c.get("/", headers={"X-Request-Id": "bad id", "X-Other": "kept"})
        names = [n for n, _ in seen["headers"]]
        assert (b"x-other", b"kept") in seen["headers"]
        assert names.count(HEADER) == 1


class TestValidRequestId:
    @pytest.mark.parametrize(
        ("value", "valid"),
        [
            (b"", False),
            (b"a", True),
            (b"a" * 128, True),
            (b"a" * 129, False),
            (ALLOWED.encode(), True),
            (b"abc\n", False),
            (b"\nabc", False),
            (b"abc\x00", False),
        ],
    )
    def test_boundaries(self, value: bytes, valid: bool) -> None:
        """Length 1 and 128 are valid; 0, 129 and any stray byte are not."""
        assert valid_request_id(value) is valid

    @pytest.mark.parametrize("char", list(ALLOWED))
    def test_every_allowed_character(self, char: str) -> None:
        """Each allowed character is valid alone and inside a longer id."""
        assert valid_request_id(char.encode())
        assert valid_request_id(b"id" + char.encode() + b"x")

    @pytest.mark.parametrize(
        "byte", [*b" \"'<>%,;\\!#$&()*?[]^`{|}\t\r\n\x00\x7f", 0x80, 0xC3, 0xFF]
    )
    def test_disallowed_bytes(self, byte: int) -> None:
        """A disallowed byte makes an otherwise good id invalid."""
        assert not valid_request_id(bytes([byte]))
        assert not valid_request_id(b"good" + bytes([byte]) + b"id")

    @given(
        st.one_of(
            st.binary(max_size=140),
            st.text(alphabet=ALLOWED, max_size=140).map(str.encode),
            st.text(alphabet=ALLOWED + " <%\n\x00\xe9", min_size=120, max_size=135).map(
                lambda s: s.encode("utf-8")
            ),
        )
    )
    def test_matches_reference_regex(self, value: bytes) -> None:
        """valid_request_id agrees with the contract's character class and 1-128 length."""
        assert valid_request_id(value) is (REFERENCE.fullmatch(value) is not None)


class TestCurrentRequestId:
    async def test_current_inside_equals_echo_and_none_after(self) -> None:
        """current_request_id() inside the app is the echoed id, and None before and after."""
        app = Recorder()
        assert current_request_id() is None
        async with client(RequestIdMiddleware(app)) as c:
            given_resp = await c.get("/", headers={"X-Request-Id": "ctx-1"})
            assert current_request_id() is None
            generated_resp = await c.get("/")
            generated_current = app.current
        assert current_request_id() is None
        assert echoed(given_resp) == ["ctx-1"]
        assert echoed(generated_resp) == [generated_current]

    async def test_reset_after_app_error(self) -> None:
        """An app that raises still leaves current_request_id() None afterwards."""

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            assert current_request_id() == "err-1"
            raise RuntimeError("boom")

        async with client(RequestIdMiddleware(app)) as c:
            with pytest.raises(RuntimeError, match="boom"):
                await c.get("/", headers={"X-Request-Id": "err-1"})
        assert current_request_id() is None

    async def test_concurrent_requests_keep_their_own_id(self) -> None:
        """Two interleaved requests each see their own id throughout."""
        first_inside = anyio.Event()
        second_done = anyio.Event()
        seen: dict[str, list[str | None]] = {}

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            path = scope["path"]
            before = current_request_id()
            if path == "/first":
                first_inside.set()
                await second_done.wait()
            else:
                await first_inside.wait()
            seen[path] = [before, current_request_id()]
            if path == "/second":
                second_done.set()
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        responses: dict[str, httpx.Response] = {}
        async with client(RequestIdMiddleware(app)) as c:

            async def get(path: str, rid: str) -> None:
                responses[path] = await c.get(path, headers={"X-Request-Id": rid})

            async with anyio.create_task_group() as tg:
                tg.start_soon(get, "/first", "id-first")
                tg.start_soon(get, "/second", "id-second")
        assert seen == {"/first": ["id-first"] * 2, "/second": ["id-second"] * 2}
        assert echoed(responses["/first"]) == ["id-first"]
        assert echoed(responses["/second"]) == ["id-second"]


class TestNonHttpPassThrough:
    @pytest.mark.parametrize(
        "scope",
        [
            {"type": "lifespan", "asgi": {"version": "3.0"}},
            {
                "type": "websocket",
                "path": "/ws",
                "headers": [(b"x-request-id", b"bad id"), (b"host", b"test")],
            },
            {"type": "websocket", "path": "/ws", "headers": []},
        ],
    )
    async def test_scope_passes_untouched(self, scope: dict[str, Any]) -> None:
        """A non-HTTP scope reaches the app as the same object, with the same receive and send."""
        snapshot = {**scope, "headers": list(scope.get("headers", []))}
        got: dict[str, Any] = {}

        async def app(s: Scope, receive: Receive, send: Send) -> None:
            got.update(scope=s, receive=receive, send=send, current=current_request_id())

        async def receive() -> Message:
            return {"type": "lifespan.startup"}

        sent: list[Message] = []

        async def send(message: Message) -> None:
            sent.append(message)

        await RequestIdMiddleware(app)(scope, receive, send)
        assert got["scope"] is scope
        assert got["receive"] is receive
        assert got["send"] is send
        assert got["current"] is None
        assert {**scope, "headers": list(scope.get("headers", []))} == snapshot


class TestProblemResponses:
    @staticmethod
    def problem_app(status: int, seen: dict[str, Any]) -> ASGIApp:
        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            seen["current"] = current_request_id()
            await send_problem(
                send,
                status=status,
                type_=QUOTA_EXCEEDED if status == 429 else problem_type("test"),
                title="Test problem",
                detail="made by the test",
                headers=[(b"retry-after", b"3")],
            )

        return app

    @staticmethod
    def check_problem(response: httpx.Response, status: int) -> None:
        assert response.status_code == status
        assert response.headers["content-type"] == "application/problem+json"
        assert response.headers["cache-control"] == "no-store"
        body = json.loads(response.content)
        assert {"type", "title", "status", "detail"} <= body.keys()
        assert body["status"] == status
        assert all(isinstance(body[k], str) and body[k] for k in ("type", "title", "detail"))

    @pytest.mark.parametrize("status", [400, 409, 413, 422, 429, 503])
    async def test_inside_middleware_one_id(self, status: int) -> None:
        """A problem sent inside RequestIdMiddleware carries exactly the middleware's id."""
        seen: dict[str, Any] = {}
        app = RequestIdMiddleware(self.problem_app(status, seen))
        async with client(app) as c:
            given_resp = await c.get("/", headers={"X-Request-Id": "prob-1"})
            given_current = seen["current"]
            generated_resp = await c.get("/")
        self.check_problem(given_resp, status)
        self.check_problem(generated_resp, status)
        assert echoed(given_resp) == ["prob-1"] == [given_current]
        assert echoed(generated_resp) == [seen["current"]]
        assert GENERATED.fullmatch(seen["current"])
        assert given_resp.headers["retry-after"] == "3"

    @pytest.mark.parametrize("status", [400, 429, 503])
    async def test_outside_middleware_still_has_id(self, status: int) -> None:
        """A problem sent with no RequestIdMiddleware around still carries one generated id."""
        seen: dict[str, Any] = {}
        async with client(self.problem_app(status, seen)) as c:
            first = await c.get("/")
            second = await c.get("/")
        assert seen["current"] is None
        self.check_problem(first, status)
        assert len(echoed(first)) == 1
        assert GENERATED.fullmatch(echoed(first)[0])
        assert echoed(first) != echoed(second)
