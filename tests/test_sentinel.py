"""Redis Sentinel (``store.sentinels``): a real master, replica and three sentinels per test.

The gateway's ``store.url`` names a host where nothing listens (port 1), so every answer below
came from the master the sentinels named. What holds across a failover: a write the replica
acknowledged before the master died (``WAIT 1``) is there on the promoted replica; Redis
replication is asynchronous, so a write it had not yet received is lost with the old master.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from redis.asyncio.connection import Connection
from redis.asyncio.sentinel import SentinelManagedSSLConnection

from gateway import GatewayMiddleware
from gateway.store.redis import RedisStore
from tests.asgi_helpers import PROBLEM, CountingApp, assert_problem, client_for, poll
from tests.conftest import require_redis_server, unique_prefix
from tests.redis_sentinel import RedisSentinel

UNUSED_HOST = "redis://127.0.0.1:1"  # nothing listens here: only the sentinels can lead anywhere
REPLAYED = "idempotent-replayed"
# one token per hour: a bucket's level is the same seconds later, so it shows what was kept
STRICT = {"name": "strict", "limit": 10, "period": "1h", "paths": ["/strict"], "on_store_error": "deny"}
LENIENT = {"name": "lenient", "limit": 10, "period": "1h", "paths": ["/lenient"], "on_store_error": "allow"}


@pytest.fixture
def sentinel() -> Iterator[RedisSentinel]:
    """A master, a replica and three sentinels of this test's own, stopped (by PID) afterwards."""
    require_redis_server()
    setup = RedisSentinel().start()
    try:
        yield setup
    finally:
        setup.cleanup()


def gateway_on(setup: RedisSentinel, db: int = 0, **store: Any) -> tuple[GatewayMiddleware, CountingApp, str]:
    app = CountingApp()
    prefix = unique_prefix()
    config: dict[str, Any] = {
        "store": {"url": f"{UNUSED_HOST}/{db}", "sentinels": setup.sentinels,
                  "service_name": setup.service_name, "timeout": "2s", "key_prefix": prefix, **store},
        "rate_limit": [STRICT, LENIENT],
    }
    return GatewayMiddleware(app, config), app, prefix


async def charge(c: httpx.AsyncClient, key: str) -> httpx.Response:
    return await c.post("/charge", content=b'{"amount": 5}', headers={"Idempotency-Key": key})


async def test_sentinels_name_the_master(sentinel: RedisSentinel) -> None:
    """With store.url's host unreachable, limits and deduplication work on the master the
    sentinels name, in the URL's database."""
    gw, app, prefix = gateway_on(sentinel, db=3)
    try:
        async with client_for(gw) as c:
            limited = [await c.get("/strict") for _ in range(11)]
            first, again = await charge(c, "k1"), await charge(c, "k1")
            ready = await c.get("/_gateway/readyz")
        assert [r.status_code for r in limited] == [200] * 10 + [429]
        assert [r.headers["ratelimit"].split(";t=")[0] for r in limited[:3]] == [
            '"strict";r=9', '"strict";r=8', '"strict";r=7']
        assert first.status_code == again.status_code == 200
        assert REPLAYED not in first.headers
        assert again.headers[REPLAYED] == "true"
        assert again.content == first.content == b"ok"
        assert app.calls == 11  # ten GETs and one charge: the 429 and the repeat never ran
        assert ready.status_code == 200
        assert ready.json() == {"status": "ready", "breaker": "closed"}
        written = sentinel.keys(sentinel.master_port, f"{prefix}:*", db=3)
        assert [k.split(":")[2] for k in written] == ["idem", "rl"], written
        assert sentinel.keys(sentinel.master_port, f"{prefix}:*", db=0) == []
    finally:
        await gw.store.close()


async def test_master_killed_mid_run_fails_over_without_restart(sentinel: RedisSentinel) -> None:
    """SIGKILL the master under traffic: until the sentinels promote the replica, deny-policies
    and idempotency answer 503 and allow-policies pass, each at once; afterwards the same
    gateway is served by the new master, which kept what the replica had acknowledged."""
    gw, app, prefix = gateway_on(sentinel, breaker_cooldown="200ms")
    old = sentinel.master_port
    try:
        async with client_for(gw) as c:
            executed = await charge(c, "before")
            assert executed.status_code == 200
            assert (await c.get("/strict")).headers["ratelimit"].startswith('"strict";r=9;')
            # the replica has both writes before the master dies
            assert sentinel.call(old, "WAIT", 1, 1000) == 1
            assert len(sentinel.keys(sentinel.replica_port, f"{prefix}:*")) == 2
            calls_before = app.calls

            sentinel.kill(old)
            started = time.monotonic()
            strict, lenient = await c.get("/strict"), await c.get("/lenient")
            keyed = await charge(c, "during")
            assert time.monotonic() - started < 1.5  # three answers, none waiting on a timeout
            assert_problem(strict, 503, PROBLEM + "store-unavailable")
            assert strict.headers["retry-after"] == "1"
            assert lenient.status_code == 200
            assert "ratelimit" not in lenient.headers  # passed unguarded, said so by omission
            assert lenient.headers["ratelimit-policy"] == '"lenient";q=10;w=3600'
            assert_problem(keyed, 503, PROBLEM + "store-unavailable")
            assert app.calls == calls_before + 1  # only the lenient request ran

            # traffic goes on while the sentinels fail over; every answer is one of the two
            # outcomes the policy allows, never an error of another kind or a slow one
            outcomes: list[tuple[int, bool, float]] = []
            failover = asyncio.ensure_future(asyncio.to_thread(sentinel.wait_for_failover, old))
            while not failover.done():
                sent = time.monotonic()
                r = await c.get("/strict")
                outcomes.append((r.status_code, "ratelimit" in r.headers, time.monotonic() - sent))
                await asyncio.sleep(0.02)
            new = await failover
            assert new == sentinel.replica_port
            assert outcomes
            assert {(status, limited) for status, limited, _ in outcomes} <= {(503, False), (200, True)}
            assert max(took for _, _, took in outcomes) < 0.5

            await poll(lambda: _ready(c), deadline_s=10)
            replay = await charge(c, "before")
            served = await c.get("/strict")
            after = await charge(c, "after")
        assert replay.status_code == 200
        assert replay.headers[REPLAYED] == "true"
        assert replay.content == executed.content
        # the bucket came across too: 9 before the kill, one 200 per later allowed request
        allowed_meanwhile = sum(1 for status, _, _ in outcomes if status == 200)
        assert served.headers["ratelimit"].startswith(f'"strict";r={8 - allowed_meanwhile};')
        assert after.status_code == 200
        assert REPLAYED not in after.headers
        records = sentinel.keys(new, f"{prefix}:v1:idem:*")
        assert len(records) == 2  # "before" (replicated) and "after" (written there); "during" never claimed
        assert sentinel.role(new) == "master"
    finally:
        await gw.store.close()


async def _ready(c: httpx.AsyncClient) -> bool:
    return (await c.get("/_gateway/readyz")).status_code == 200


async def test_switchover_reaches_the_new_master_without_an_error(sentinel: RedisSentinel) -> None:
    """SENTINEL FAILOVER with both servers alive: once the sentinels have demoted the old master
    (closing its clients), the next request finds its pooled connection closed (before writing
    to it, whether or not the loop has read the close yet), and a new connection, which asks the
    sentinels, reaches the new master: no error, the
    bucket kept. (Until that demotion, at the sentinels' next look at the old master up to
    ~10 s after the promotion, pooled connections still write to the old master; README.)"""
    gw, app, prefix = gateway_on(sentinel)
    old, new = sentinel.master_port, sentinel.replica_port
    try:
        async with client_for(gw) as c:
            assert (await c.get("/strict")).headers["ratelimit"].startswith('"strict";r=9;')
            assert sentinel.call(old, "WAIT", 1, 1000) == 1
            assert sentinel.call(sentinel.sentinel_ports[0], "SENTINEL", "FAILOVER", sentinel.service_name)
            assert sentinel.wait_for_failover(old) == new
            await poll(lambda: sentinel.role(old) == "slave", deadline_s=15)
            r = await c.get("/strict")
        assert r.status_code == 200
        assert r.headers["ratelimit"].startswith('"strict";r=8;')
        assert app.calls == 2
        assert len(sentinel.keys(new, f"{prefix}:v1:rl:*")) == 1
    finally:
        await gw.store.close()


async def test_a_master_demoted_behind_the_sentinels_back_fails_safe(sentinel: RedisSentinel) -> None:
    """A master made a replica by hand (the sentinels still name it) answers READONLY: redis-py
    turns that into a connection error, the call is retried once on a new connection, which the
    sentinels send to the same server, and the request gets 503 at once; no script ran."""
    gw, app, prefix = gateway_on(sentinel)
    old, other = sentinel.master_port, sentinel.replica_port
    try:
        async with client_for(gw) as c:
            assert (await c.get("/strict")).status_code == 200  # leaves a pooled connection to old
            (bucket,) = sentinel.keys(old, f"{prefix}:*")
            level = sentinel.call(old, "HGETALL", bucket)
            sentinel.call(other, "REPLICAOF", "NO", "ONE")
            sentinel.call(old, "REPLICAOF", "127.0.0.1", other)  # no CLIENT KILL: it stays open
            assert sentinel.reported_masters() == {old}
            started = time.monotonic()
            r = await c.get("/strict")
            took = time.monotonic() - started
        assert_problem(r, 503, PROBLEM + "store-unavailable")
        assert took < 0.5
        assert app.calls == 1
        assert sentinel.call(other, "HGETALL", bucket) == level  # the bucket as the first request left it
    finally:
        await gw.store.close()


async def test_url_gives_credentials_database_and_tls_not_the_host() -> None:
    """from_sentinels passes the URL's user, password, database and TLS options to the master
    connections (Sentinel-managed, TLS for rediss), never its host or port; the sentinels are
    asked without them, each question bounded by the store timeout."""
    store = RedisStore.from_sentinels(
        "rediss://app:s3cret@ignored.example:6390/4?ssl_cert_reqs=none",
        ["10.0.0.1:26379", "[::1]:26380"], "payments", key_prefix="t", timeout_s=0.25)
    try:
        pool: Any = store.client.connection_pool
        kwargs = pool.connection_kwargs
        assert pool.connection_class is SentinelManagedSSLConnection
        assert pool.service_name == "payments"
        assert (kwargs["username"], kwargs["password"], kwargs["db"]) == ("app", "s3cret", 4)
        assert kwargs["ssl_cert_reqs"] == "none"
        assert "host" not in kwargs
        assert "port" not in kwargs
        asked = [s.connection_pool for s in pool.sentinel_manager.sentinels]
        assert [(a.connection_kwargs["host"], a.connection_kwargs["port"]) for a in asked] == [
            ("10.0.0.1", 26379), ("::1", 26380)]
        for a in asked:
            assert a.connection_class is Connection  # plain TCP
            options = a.connection_kwargs
            assert (options["socket_connect_timeout"], options["socket_timeout"]) == (0.25, 0.25)
            assert (options["username"], options["password"]) == (None, None)
    finally:
        await store.close()
