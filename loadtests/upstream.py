"""The upstream the load tests put behind the gateway: a small pure-ASGI app that keeps a record.

Run by the runner as ``python -m uvicorn loadtests.upstream:create_app --factory`` (uvloop,
httptools) in a process of its own. The record is what the payments check trusts: the gateway's
claim that a key ran at most once is verified against what the upstream itself executed.

- ``GET /hello``: a tiny JSON body.
- ``POST /charges``: counts one execution under its ``Idempotency-Key`` (or as unkeyed), sleeps
  ``LOADTESTS_CHARGE_DELAY_MS`` (2 ms by default, so duplicates really overlap), answers 201
  with a charge id from a counter.
- ``GET /work?ms=N``: a slow backend call (the overload scenario's flood): counts one, sleeps
  ``N`` ms (at most ``MAX_WORK_MS``; asyncio's sleep, so it holds a request in flight without
  taking the CPU the gateway and Locust share), answers 200.
- ``GET /_record``: ``{"executions": {key: n}, "unkeyed": n, "charges": n, "work": n}``.
- ``POST /_record/reset``: forgets the record.

The state belongs to the app object the factory builds (one per process, one event loop).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

__all__ = ["DELAY_ENV", "MAX_WORK_MS", "Upstream", "create_app"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DELAY_ENV = "LOADTESTS_CHARGE_DELAY_MS"
MAX_BODY = 64 * 1024  # bodies beyond it are counted, not kept: the app only hashes them
HELLO = b'{"message":"hello"}'
WORKED = b'{"worked":true}'
MAX_WORK_MS = 1000  # /work never holds a request longer than this
JSON = b"application/json"


class Upstream:
    """The ASGI app; ``executions`` counts charges per Idempotency-Key."""

    def __init__(self, charge_delay_s: float = 0.002) -> None:
        self.charge_delay_s = charge_delay_s
        self.executions: Counter[str] = Counter()
        self.unkeyed = 0
        self.charges = 0
        self.work = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if path == "/hello" and method == "GET":
            await _respond(send, 200, HELLO)
        elif path == "/charges" and method == "POST":
            await self._charge(scope, receive, send)
        elif path == "/work" and method == "GET":
            self.work += 1
            await asyncio.sleep(_work_ms(scope) / 1000)
            await _respond(send, 200, WORKED)
        elif path == "/_record" and method == "GET":
            record = {"executions": dict(self.executions), "unkeyed": self.unkeyed,
                      "charges": self.charges, "work": self.work}
            await _respond(send, 200, json.dumps(record).encode())
        elif path == "/_record/reset" and method == "POST":
            self.executions.clear()
            self.unkeyed = self.charges = self.work = 0
            await _respond(send, 200, b'{"reset":true}')
        else:
            await _respond(send, 404, b'{"error":"no such endpoint"}')

    async def _charge(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = None
        for name, value in scope["headers"]:
            if name == b"idempotency-key":
                key = bytes(value).decode("latin-1")
        # counted when it starts: an execution is what a second run of the key would repeat
        if key is None:
            self.unkeyed += 1
        else:
            self.executions[key] += 1
        self.charges += 1
        number = self.charges
        digest = await _body_digest(receive)
        if self.charge_delay_s > 0:
            await asyncio.sleep(self.charge_delay_s)
        body = json.dumps({"id": f"ch_{number:09d}", "object": "charge", "body_sha256": digest})
        await _respond(send, 201, body.encode())


def _work_ms(scope: Scope) -> int:
    """``ms`` of the query string, 0 to ``MAX_WORK_MS``; 0 when absent or not a number."""
    for pair in bytes(scope.get("query_string", b"")).split(b"&"):
        name, _, value = pair.partition(b"=")
        if name == b"ms" and value.isdigit():
            return min(int(value), MAX_WORK_MS)
    return 0


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _body_digest(receive: Receive) -> str:
    digest = hashlib.sha256()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        digest.update(message.get("body", b"")[:MAX_BODY])
        if not message.get("more_body", False):
            break
    return digest.hexdigest()[:16]


async def _respond(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", JSON), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app() -> Upstream:
    """uvicorn's factory: the charge delay from ``LOADTESTS_CHARGE_DELAY_MS`` (milliseconds)."""
    delay_ms = float(os.environ.get(DELAY_ENV, "2"))
    return Upstream(charge_delay_s=max(0.0, delay_ms) / 1000)
