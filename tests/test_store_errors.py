"""The store's one boundary: every failure is a gateway StoreError, and every call is bounded."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio

from gateway.errors import StoreError, StoreScriptError, StoreTimeout, StoreUnavailable
from gateway.store import BucketSpec, LeaseTerms, TakePlan
from gateway.store.redis import RedisStore
from tests.conftest import unique_prefix
from tests.redis_process import RedisProcess, free_port

PLAN = TakePlan.of([BucketSpec("p", unit=1, refill=1, burst=5, cost=1)])


@pytest.fixture
async def silent_server() -> AsyncIterator[int]:
    """A TCP server on loopback that accepts connections and never answers a byte."""
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for w in held:
            w.close()
        server.close()
        await server.wait_closed()


async def test_silent_server_times_out_within_the_bound(silent_server: int) -> None:
    """A Redis that accepts but never answers costs one store.timeout, then StoreTimeout."""
    store = RedisStore.from_url(f"redis://127.0.0.1:{silent_server}/0", key_prefix="t", timeout_s=0.2)
    try:
        started = time.monotonic()
        with pytest.raises(StoreTimeout):
            await store.ratelimit_take(PLAN, ["a"])
        elapsed = time.monotonic() - started
    finally:
        await store.close()
    assert 0.19 <= elapsed < 0.6


async def test_refused_connection_is_unavailable() -> None:
    """Nobody listening: StoreUnavailable at once, not a redis-py or OS exception."""
    store = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0", key_prefix="t", timeout_s=1.0)
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as err:
            await store.ratelimit_take(PLAN, ["a"])
    finally:
        await store.close()
    assert time.monotonic() - started < 0.5
    assert not isinstance(err.value, StoreTimeout)
    assert isinstance(err.value, StoreError)


async def test_error_reply_is_a_script_error_and_the_connection_stays_usable(store: RedisStore) -> None:
    """A key of the wrong type makes the script fail: StoreScriptError; the next call still works."""
    await store.client.set(store.key("a", "p"), "not a hash")
    with pytest.raises(StoreScriptError) as err:
        await store.ratelimit_take(PLAN, ["a"])
    assert "WRONGTYPE" in str(err.value)
    assert (await store.ratelimit_take(PLAN, ["b"])).allowed


async def test_a_cancelled_call_does_not_poison_the_next(redis_server: RedisProcess) -> None:
    """A call cancelled after sending (its reply still on the wire) drops its connection, so
    later replies stay matched to their requests (real sockets only: fakeredis never waits)."""
    store = RedisStore.from_url(redis_server.url, key_prefix=unique_prefix(), timeout_s=2.0)
    try:
        # "a" at 4 tokens: the cancelled call's reply would say 3, unlike any fresh key's 4
        await store.ratelimit_take(PLAN, ["a"])  # also leaves one idle connection to reuse
        task = asyncio.ensure_future(store.ratelimit_take(PLAN, ["a"]))
        await asyncio.sleep(0)  # the command is written; the reply is not read yet
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        results = await asyncio.gather(*(store.ratelimit_take(PLAN, [f"k{i}"]) for i in range(20)))
    finally:
        await store.close()
    assert [r.buckets[0].remaining for r in results] == [4] * 20


async def test_ping_answers_and_fails_as_store_errors(store: RedisStore) -> None:
    """ping() returns when the store answers and raises StoreUnavailable when it cannot."""
    await store.ping()
    down = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0", key_prefix="t", timeout_s=0.5)
    try:
        with pytest.raises(StoreUnavailable):
            await down.ping()
    finally:
        await down.close()


class LostReplyStore:
    """Wraps a store: the first claims run in the store but their replies are lost (timeout)."""

    def __init__(self, inner: RedisStore, lose: int) -> None:
        self._inner = inner
        self.lose = lose
        self.released: list[bool] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    async def idempotency_claim(self, *args: object) -> object:
        claim = await self._inner.idempotency_claim(*args)  # type: ignore[arg-type]
        if self.lose:
            self.lose -= 1
            raise StoreTimeout("the store did not answer within 0.1s")
        return claim

    async def idempotency_release(self, record: str, owner: bytes, terms: LeaseTerms) -> bool:
        done = await self._inner.idempotency_release(record, owner, terms)
        self.released.append(done)
        return done


async def test_claim_granted_but_unanswered_is_freed_so_a_retry_runs(store: RedisStore) -> None:
    """A claim that reached the store but whose reply timed out is released in the background
    (nothing ran under it): the retry with the same key runs once, instead of meeting an
    in-flight claim that would lapse into outcome unknown for a request that never ran."""
    from gateway import IdempotencyMiddleware
    from tests.asgi_helpers import CountingApp, client_for

    app = CountingApp()
    lossy = LostReplyStore(store, lose=1)
    mw = IdempotencyMiddleware(app, store=lossy)  # type: ignore[arg-type]
    headers = {"idempotency-key": "k1", "x-api-key": "alice"}
    async with client_for(mw) as c:
        first = await c.post("/charges", headers=headers, content=b"{}")
        assert first.status_code == 503
        await mw.drain(5.0)
        second = await c.post("/charges", headers=headers, content=b"{}")
        third = await c.post("/charges", headers=headers, content=b"{}")
    assert lossy.released == [True]
    assert (second.status_code, third.status_code) == (200, 200)
    assert third.headers["idempotent-replayed"] == "true"
    assert app.calls == 1


async def test_a_pipelined_store_uses_one_connection(redis_server: RedisProcess) -> None:
    """On one Redis, calls are auto-pipelined: 300 concurrent calls (``max_connections = 3``,
    which bounds only the lane and the cluster's pools) all succeed over exactly one connection
    (the server counts no more clients than that)."""
    from gateway.config import load_config
    from gateway.store import store_from_config

    config = load_config({"store": {"url": redis_server.url, "key_prefix": unique_prefix(),
                                    "timeout": "2s", "max_connections": 3}})
    store = store_from_config(config.store)
    admin = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        before = (await admin.info("clients"))["connected_clients"]
        peak = 0
        done = asyncio.Event()

        async def watch() -> None:  # one admin connection, sampling while the calls run
            nonlocal peak
            while not done.is_set():
                peak = max(peak, (await admin.info("clients"))["connected_clients"] - before)

        async def take(i: int) -> bool:
            await asyncio.sleep(0.001 * (i % 10))  # spread: calls overlap for a while
            return (await store.ratelimit_take(PLAN, [f"k{i}"])).allowed

        watcher = asyncio.ensure_future(watch())
        results = await asyncio.gather(*(take(i) for i in range(300)))
        done.set()
        await watcher
    finally:
        await admin.aclose()
        await store.close()
    assert all(results)
    assert peak == 1
