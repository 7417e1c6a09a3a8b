"""Small ASGI doubles for the middleware tests: a counting app, a client, a lifespan driver, and
the checks they share (a problem+json answer, a poll with a deadline)."""

from __future__ import annotations

import asyncio
import inspect
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx

from gateway._asgi import ASGIApp, Message, Receive, Scope, Send

#: The prefix of the gateway's own problem types.
PROBLEM = "urn:gateway:problem:"


class CountingApp:
    """An ASGI app that answers 200 ``ok`` (plus ``extra_headers``) and counts its calls."""

    def __init__(self, extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.calls = 0
        self.scopes: list[Scope] = []
        self.lifespan_events: list[str] = []
        self.extra_headers = extra_headers or []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scopes.append(scope)
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send, self.lifespan_events)
            return
        if scope["type"] != "http":
            return
        self.calls += 1
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain"), *self.extra_headers]})
        await send({"type": "http.response.body", "body": b"ok"})


async def answer_lifespan(receive: Receive, send: Send, events: list[str]) -> None:
    """An app's side of the lifespan protocol: complete startup and shutdown, noting each event."""
    while True:
        message = await receive()
        events.append(message["type"])
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        else:
            await send({"type": "lifespan.shutdown.complete"})
            return


class _Unfinished(Exception):
    """The app returned without finishing its response (a server closes the connection)."""


def finishing(app: ASGIApp) -> ASGIApp:
    """``app``, raising ``_Unfinished`` when an HTTP response it started was never finished."""

    async def watched(scope: Scope, receive: Receive, send: Send) -> None:
        finished = False

        async def watching(message: Message) -> None:
            nonlocal finished
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True

        await app(scope, receive, watching)
        if scope["type"] == "http" and not finished:
            raise _Unfinished

    return watched


class CuttingTransport(httpx.ASGITransport):
    """An ASGI transport on which an unfinished response is what a client of a real server sees:
    the connection closes mid-response (``httpx.RemoteProtocolError``)."""

    def __init__(self, app: ASGIApp, **kwargs: Any) -> None:
        super().__init__(app=finishing(app), **kwargs)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await super().handle_async_request(request)
        except _Unfinished:
            raise httpx.RemoteProtocolError("the response was cut off", request=request) from None


def client_for(app: ASGIApp, client_ip: str = "203.0.113.7") -> httpx.AsyncClient:
    transport = CuttingTransport(app, client=(client_ip, 4321))
    return httpx.AsyncClient(transport=transport, base_url="http://gateway.test")


async def run_lifespan(app: ASGIApp, between: Callable[[], Any] | None = None) -> list[str]:
    """Drive startup then shutdown through ``app``; return what it sent back, in order."""
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    sent: list[str] = []
    started = asyncio.Event()

    async def receive() -> Message:
        return await inbox.get()

    async def send(message: Message) -> None:
        sent.append(message["type"])
        if message["type"].startswith("lifespan.startup."):
            started.set()

    inbox.put_nowait({"type": "lifespan.startup"})
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    task = asyncio.ensure_future(app(scope, receive, send))
    # the block in between, then shutdown, which may drain settles for up to SHUTDOWN_DRAIN_S
    async with asyncio.timeout(30):
        await started.wait()
        if between is not None:
            result = between()
            if asyncio.iscoroutine(result):
                await result
        inbox.put_nowait({"type": "lifespan.shutdown"})
        await task
    return sent


@asynccontextmanager
async def lifespan_running(app: ASGIApp) -> AsyncIterator[None]:
    """Lifespan startup before the block, shutdown after it (the store and pools closed)."""
    inside = asyncio.Event()
    leave = asyncio.Event()

    async def between() -> None:
        inside.set()
        await leave.wait()

    task = asyncio.ensure_future(run_lifespan(app, between))
    async with asyncio.timeout(10):
        await asyncio.wait([task, asyncio.ensure_future(inside.wait())], return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
        raise AssertionError("lifespan ended before startup completed")
    try:
        yield
    finally:
        leave.set()
        sent = await task
        assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


def run_in_threads(target: Callable[[int], None], count: int, timeout_s: float = 60.0) -> None:
    """Run ``target(0)`` ... ``target(count - 1)`` in threads of their own (each its own event
    loop, when ``target`` calls ``asyncio.run``) and wait for all of them, within a bound."""
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout_s)
    assert not any(t.is_alive() for t in threads), "a thread did not finish in time"


def assert_problem(r: Any, status: int, type_: str) -> dict[str, Any]:
    """``r`` (an httpx response, or a recorded reply with ``status_code``, ``headers`` and
    ``content``) is the gateway's own RFC 9457 answer with this status and type URI."""
    assert r.status_code == status
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["x-request-id"]
    assert r.headers["content-length"] == str(len(r.content))
    body: dict[str, Any] = json.loads(r.content)
    assert body["type"] == type_
    assert body["status"] == status
    assert isinstance(body["title"], str)
    assert body["title"]
    assert isinstance(body["detail"], str)
    assert body["detail"]
    return body


async def poll(
    check: Callable[[], bool | Awaitable[bool]], deadline_s: float = 10.0, every_s: float = 0.02
) -> None:
    """Call ``check`` (plain or async) until it is true; fail after ``deadline_s``."""
    end = time.monotonic() + deadline_s
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        assert time.monotonic() < end, f"condition not met within {deadline_s}s"
        await asyncio.sleep(every_s)


async def call_asgi(app: ASGIApp, scope: Scope, body: bytes = b"") -> list[Message]:
    """Drive one request with exactly this scope (no client library tidies its target or headers)
    and return what the app sent."""
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent
