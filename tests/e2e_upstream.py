"""The upstream the end-to-end tests put behind ``gateway serve``: a small pure-ASGI app.

Run it with ``python -m uvicorn tests.e2e_upstream:app --no-server-header --no-date-header`` from the
checkout (``tests/serve_process.py`` does). It is a test app: its state is process-global and
it trusts its input. Every wait inside it is bounded.

Endpoints (any method unless said):

- ``/health``: 200 ``ok``.
- ``/echo...``: JSON with the method, raw path, query string, every request header as
  ``[name, value]``, and the body's length and SHA-256.
- ``/slow?s=SECONDS``: sleeps, then 200.
- ``POST /charges[?delay=S]``: records the execution under its ``Idempotency-Key`` when it
  starts and again when it finishes, sleeps ``delay``, answers 201 with a charge id.
  ``GET /executions`` returns ``{"started": {key: n}, "finished": {key: n}}``.
- ``POST /upload?id=U``: counts the body bytes as they arrive (``GET /progress?id=U`` reads the
  count), answers with the total and the SHA-256.
- ``GET /download?mb=N&id=D``: streams N MiB in 64 KiB chunks (``chunk(i)``); after the first
  chunk it waits (up to 20 s) for ``/release?id=D``, then sends the rest.
- ``/headers-out``: a 203 carrying hop-by-hop response headers next to ordinary ones.
- ``/drop-mid-body``: starts a 1 MB response, sends 1000 bytes, then fails (uvicorn closes the
  connection, so the body is cut off).
- ``/gzip``: a gzip-encoded body (``GZIP_BODY``) with ``Content-Encoding: gzip``.
- ``/redirect``: 302 to ``/echo``.
- ``/seen?rid=R``: how many requests carrying ``X-Request-Id: R`` reached this upstream.
- ``POST /v1/customers``, ``/v1/limited``, ``/v1/one-at-a-time`` (Stripe-like, form body, for
  the official ``stripe`` client): counts the attempt under its ``Idempotency-Key``, then per
  its ``description``: ``hold`` waits (up to 20 s) for ``/release?id=KEY``, ``sleep:S`` sleeps
  S seconds, ``reject`` answers Stripe's 400 ``invalid_request_error``; otherwise 200 with a
  customer object. Every answer carries ``Request-Id: req_up_N``. ``GET /v1/attempts?key=K``
  returns ``{"count": n}``; ``GET /v1/hold?id=H`` is held until ``/release?id=H`` (up to
  20 s), for a request in flight (counted as an attempt under H when it arrives).
- ``POST /soak/pay`` (the chaos soak's payment, ``tests/chaos_soak.py``): counts the arrival
  under its ``Idempotency-Key`` (else the body's ``payment``), waits ``SOAK_PAY_S`` plus a little
  jitter, records the execution with the exact body it answers, then answers 200 with a body
  unique to this execution (the payment, a random charge id, the execution's number).
  ``GET /soak/records`` returns ``{key: {"started": n, "finished": n, "bodies": [...]}}``: the
  soak's verdict is judged from these. ``GET /soak/in-flight`` returns ``{forwarded host: n}``,
  the payments being executed now, by the ``X-Forwarded-Host`` (the gateway) they came through.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import itertools
import json
import os
import random
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

CHUNK = 64 * 1024
MIB = 1024 * 1024
RELEASE_WAIT_S = 20.0
MAX_SLEEP_S = 30.0
SERVER_HEADER = b"e2e-upstream/1"
DATE_HEADER = b"Tue, 01 Jan 2030 00:00:00 GMT"  # a date no server would send now
_PATTERN = bytes(range(256)) * (CHUNK // 256)
GZIP_BODY = gzip.compress(b"compressed, and it stays that way " * 100, mtime=0)

# process-global test state (one uvicorn worker, one event loop)
_started: Counter[str] = Counter()
_finished: Counter[str] = Counter()
_progress: dict[str, int] = {}
_releases: dict[str, asyncio.Event] = {}
_seen_request_ids: Counter[str] = Counter()
SOAK_PAY_S = 0.5
SOAK_JITTER_S = 0.1
_soak_records: dict[str, dict[str, Any]] = {}
_soak_in_flight: Counter[str] = Counter()
_soak_executions = itertools.count(1)
_stripe_attempts: Counter[str] = Counter()
_stripe_requests = itertools.count(1)


def chunk(i: int) -> bytes:
    """The ``i``-th 64 KiB chunk of a download: its index, then a fixed pattern (order shows)."""
    return i.to_bytes(8, "big") + _PATTERN[8:]


def download_sha256(mb: int) -> str:
    """The SHA-256 of the whole ``/download?mb=N`` body, as a client should compute it."""
    digest = hashlib.sha256()
    for i in range(mb * MIB // CHUNK):
        digest.update(chunk(i))
    return digest.hexdigest()


def _release_event(name: str) -> asyncio.Event:
    return _releases.setdefault(name, asyncio.Event())


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def _query(scope: Scope) -> dict[str, str]:
    parsed = parse_qs(bytes(scope["query_string"]).decode("latin-1"))
    return {k: v[0] for k, v in parsed.items()}


def _seconds(text: str | None, default: float = 0.0) -> float:
    return min(float(text), MAX_SLEEP_S) if text else default


async def _respond(send: Send, status: int, body: bytes, *,
                   content_type: bytes = b"application/json",
                   headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode()),
            (b"server", SERVER_HEADER),
            (b"date", DATE_HEADER),
            *(headers or []),
        ],
    })
    await send({"type": "http.response.body", "body": body})


async def _json(send: Send, status: int, data: object) -> None:
    await _respond(send, status, json.dumps(data).encode())


async def _read_body(receive: Receive, on_chunk: Callable[[int], None] | None = None,
                     ) -> tuple[int, str]:
    """Read the whole request body chunk by chunk; (length, sha256) without keeping it."""
    digest = hashlib.sha256()
    total = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        body = message.get("body", b"")
        total += len(body)
        digest.update(body)
        if on_chunk is not None:
            on_chunk(total)
        if not message.get("more_body", False):
            break
    return total, digest.hexdigest()


async def echo(scope: Scope, receive: Receive, send: Send) -> None:
    length, sha = await _read_body(receive)
    await _json(send, 200, {
        "method": scope["method"],
        "raw_path": bytes(scope.get("raw_path") or scope["path"].encode()).decode("latin-1"),
        "query_string": bytes(scope["query_string"]).decode("latin-1"),
        "headers": [[bytes(k).decode("latin-1"), bytes(v).decode("latin-1")]
                    for k, v in scope["headers"]],
        "body_length": length,
        "body_sha256": sha,
        "pid": os.getpid(),
    })


async def slow(scope: Scope, receive: Receive, send: Send) -> None:
    await _read_body(receive)
    seconds = _seconds(_query(scope).get("s"), 1.0)
    await asyncio.sleep(seconds)
    await _json(send, 200, {"slept": seconds})


async def charges(scope: Scope, receive: Receive, send: Send) -> None:
    key = _header(scope, b"idempotency-key") or ""
    _started[key] += 1
    number = sum(_started.values())
    length, _ = await _read_body(receive)
    await asyncio.sleep(_seconds(_query(scope).get("delay")))
    _finished[key] += 1
    await _json(send, 201, {"id": f"ch_{number}", "key": key, "body_length": length})


async def executions(scope: Scope, receive: Receive, send: Send) -> None:
    await _json(send, 200, {"started": dict(_started), "finished": dict(_finished)})


async def upload(scope: Scope, receive: Receive, send: Send) -> None:
    name = _query(scope).get("id", "")
    _progress[name] = 0

    def seen(total: int) -> None:
        _progress[name] = total

    length, sha = await _read_body(receive, seen)
    await _json(send, 200, {"bytes": length, "sha256": sha})


async def progress(scope: Scope, receive: Receive, send: Send) -> None:
    await _json(send, 200, {"received": _progress.get(_query(scope).get("id", ""), -1)})


async def download(scope: Scope, receive: Receive, send: Send) -> None:
    query = _query(scope)
    chunks = int(query.get("mb", "1")) * MIB // CHUNK
    released = _release_event(query.get("id", ""))
    await send({
        "type": "http.response.start",
        "status": 200,
        "headers": [(b"content-type", b"application/octet-stream"),
                    (b"content-length", str(chunks * CHUNK).encode())],
    })
    for i in range(chunks):
        await send({"type": "http.response.body", "body": chunk(i), "more_body": i < chunks - 1})
        if i == 0:
            # bounded: a proxy that buffers the whole response still gets it, late
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(released.wait(), RELEASE_WAIT_S)


async def release(scope: Scope, receive: Receive, send: Send) -> None:
    _release_event(_query(scope).get("id", "")).set()
    await _json(send, 200, {"released": True})


async def headers_out(scope: Scope, receive: Receive, send: Send) -> None:
    await _read_body(receive)
    await _respond(send, 203, b'{"hop":"by-hop"}', headers=[
        (b"connection", b"x-drop-me, close"),
        (b"x-drop-me", b"named in Connection"),
        (b"keep-alive", b"timeout=5, max=100"),
        (b"proxy-connection", b"keep-alive"),
        (b"proxy-authenticate", b'Basic realm="upstream"'),
        (b"te", b"trailers"),
        (b"trailer", b"x-checksum"),
        (b"upgrade", b"h2c"),
        (b"x-keep-me", b"kept"),
        (b"set-cookie", b"a=1; Path=/"),
        (b"set-cookie", b"b=2; Path=/"),
        (b"cache-control", b"no-store"),
    ])


async def drop_mid_body(scope: Scope, receive: Receive, send: Send) -> None:
    await _read_body(receive)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/octet-stream"),
                            (b"content-length", b"1000000")]})
    await send({"type": "http.response.body", "body": b"x" * 1000, "more_body": True})
    # give the first bytes time to leave before the failure closes the connection (bounded)
    await asyncio.sleep(0.2)
    raise RuntimeError("e2e upstream drops this connection mid-body on purpose")


async def gzipped(scope: Scope, receive: Receive, send: Send) -> None:
    await _read_body(receive)
    await _respond(send, 200, GZIP_BODY, content_type=b"text/plain",
                   headers=[(b"content-encoding", b"gzip")])


async def redirect(scope: Scope, receive: Receive, send: Send) -> None:
    await _read_body(receive)
    await _respond(send, 302, b"", content_type=b"text/plain", headers=[(b"location", b"/echo")])


async def seen(scope: Scope, receive: Receive, send: Send) -> None:
    await _json(send, 200, {"count": _seen_request_ids[_query(scope).get("rid", "")]})


async def soak_pay(scope: Scope, receive: Receive, send: Send) -> None:
    """One payment execution, recorded at arrival and when it answers (see the module doc)."""
    if scope["method"] != "POST":
        await _read_body(receive)
        await _json(send, 405, {"error": "POST only"})
        return
    host = _header(scope, b"x-forwarded-host") or ""
    key = _header(scope, b"idempotency-key")
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    try:
        payment = json.loads(b"".join(chunks))
    except ValueError:
        payment = {}
    payment = payment if isinstance(payment, dict) else {}
    key = key or str(payment.get("payment", ""))
    record = _soak_records.setdefault(key, {"started": 0, "finished": 0, "bodies": []})
    record["started"] += 1
    number = next(_soak_executions)
    _soak_in_flight[host] += 1
    try:
        await asyncio.sleep(SOAK_PAY_S + random.uniform(0.0, SOAK_JITTER_S))
        body = json.dumps({"payment": payment.get("payment"), "key": key,
                           "amount": payment.get("amount"), "execution": number,
                           "charge": f"ch_{random.getrandbits(64):016x}"},
                          separators=(",", ":")).encode()
        record["finished"] += 1
        record["bodies"].append(body.decode())
    finally:
        _soak_in_flight[host] -= 1
    await _respond(send, 200, body)


async def soak_records(scope: Scope, receive: Receive, send: Send) -> None:
    await _json(send, 200, _soak_records)


async def soak_in_flight(scope: Scope, receive: Receive, send: Send) -> None:
    await _json(send, 200, {host: n for host, n in _soak_in_flight.items() if n})


_held: dict[str, dict[str, int]] = defaultdict(lambda: {"now": 0, "peak": 0, "done": 0})


async def held(scope: Scope, receive: Receive, send: Send) -> None:
    """Holds the request ``s`` seconds and records how many it holds at once, per
    ``X-Api-Key``: the upstream's own view of a concurrency limit."""
    await _read_body(receive)
    count = _held[_header(scope, b"x-api-key") or ""]
    count["now"] += 1
    count["peak"] = max(count["peak"], count["now"])
    try:
        await asyncio.sleep(_seconds(_query(scope).get("s"), 0.2))
    finally:
        count["now"] -= 1
        count["done"] += 1
    await _json(send, 200, {"held": True})


async def held_stats(scope: Scope, receive: Receive, send: Send) -> None:
    await _json(send, 200, _held[_query(scope).get("key", "")])


async def stripe_customers(scope: Scope, receive: Receive, send: Send) -> None:
    """A Stripe-like create: the attempt is counted first, whatever happens after."""
    key = _header(scope, b"idempotency-key") or ""
    _stripe_attempts[key] += 1
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if message["type"] != "http.request" or not message.get("more_body", False):
            break
    description = parse_qs(body.decode("latin-1")).get("description", [""])[0]
    number = next(_stripe_requests)
    headers = [(b"request-id", b"req_up_%d" % number)]
    if description == "hold":
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(_release_event(key).wait(), RELEASE_WAIT_S)
    elif description.startswith("sleep:"):
        await asyncio.sleep(_seconds(description[len("sleep:"):]))
    elif description == "reject":
        error = {"error": {"type": "invalid_request_error", "code": "parameter_invalid_empty",
                           "param": "email", "message": "You passed an empty string for 'email'."}}
        await _respond(send, 400, json.dumps(error).encode(), headers=headers)
        return
    customer = {"id": f"cus_{number}", "object": "customer", "description": description, "livemode": False}
    await _respond(send, 200, json.dumps(customer).encode(), headers=headers)


async def stripe_attempts(scope: Scope, receive: Receive, send: Send) -> None:
    await _json(send, 200, {"count": _stripe_attempts[_query(scope).get("key", "")]})


async def hold(scope: Scope, receive: Receive, send: Send) -> None:
    await _read_body(receive)
    name = _query(scope).get("id", "")
    _stripe_attempts[name] += 1  # /v1/attempts?key=ID says it is here
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(_release_event(name).wait(), RELEASE_WAIT_S)
    await _json(send, 200, {"held": True})


async def health(scope: Scope, receive: Receive, send: Send) -> None:
    await _respond(send, 200, b"ok", content_type=b"text/plain")


async def not_found(scope: Scope, receive: Receive, send: Send) -> None:
    await _read_body(receive)
    await _json(send, 404, {"error": "no such endpoint", "path": scope["path"]})


ROUTES: dict[str, Callable[[Scope, Receive, Send], Awaitable[None]]] = {
    "/health": health,
    "/slow": slow,
    "/charges": charges,
    "/executions": executions,
    "/upload": upload,
    "/progress": progress,
    "/download": download,
    "/release": release,
    "/headers-out": headers_out,
    "/drop-mid-body": drop_mid_body,
    "/seen": seen,
    "/gzip": gzipped,
    "/redirect": redirect,
    "/soak/pay": soak_pay,
    "/soak/records": soak_records,
    "/soak/in-flight": soak_in_flight,
    "/held": held,
    "/held/stats": held_stats,
    "/v1/customers": stripe_customers,
    "/v1/limited": stripe_customers,
    "/v1/one-at-a-time": stripe_customers,
    "/v1/attempts": stripe_attempts,
    "/v1/hold": hold,
}


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    rid = _header(scope, b"x-request-id")
    if rid is not None:
        _seen_request_ids[rid] += 1
    path: str = scope["path"]
    if path == "/echo" or path.startswith("/echo/"):
        await echo(scope, receive, send)
        return
    handler = ROUTES.get(path, not_found)
    await handler(scope, receive, send)
