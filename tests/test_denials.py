"""The local deny cache: a client the store denied is answered 429 without a store call until
the store could allow it again, with Retry-After and RateLimit aged to the moment it is asked."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from gateway import GatewayMiddleware, RateLimitMiddleware
from gateway.denials import LocalDenials
from gateway.identity import tag
from gateway.store import BucketSpec, BucketState, RateDecision, TakePlan
from gateway.store.redis import RedisStore
from tests.asgi_helpers import CountingApp, client_for


class CountingTakes:
    """Wraps a store: counts ratelimit_take calls."""

    def __init__(self, inner: RedisStore) -> None:
        self._inner = inner
        self.takes = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def ratelimit_take(self, *args: Any, **kwargs: Any) -> RateDecision:
        self.takes += 1
        return await self._inner.ratelimit_take(*args, **kwargs)


def gateway(app: CountingApp, store: CountingTakes, *policies: dict[str, Any]) -> GatewayMiddleware:
    return GatewayMiddleware(app, {"rate_limit": list(policies)}, store=store)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ on the wire
async def test_denied_client_is_answered_locally_with_aged_fields(store: RedisStore) -> None:
    """After the store's 429, the next ones come without a store call, each a full 429
    problem whose Retry-After and t never exceed the store's and count down with the clock."""
    app = CountingApp()
    counting = CountingTakes(store)
    gw = gateway(app, counting, {"name": "p", "limit": 6, "period": "1m", "burst": 1})  # wait 10 s
    async with client_for(gw) as c:
        assert (await c.get("/")).status_code == 200
        first = await c.get("/")
        takes = counting.takes
        local = [await c.get("/") for _ in range(20)]
    assert takes == 2
    assert counting.takes == 2  # the 20 local answers asked nothing
    assert app.calls == 1
    assert first.status_code == 429
    assert first.headers["retry-after"] == "10"
    for r in local:
        assert r.status_code == 429
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["violated-policies"] == ["p"]
        assert r.headers["ratelimit-policy"] == '"p";q=6;w=60'
        assert r.headers["ratelimit"] == f'"p";r=0;t={r.headers["retry-after"]}'
        assert 9 <= int(r.headers["retry-after"]) <= 10


async def test_local_denial_ends_when_the_store_could_allow(store: RedisStore) -> None:
    """Burst 1 at 4/s: denied for 250 ms; after that the store is asked again and allows."""
    app = CountingApp()
    counting = CountingTakes(store)
    gw = gateway(app, counting, {"name": "p", "limit": 4, "period": "1s", "burst": 1})
    async with client_for(gw) as c:
        assert (await c.get("/")).status_code == 200
        assert (await c.get("/")).status_code == 429
        denied_at = time.monotonic()
        assert (await c.get("/")).status_code == 429
        assert counting.takes == 2
        await asyncio.sleep(max(0.0, denied_at + 0.27 - time.monotonic()))
        r = await c.get("/")
    assert r.status_code == 200
    assert counting.takes == 3
    assert app.calls == 2


def rate_limiter(gw: GatewayMiddleware) -> RateLimitMiddleware:
    app: Any = gw
    while not isinstance(app, RateLimitMiddleware):
        app = app._inner if isinstance(app, GatewayMiddleware) else app.app
    return app


async def test_every_local_denial_is_one_the_store_would_make(store: RedisStore) -> None:
    """While a local denial holds, the store itself, asked directly, denies that client too (a
    denial charges nothing): the cache never answers for a client the store would allow."""
    app = CountingApp()
    counting = CountingTakes(store)
    gw = gateway(app, counting, {"name": "p", "limit": 20, "period": "1s", "burst": 2})
    entries = rate_limiter(gw)._denials.entries
    plan = TakePlan.of([BucketSpec("p", unit=50, refill=1, burst=2, cost=1)])  # 20/s = 1 per 50 ms
    client_tag = tag(b"ip:203.0.113.7")
    local = checked = 0
    async with client_for(gw) as c:
        end = time.monotonic() + 0.6
        while time.monotonic() < end:  # bounded by the clock
            before = counting.takes
            r = await c.get("/")
            if r.status_code == 429 and counting.takes == before:
                local += 1
                (until, _, _), = entries.values()
                verdict = await store.ratelimit_take(plan, [client_tag])
                # decided while the local denial held: the store decided before its reply came
                # (a loaded machine may answer after `until`, when the store may allow again)
                if time.monotonic() < until:
                    assert not verdict.allowed
                    checked += 1
            await asyncio.sleep(0.002)
    assert local > 0
    assert checked > 0


async def test_other_clients_are_not_affected(store: RedisStore) -> None:
    """One client's local denial says nothing about another's: that one still asks the store."""
    app = CountingApp()
    counting = CountingTakes(store)
    gw = gateway(app, counting, {"name": "p", "limit": 1, "period": "1h", "burst": 1})
    async with client_for(gw, "198.51.100.1") as a, client_for(gw, "198.51.100.2") as b:
        await a.get("/")
        assert (await a.get("/")).status_code == 429
        assert (await a.get("/")).status_code == 429
        assert counting.takes == 2
        assert (await b.get("/")).status_code == 200
        assert counting.takes == 3


# ------------------------------------------------------------------------------------ the table
def decision(*buckets: tuple[int, int, int]) -> RateDecision:
    return RateDecision(False, 1_000, tuple(BucketState(*b) for b in buckets))


def test_entry_lasts_until_the_first_denying_bucket_could_pay() -> None:
    """Two denying buckets (300 ms and 900 ms): local answers stop at 300 ms from the send,
    less the 1 ms the store's whole-millisecond clock may be early."""
    d = LocalDenials()
    d.remember("k", decision((0, 5_000, 300), (0, 9_000, 900), (7, 2_000, 0)), sent_at=10.0)
    assert d.answer("k", 10.298) is not None
    assert d.answer("k", 10.299) is None  # 1 ms early: the store's clock counts whole ms
    assert len(d) == 0  # an ended entry is dropped when met


def test_answers_are_aged_on_the_local_clock() -> None:
    """wait_ms and full_ms shrink by the time passed; remaining stays (a lower bound)."""
    d = LocalDenials()
    d.remember("k", decision((0, 5_000, 300), (7, 2_000, 0)), sent_at=10.0)
    aged = d.answer("k", 10.25)
    assert aged is not None
    assert not aged.allowed
    assert aged.now_ms == 1_250
    assert aged.buckets == (BucketState(0, 4_750, 50), BucketState(7, 1_750, 0))


def test_a_decision_without_a_wait_is_not_remembered() -> None:
    d = LocalDenials()
    d.remember("k", decision((0, 0, 0)), sent_at=1.0)
    assert len(d) == 0


@pytest.mark.parametrize("expired_first", [True, False])
def test_the_table_is_bounded(expired_first: bool) -> None:
    """At most max_entries: a new entry evicts the expired ones first, else the oldest."""
    d = LocalDenials(max_entries=3)
    wait = 100 if expired_first else 100_000
    for i in range(3):
        d.remember(i, decision((0, 1_000, wait)), sent_at=float(i))
    d.remember("new", decision((0, 1_000, 100_000)), sent_at=5.0)
    assert len(d) <= 3
    assert d.answer("new", 5.0) is not None
    if expired_first:
        assert len(d) == 1  # all three had expired by t=5
    else:
        assert d.answer(0, 5.0) is None  # the oldest went
        assert d.answer(2, 5.0) is not None
