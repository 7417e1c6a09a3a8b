"""The connection's early shed, in process: ``GatewayHttpProtocol`` fed bytes by a recording
transport, in front of a real ``GatewayMiddleware``.

What the socket tests (``tests/test_connection_shed.py``) cannot see: that a shed request makes
no scope, no ``RequestResponseCycle`` and no task, that its answer is the stack's byte for byte,
that a class's share is drawn once per request, and when the connection leaves a request to the
stack (pipelining, paused writes). The local shedder is put in the state under test by setting
its in-flight count or a class's share, as its ticks would.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from uvicorn.config import Config
from uvicorn.server import ServerState

from gateway._asgi import Receive, Scope, Send
from gateway.http_protocol import GatewayHttpProtocol
from gateway.shedding import DRAWN_SCOPE_KEY, LocalShedder
from gateway.stack import GatewayMiddleware

CONFIG = {
    "priority": [{"name": "critical", "paths": ["/c"]}],
    "shedding": {"local": {"enabled": True, "max_in_flight": 1, "max_loop_lag": "60s"}},
}
GET = b"GET /x HTTP/1.1\r\nHost: a\r\nX-Request-Id: rid-1\r\n\r\n"


class Transport(asyncio.Transport):
    """What the protocol writes, and whether it closed; a loopback peer."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def close(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 40000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class App:
    """The app behind the stack: records each request; ``/c?hold`` waits for ``release``."""

    def __init__(self) -> None:
        self.scopes: list[Scope] = []
        self.release = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scopes.append(scope)
        if scope["query_string"] == b"hold":
            await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})


class Server:
    """One stack, and connections to it as uvicorn makes them (its config, its server state)."""

    def __init__(self, error_format: str = "problem") -> None:
        self.app = App()
        self.gateway = GatewayMiddleware(self.app, {**CONFIG, "errors": {"format": error_format}})
        self.config = Config(app=self.gateway, lifespan="off", proxy_headers=False, access_log=False)
        self.config.load()
        self.state = ServerState()
        local = self.gateway.connection_shedder.local if self.gateway.connection_shedder else None
        assert local is not None
        self.local: LocalShedder = local

    def connect(self) -> tuple[GatewayHttpProtocol, Transport]:
        protocol = GatewayHttpProtocol(config=self.config, server_state=self.state, app_state={},
                                       _loop=asyncio.get_running_loop())
        transport = Transport()
        protocol.connection_made(transport)
        return protocol, transport

    async def settle(self, within_s: float = 10.0) -> None:
        """Until every request task has finished, within ``within_s``."""
        deadline = asyncio.get_running_loop().time() + within_s
        while self.state.tasks:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise AssertionError(f"request tasks did not finish within {within_s}s")
            await asyncio.wait(set(self.state.tasks), timeout=left)

    def close(self) -> None:
        self.local.stop()


@pytest.fixture
def server() -> Iterator[Server]:
    made: list[Server] = []

    def make(error_format: str = "problem") -> Server:
        made.append(Server(error_format))
        return made[-1]

    yield make  # type: ignore[misc]
    for s in made:
        s.close()


def _status(data: bytes) -> int:
    return int(data.split(b" ", 2)[1])


async def test_a_shed_request_makes_no_scope_cycle_or_task(server: Any) -> None:
    """Past max_in_flight, a default-class request is answered by the connection: one write, no
    cycle, no task, and the app never sees it."""
    s: Server = server()
    s.local.in_flight = 1
    protocol, transport = s.connect()
    scope_before = protocol.scope
    protocol.data_received(GET)
    assert len(transport.written) == 1
    assert _status(transport.written[0]) == 503
    assert b"\r\nx-request-id: rid-1\r\n" in transport.written[0]
    assert protocol.cycle is None
    assert protocol.scope is scope_before  # none made
    assert not s.state.tasks
    await asyncio.sleep(0)
    assert s.app.scopes == []
    assert not transport.closing


UVICORN_DEFAULTS = [(b"server", b"uvicorn"), (b"date", b"Tue, 01 Dec 2026 00:00:00 GMT")]


@pytest.mark.parametrize("server_headers", [[], UVICORN_DEFAULTS], ids=["serve", "uvicorn-defaults"])
@pytest.mark.parametrize("error_format", ["problem", "stripe"])
async def test_the_connections_answer_is_the_stacks_byte_for_byte(
        server: Any, server_headers: list[tuple[bytes, bytes]], error_format: str) -> None:
    """The same shed request answered by the connection and (writes paused, so left to it) by
    the stack: the same bytes, in either [errors] format, uvicorn's own default headers (as it
    adds them) included."""
    s: Server = server(error_format)
    s.state.default_headers = server_headers
    s.local.in_flight = 1
    early, early_transport = s.connect()
    early.data_received(GET)
    late, late_transport = s.connect()
    late.pause_writing()
    late.data_received(GET)
    assert s.state.tasks, "left to the stack"
    late.resume_writing()  # the stack's answer waits for it
    await s.settle()
    assert b"".join(late_transport.written) == b"".join(early_transport.written)
    head, _, body = b"".join(early_transport.written).partition(b"\r\n\r\n")
    head += b"\r\n"
    if error_format == "stripe":
        assert json.loads(body)["error"]["code"] == "load_shed"
        assert b"\r\nrequest-id: rid-1\r\n" in head
        assert b"\r\nstripe-should-retry: true\r\n" in head
    else:
        assert json.loads(body)["type"] == "urn:gateway:problem:load-shed"
    assert b"\r\nx-request-id: rid-1\r\n" in head


async def test_a_request_the_connection_admits_is_the_stacks_as_before(server: Any) -> None:
    """Not shedding: the request reaches the app with the scope uvicorn makes (headers, path,
    query), and no draw is noted in it."""
    s: Server = server()
    protocol, transport = s.connect()
    protocol.data_received(b"GET /x/y?q=1 HTTP/1.1\r\nHost: a\r\nX-Custom: v\r\n\r\n")
    await s.settle()
    [scope] = s.app.scopes
    assert (scope["method"], scope["path"], scope["query_string"]) == ("GET", "/x/y", b"q=1")
    assert (b"x-custom", b"v") in scope["headers"]
    assert DRAWN_SCOPE_KEY not in scope
    assert _status(transport.written[0]) == 200


async def test_a_class_share_is_drawn_once_per_request(server: Any) -> None:
    """With half of the default class admitted, about half of its requests reach the app: the
    connection draws, the stack does not draw again (twice would let a quarter through)."""
    s: Server = server()
    s.local.admits(0)  # starts the sampling timer; no pressure, so its ticks change nothing
    s.local.admitting[1] = 0.5
    s.local._partial = True
    n = 2000
    protocol, transport = s.connect()
    for _ in range(n):  # one keep-alive connection, one request at a time
        protocol.data_received(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        await s.settle()
        s.local.admitting[1] = 0.5  # whatever a tick did meanwhile
    statuses = [_status(w) for w in transport.written if w.startswith(b"HTTP/1.1")]
    assert len(statuses) == n
    assert statuses.count(200) == len(s.app.scopes)
    share = len(s.app.scopes) / n
    assert 0.4 < share < 0.6, share
    assert all(scope.get(DRAWN_SCOPE_KEY) is s.local for scope in s.app.scopes)


def test_a_drawn_request_is_still_held_to_the_in_flight_bound() -> None:
    """admits(drawn=True) skips the share's draw, not the in-flight bound or a share of 0."""
    from gateway.config import LocalShedding

    local = LocalShedder(LocalShedding(enabled=True, max_in_flight=2), 2)
    local._timer = object()  # type: ignore[assignment]  # no loop here: as if sampling had started
    local.admitting[1] = 0.01
    assert all(local.admits(1, drawn=True) for _ in range(100))
    local.admitting[1] = 0.0
    assert not local.admits(1, drawn=True)
    local.admitting[1] = 1.0
    local.in_flight = 2
    assert not local.admits(1, drawn=True)
    assert local.admits(0, drawn=True)  # the most critical class is never shed


async def test_a_request_behind_one_being_answered_is_left_to_the_stack(server: Any) -> None:
    """Pipelined behind a critical request still in the app, a shed-able request waits its turn
    (no early answer ahead of the first one's), and the stack sheds it after."""
    s: Server = server()
    protocol, transport = s.connect()
    protocol.data_received(b"GET /c?hold HTTP/1.1\r\nHost: a\r\n\r\n")
    await asyncio.sleep(0)
    assert s.local.in_flight == 1
    s.local.in_flight += 1  # another connection's request, still in flight after the first ends
    protocol.data_received(GET)
    assert transport.written == []  # nothing may go ahead of the held answer
    s.app.release.set()
    await s.settle()
    await s.settle()
    statuses = [_status(w) for w in transport.written if w.startswith(b"HTTP/1.1")]
    assert statuses == [200, 503]


async def test_nothing_behind_a_request_answered_with_close_is_served(server: Any) -> None:
    """An HTTP/1.0 shed request and a critical one pipelined behind it in the same read: the
    503 says close, the connection closes, and the second request never reaches the app."""
    s: Server = server()
    s.local.in_flight = 1
    protocol, transport = s.connect()
    protocol.data_received(b"GET /x HTTP/1.0\r\n\r\nGET /c HTTP/1.1\r\nHost: a\r\n\r\n")
    assert len(transport.written) == 1
    assert b"\r\nconnection: close\r\n" in transport.written[0]
    assert transport.closing
    assert not s.state.tasks
    await asyncio.sleep(0)
    assert s.app.scopes == []


async def test_a_body_past_the_drain_bound_closes_the_connection(server: Any) -> None:
    """A chunked body is dropped as it comes, and the connection closes once it passes
    SHED_DRAIN_MAX_BYTES, without waiting for its end."""
    from gateway.http_protocol import SHED_DRAIN_MAX_BYTES

    s: Server = server()
    s.local.in_flight = 1
    protocol, transport = s.connect()
    protocol.data_received(b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert b"\r\nconnection: close\r\n" in transport.written[0]
    chunk = b"%x\r\n" % 4096 + b"a" * 4096 + b"\r\n"
    sent = 0
    while not transport.closing and sent <= 2 * SHED_DRAIN_MAX_BYTES:
        protocol.data_received(chunk)
        sent += 4096
    assert transport.closing
    assert SHED_DRAIN_MAX_BYTES < sent <= SHED_DRAIN_MAX_BYTES + 4096
    assert len(transport.written) == 1
    assert not s.state.tasks
