"""``idempotency.on_in_flight = "wait"``: a duplicate of a request in flight waits (at most
``wait_timeout``) for the first answer and gets its replay, on fakeredis and real Redis (the
``store`` fixture) and across two ``gateway serve`` processes on one real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway import GatewayMiddleware, IdempotencyMiddleware
from gateway._asgi import Receive, Scope, Send
from gateway.errors import StoreUnavailable
from gateway.idempotency.request import fingerprint
from gateway.store.redis import RedisStore
from tests.asgi_helpers import client_for
from tests.redis_process import RedisProcess
from tests.serve_process import GatewayServe, Upstream, serve_config
from tests.test_idempotency_leases import (
    BODY,
    DEAD_OWNER,
    HEADERS,
    PATH,
    DelegatingStore,
    eventually,
    keyed_scope,
    lease_terms,
    record_of,
    until,
)

WAIT = {"on_in_flight": "wait"}


class SlowCharge:
    """Counts its runs; each takes ``seconds`` (or waits for ``gate``), then answers ``status``
    (201 by default) with a body naming the run."""

    def __init__(self, seconds: float = 1.0, *, gate: asyncio.Event | None = None,
                 statuses: tuple[int, ...] = (201,)) -> None:
        self.calls = 0
        self.seconds = seconds
        self.gate = gate
        self.statuses = statuses
        self.started = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        self.calls += 1
        run = self.calls
        await receive()
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        else:
            await asyncio.sleep(self.seconds)
        status = self.statuses[min(run, len(self.statuses)) - 1]
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"charge %d" % run})


class CountingClaims(DelegatingStore):
    """Counts ``idempotency_claim`` calls (the waiters' looks; the first claims go with the take
    or alone); ``notices=False`` hides the store's notices, as on a Redis Cluster."""

    def __init__(self, inner: RedisStore, *, notices: bool = True) -> None:
        super().__init__(inner)
        self.claims = 0
        self.notices = notices

    async def idempotency_claim(self, *args: Any) -> Any:
        self.claims += 1
        return await self.inner.idempotency_claim(*args)

    def idempotency_watch(self, record: str) -> Any:
        if self.notices:
            return self.inner.idempotency_watch(record)
        return self._none()

    @staticmethod
    @contextlib.asynccontextmanager
    async def _none() -> AsyncIterator[None]:
        yield None


async def duplicates(mw: Any, n: int, *, key: str = "k-wait") -> list[httpx.Response]:
    async with client_for(mw) as c:
        headers = {**HEADERS, "Idempotency-Key": key}
        return list(await asyncio.gather(*(c.post(PATH, content=BODY, headers=headers) for _ in range(n))))


@pytest.mark.parametrize("notices", [True, False], ids=["notices", "polling"])
async def test_fifty_duplicates_of_a_one_second_request_get_its_answer(
    store: RedisStore, notices: bool,
) -> None:
    """50 concurrent duplicates of a 1 s request: the app runs once and all 50 get the same 201
    (no 409), soon after it ends. With notices, each waiter looks at the record about once more
    than its first claim, not once per poll."""
    app = SlowCharge(1.0)
    counting = CountingClaims(store, notices=notices)
    mw = IdempotencyMiddleware(app, idempotency=WAIT, store=counting)
    started = time.monotonic()
    replies = await duplicates(mw, 50)
    elapsed = time.monotonic() - started
    assert app.calls == 1
    assert Counter(r.status_code for r in replies) == {201: 50}
    assert {r.content for r in replies} == {b"charge 1"}
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in replies) == 49
    assert elapsed < 4.0
    if notices:
        assert counting.claims <= 50 + 49 + 5, counting.claims
    else:
        assert counting.claims <= 50 + 49 * 8, counting.claims  # backoff: 50 ms doubling to 1 s


async def test_past_wait_timeout_the_duplicate_gets_409(store: RedisStore) -> None:
    """With wait_timeout = 300ms and a first request that runs on, the duplicate waits about
    that long, then gets the 409 with Retry-After; the app ran once."""
    gate = asyncio.Event()
    app = SlowCharge(gate=gate)
    mw = IdempotencyMiddleware(app, idempotency={**WAIT, "wait_timeout": "300ms"}, store=store)
    async with client_for(mw) as c:
        first = asyncio.ensure_future(c.post(PATH, content=BODY, headers=HEADERS))
        async with asyncio.timeout(10):
            await app.started.wait()
        started = time.monotonic()
        duplicate = await c.post(PATH, content=BODY, headers=HEADERS)
        waited = time.monotonic() - started
        gate.set()
        done = await first
    assert duplicate.status_code == 409
    assert duplicate.headers["retry-after"] == "1"
    assert 0.3 <= waited < 2.0
    assert done.status_code == 201
    assert app.calls == 1


async def test_a_waiter_runs_the_request_when_the_first_is_released(store: RedisStore) -> None:
    """The first answer is a released status (no effect, not stored): the waiting duplicate is
    told, claims the freed key and runs the request itself (its answer is its own)."""
    app = SlowCharge(0.3, statuses=(422, 201))
    mw = IdempotencyMiddleware(app, idempotency={**WAIT, "release_statuses": [422]}, store=store)
    async with client_for(mw) as c:
        first = asyncio.ensure_future(c.post(PATH, content=BODY, headers=HEADERS))
        async with asyncio.timeout(10):
            await app.started.wait()
        duplicate = await c.post(PATH, content=BODY, headers=HEADERS)
        released = await first
    assert (released.status_code, duplicate.status_code) == (422, 201)
    assert duplicate.content == b"charge 2"
    assert app.calls == 2


async def test_a_dead_holders_lapsed_claim_ends_the_wait(store: RedisStore) -> None:
    """The holder died (no renewals, no notice): the waiter looks when its lease ends and gets
    the outcome-unknown replay (502), well before wait_timeout; the app never runs."""
    settings = {**WAIT, "lock_ttl": "300ms", "wait_timeout": "10s"}
    scope = await keyed_scope()
    record = record_of(scope)
    claim = await store.idempotency_claim(record, fingerprint(scope, BODY), DEAD_OWNER, lease_terms(settings))
    assert claim.outcome == "new"
    app = SlowCharge(0.0)
    mw = IdempotencyMiddleware(app, idempotency=settings, store=store)
    async with client_for(mw) as c:
        started = time.monotonic()
        r = await c.post(PATH, content=BODY, headers=HEADERS)
        waited = time.monotonic() - started
    assert r.status_code == 502
    assert r.headers["idempotent-replayed"] == "true"
    assert waited < 3.0
    assert app.calls == 0


class FailingLooks(DelegatingStore):
    """The first claim goes through; every later one fails (the store went away mid-wait)."""

    def __init__(self, inner: RedisStore) -> None:
        super().__init__(inner)
        self.claims = 0

    async def idempotency_claim(self, *args: Any) -> Any:
        self.claims += 1
        if self.claims > 1:
            raise StoreUnavailable("injected: connection refused")
        return await self.inner.idempotency_claim(*args)


async def test_a_store_failure_while_waiting_is_a_503_never_a_run(store: RedisStore) -> None:
    """A look that fails while the duplicate waits answers 503 (even with on_store_error =
    "allow"): the duplicate never runs unguarded beside the first."""
    gate = asyncio.Event()
    app = SlowCharge(gate=gate)
    failing = FailingLooks(store)
    # the holder's short lease (renewed) makes the waiter look again within 300 ms
    holder = IdempotencyMiddleware(app, idempotency={**WAIT, "lock_ttl": "300ms"}, store=store)
    waiter = IdempotencyMiddleware(app, idempotency={**WAIT, "on_store_error": "allow"}, store=failing)
    async with client_for(holder) as c, client_for(waiter) as w:
        first = asyncio.ensure_future(c.post(PATH, content=BODY, headers=HEADERS))
        async with asyncio.timeout(10):
            await app.started.wait()
        duplicate = await w.post(PATH, content=BODY, headers=HEADERS)
        gate.set()
        await first
    assert duplicate.status_code == 503
    assert failing.claims == 2
    assert app.calls == 1


async def test_waiting_spends_no_more_tokens(store: RedisStore) -> None:
    """In the stack, 10 waiting duplicates take one token each, like any request, and nothing
    more while they wait: RateLimit's r is the burst less the 11 requests."""
    app = SlowCharge(0.5)
    config = {"idempotency": WAIT, "rate_limit": [{"name": "per-client", "limit": 100, "period": "1h"}]}
    gw = GatewayMiddleware(app, config, store=store)
    replies = await duplicates(gw, 11)
    async with client_for(gw) as c:
        after = await c.get("/")
    assert app.calls == 2  # the charge, and the GET
    assert Counter(r.status_code for r in replies) == {201: 11}
    assert after.headers["ratelimit"].startswith('"per-client";r=88;')


# ------------------------------------------------------------------------- two serve processes
@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    process = Upstream(tmp_path_factory.mktemp("wait"))
    try:
        process.start()
        yield process
    finally:
        process.stop()


@pytest.mark.slow
def test_fifty_duplicates_across_two_gateways_run_once(
    tmp_path: Path, upstream: Upstream, redis_server: RedisProcess,
) -> None:
    """50 concurrent duplicates of a 1 s charge, spread over two gateway serve processes on one
    real Redis: the upstream runs it once, and all 50 get the same 201 (no 409)."""
    config = serve_config(upstream.url, redis_server.url, f"w{uuid.uuid4().hex[:10]}", idempotency=WAIT)
    gateways = [GatewayServe(tmp_path, config), GatewayServe(tmp_path, config)]
    key = f"wait-{uuid.uuid4().hex}"
    try:
        for gw in gateways:
            gw.launch()
        for gw in gateways:
            gw.wait_ready()

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=30.0, trust_env=False) as client:
                return list(await asyncio.gather(*(
                    client.post(f"{gateways[i % 2].url}/charges?delay=1", content=b"amount=100",
                                headers={"Idempotency-Key": key, "x-api-key": "client-a"})
                    for i in range(50))))

        replies = asyncio.run(burst())
    finally:
        for gw in gateways:
            gw.stop()
    assert Counter(r.status_code for r in replies) == {201: 50}
    assert len({r.content for r in replies}) == 1
    executions = upstream.executions()
    assert (executions["started"][key], executions["finished"][key]) == (1, 1)


async def test_waiters_poll_when_the_notices_connection_dies(redis_server: RedisProcess) -> None:
    """The pub/sub connection killed (CLIENT KILL TYPE pubsub) while 20 duplicates wait: they
    fall back to polling with backoff, still get the answer, and the app ran once."""
    store = RedisStore.from_url(redis_server.url, key_prefix=f"t{uuid.uuid4().hex[:10]}", timeout_s=2.0)
    await store.open()
    try:
        gate = asyncio.Event()
        app = SlowCharge(gate=gate)
        counting = CountingClaims(store)
        mw = IdempotencyMiddleware(app, idempotency=WAIT, store=counting)
        burst = asyncio.ensure_future(duplicates(mw, 20))
        async with asyncio.timeout(10):
            await app.started.wait()
        await until(lambda: counting.claims >= 20, "every duplicate's first claim")

        async def subscribed() -> bool | None:
            channels = await store.client.execute_command("PUBSUB", "CHANNELS")
            return True if channels else None

        await eventually(subscribed, "the waiters' subscription")
        killed = await store.client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        gate.set()
        replies = await burst
    finally:
        await store.close()
    assert killed >= 1
    assert Counter(r.status_code for r in replies) == {201: 20}
    assert app.calls == 1
    assert counting.claims <= 20 + 19 * 8, counting.claims
