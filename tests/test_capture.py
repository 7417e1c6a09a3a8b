"""Capture holds a keyed response's end back until its outcome is stored, and, when it cannot be,
leaves the response visibly unfinished: checked on the ASGI messages themselves."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway._asgi import Message
from gateway.idempotency import IdempotencyMiddleware
from gateway.idempotency.capture import Capture, ResponseCutOff
from gateway.store.memory import memory_store
from tests.asgi_helpers import PROBLEM

START = {"type": "http.response.start", "status": 201,
         "headers": [(b"content-type", b"text/plain"), (b"content-length", b"10")]}
STREAMED = {"type": "http.response.start", "status": 200,
            "headers": [(b"content-type", b"text/event-stream")]}


class Wire:
    """A recording ``send``, and an ``on_end`` that notes what had gone out when it ran."""

    def __init__(self, stored: bool) -> None:
        self.sent: list[Message] = []
        self.sent_at_end: list[Message] | None = None
        self._stored = stored

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    async def on_end(self, capture: Capture) -> bool:
        self.sent_at_end = list(self.sent)
        return self._stored

    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")

    def finished(self) -> bool:
        return any(m["type"] == "http.response.body" and not m.get("more_body", False) for m in self.sent)


async def stream(capture: Capture, *messages: Message) -> None:
    for message in messages:
        await capture.send(message)


def chunk(body: bytes, more: bool = True) -> Message:
    return {"type": "http.response.body", "body": body, "more_body": more}


async def test_the_bytes_that_complete_the_body_wait_for_the_outcome() -> None:
    """Content-Length framed, stored: every byte goes out, but the chunk that reaches the
    declared length only after on_end ran (it would complete the response)."""
    wire = Wire(stored=True)
    capture = Capture(wire.send, 1024, wire.on_end)
    await stream(capture, START, chunk(b"char"), chunk(b"ged"), chunk(b"-ok"), chunk(b"", more=False))
    assert wire.sent_at_end is not None
    assert b"".join(m.get("body", b"") for m in wire.sent_at_end) == b"charged"  # "-ok" held back
    assert wire.body() == b"charged-ok"
    assert wire.finished()
    assert wire.sent[0] == START
    assert capture.stored() is not None


async def test_a_stream_goes_out_as_it_comes_and_only_its_end_waits() -> None:
    """No Content-Length (chunked): each chunk goes out at once; only the last message (the
    last chunk) waits, and when the outcome is not stored it never goes out."""
    for stored in (True, False):
        wire = Wire(stored=stored)
        capture = Capture(wire.send, 1024, wire.on_end)
        await stream(capture, STREAMED, chunk(b"event 1\n"))
        assert wire.body() == b"event 1\n"  # not held for the next one
        if stored:
            await stream(capture, chunk(b"event 2\n", more=False))
            assert wire.finished()
        else:
            with pytest.raises(ResponseCutOff):
                await stream(capture, chunk(b"event 2\n", more=False))
            assert not wire.finished()
        assert wire.sent_at_end is not None
        assert b"".join(m.get("body", b"") for m in wire.sent_at_end) == b"event 1\n"


async def test_a_response_not_stored_never_gets_its_last_bytes() -> None:
    """Not stored: the last bytes never go out, the app's send raises, and nothing is sent
    after, so a Content-Length client sees a short body."""
    wire = Wire(stored=False)
    capture = Capture(wire.send, 1024, wire.on_end)
    with pytest.raises(ResponseCutOff):
        await stream(capture, START, chunk(b"charged"), chunk(b"-ok", more=False))
    assert wire.body() == b"charged"
    assert not wire.finished()
    with pytest.raises(ResponseCutOff):
        await capture.send(chunk(b"", more=False))  # an app that tries again is refused too
    assert not wire.finished()
    assert capture.cut_off
    assert not capture.unanswered


async def test_an_empty_body_not_stored_goes_out_without_its_length() -> None:
    """Nothing but the head held: it goes out without Content-Length (so it is chunked and
    visibly lacks its last chunk), never as a whole empty 201."""
    wire = Wire(stored=False)
    capture = Capture(wire.send, 1024, wire.on_end)
    start = {**START, "headers": [(b"location", b"/charges/1"), (b"content-length", b"0")]}
    with pytest.raises(ResponseCutOff):
        await stream(capture, start, chunk(b"", more=False))
    assert wire.sent == [{**start, "headers": [(b"location", b"/charges/1")]}]
    assert not capture.unanswered


@pytest.mark.parametrize(("status", "version"), [(204, "1.1"), (304, "1.1"), (201, "1.0")])
async def test_where_a_head_is_a_whole_response_nothing_goes_out(status: int, version: str) -> None:
    """A 204/304 head, or an empty HTTP/1.0 one (its body ends at the close), would be a whole
    response even without its length: nothing is sent, and the caller is told to answer
    (``unanswered``)."""
    wire = Wire(stored=False)
    capture = Capture(wire.send, 1024, wire.on_end, http_version=version)
    head = {**START, "status": status, "headers": [(b"content-length", b"0")] if status == 201 else []}
    with pytest.raises(ResponseCutOff):
        await stream(capture, head, chunk(b"", more=False))
    assert wire.sent == []
    assert capture.unanswered


async def test_the_middleware_answers_outcome_unknown_for_a_cut_off_204() -> None:
    """Through the middleware: a 204 whose outcome cannot be stored reaches the client as the
    502 outcome-unknown problem (not replayed), never as a 204."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    store = memory_store(key_prefix="t-capture", timeout_s=1.0)

    async def refuse(*args: Any) -> bool:
        return False  # as if the record were another's: the outcome is not stored

    store.idempotency_complete = refuse  # type: ignore[method-assign]
    mw = IdempotencyMiddleware(app, store=store)
    wire = Wire(stored=True)
    scope = {"type": "http", "method": "POST", "path": "/pay", "raw_path": b"/pay", "query_string": b"",
             "headers": [(b"idempotency-key", b"k-204"), (b"x-api-key", b"client")],
             "http_version": "1.1", "client": ("127.0.0.1", 5000)}
    messages = iter([{"type": "http.request", "body": b"{}", "more_body": False}])

    async def receive() -> Message:
        return next(messages, {"type": "http.disconnect"})

    await store.open()
    try:
        await mw(scope, receive, wire.send)
    finally:
        await store.close()
    assert wire.sent[0]["status"] == 502
    assert json.loads(wire.body())["type"] == PROBLEM + "outcome-unknown"
    assert (b"idempotent-replayed", b"true") not in wire.sent[0]["headers"]
    assert wire.finished()
