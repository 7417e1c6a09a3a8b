"""lua/ratelimit_refund.lua on fakeredis and a real redis-server: a refunded take is as if it
had not happened, never more, and it creates nothing.

The cluster store sends it when another slot denied a request (``test_cluster.py`` runs that
path on a real cluster); here the script itself is pinned down through the plain store's client.
"""

from __future__ import annotations

import math

from gateway.store import BucketSpec, TakePlan
from gateway.store.redis import RedisStore
from gateway.store.scripts import read_script

REFUND = read_script("ratelimit_refund")


def spec(name: str, limit: int, period_ms: int, burst: int, cost: int = 1) -> BucketSpec:
    g = math.gcd(limit, period_ms)
    return BucketSpec(name=name, unit=period_ms // g, refill=limit // g, burst=burst, cost=cost)


async def refund(store: RedisStore, plan: TakePlan, tags: list[str]) -> int:
    keys = [store.key(t, s.name) for t, s in zip(tags, plan.specs, strict=True)]
    return int(await store.client.eval(REFUND, len(keys), *keys, *plan.argv))


async def test_refunded_take_is_as_if_it_never_happened(store: RedisStore) -> None:
    """After take + refund, the bucket decides exactly like an untouched one at the same instant
    (both in one script call, so one clock)."""
    p = spec("p", limit=10, period_ms=60_000, burst=10, cost=3)
    one = TakePlan.of([p])
    assert (await store.ratelimit_take(one, ["a"])).buckets[0].remaining == 7
    assert await refund(store, one, ["a"]) == 1
    both = TakePlan.of([spec("p", 10, 60_000, 10, cost=3), spec("p", 10, 60_000, 10, cost=3)])
    decision = await store.ratelimit_take(both, ["a", "b"])
    assert decision.allowed
    assert decision.buckets[0] == decision.buckets[1]
    assert decision.buckets[0].remaining == 7


async def test_refund_never_fills_past_burst(store: RedisStore) -> None:
    """A refund of more than the bucket lacks stops at ``burst``."""
    take = TakePlan.of([spec("p", limit=10, period_ms=60_000, burst=5, cost=1)])
    await store.ratelimit_take(take, ["a"])
    big = TakePlan.of([spec("p", limit=10, period_ms=60_000, burst=5, cost=4)])
    assert await refund(store, big, ["a"]) == 1
    assert (await store.ratelimit_take(take, ["a"])).buckets[0].remaining == 4


async def test_refund_keeps_the_ttl_and_creates_nothing(store: RedisStore) -> None:
    """A refunded bucket keeps a TTL; a bucket that is gone (expired: full) is not recreated,
    so no key is ever left without a TTL."""
    plan = TakePlan.of([spec("p", limit=10, period_ms=60_000, burst=10, cost=2)])
    await store.ratelimit_take(plan, ["a"])
    assert await refund(store, plan, ["a"]) == 1
    assert await store.client.pttl(store.key("a", "p")) > 0
    assert await refund(store, plan, ["gone"]) == 0
    assert await store.client.exists(store.key("gone", "p")) == 0


async def test_refund_leaves_a_bucket_of_another_unit_alone(store: RedisStore) -> None:
    """A bucket rewritten under another policy shape (another unit) meanwhile is not touched:
    the refund's token size would be wrong there."""
    old = TakePlan.of([spec("p", limit=10, period_ms=60_000, burst=10, cost=5)])
    await store.ratelimit_take(old, ["a"])
    other = TakePlan.of([spec("p", limit=7, period_ms=60_000, burst=10, cost=5)])
    before = await store.client.hget(store.key("a", "p"), "l")
    assert await refund(store, other, ["a"]) == 0
    assert await store.client.hget(store.key("a", "p"), "l") == before
