"""[[concurrency_limit]] on the real Redis Cluster: slot sets hash on the key value's tag, limits
of different keys span slots and stay all or none, and the take shares the acquire's call
when their keys share a slot."""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import AsyncIterator

import pytest

from gateway import GatewayMiddleware
from gateway.config import ConcurrencyLimit
from gateway.identity import GLOBAL_TAG
from gateway.store import BucketSpec, SlotPlan, TakePlan
from gateway.store.cluster import ClusterStore
from tests.conftest import unique_prefix
from tests.redis_cluster import RedisCluster
from tests.test_concurrency_limit import KEY, HoldingApp, metric

pytest_plugins = ["tests.cluster_fixtures"]


@pytest.fixture
async def cluster_store(redis_cluster: RedisCluster) -> AsyncIterator[ClusterStore]:
    store = ClusterStore.from_url(redis_cluster.url, key_prefix=unique_prefix(), timeout_s=2.0)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def _limit(name: str, slots: int, *, shadow: bool = False) -> ConcurrencyLimit:
    return ConcurrencyLimit(name=name, limit=slots, mode="shadow" if shadow else "enforce")


async def _holders(store: ClusterStore, name: str, tag: str) -> int:
    key = store._keys.slot_sets([tag], [name.encode()])[0]
    return int(await store.client.zcard(key))


async def test_limits_over_two_slots_are_all_or_none(cluster_store: ClusterStore) -> None:
    plan = SlotPlan.of([_limit("per-client", 5), _limit("everyone", 1)])
    tags = ["client-tag", GLOBAL_TAG]
    assert not cluster_store.combines_slots([], tags)  # two slots
    assert (await cluster_store.concurrency_acquire(plan, tags, b"o1")).allowed
    refused = await cluster_store.concurrency_acquire(plan, tags, b"o2")
    assert not refused.allowed
    assert refused.free == (True, False)
    assert await _holders(cluster_store, "per-client", "client-tag") == 1  # o2's slot was given back
    assert await cluster_store.concurrency_release(plan, tags, b"o1") == 2
    assert (await cluster_store.concurrency_acquire(plan, tags, b"o2")).allowed
    assert await cluster_store.concurrency_renew(plan, tags, b"o2") == 2


async def test_a_shadow_limit_in_another_slot_takes_nothing_it_would_refuse(
    cluster_store: ClusterStore,
) -> None:
    plan = SlotPlan.of([_limit("per-client", 5, shadow=True), _limit("everyone", 1, shadow=True)])
    tags = ["client-tag", GLOBAL_TAG]
    await cluster_store.concurrency_acquire(plan, tags, b"o1")
    second = await cluster_store.concurrency_acquire(plan, tags, b"o2")
    assert (second.allowed, second.would_allow) == (True, False)
    # enforcing both would have refused o2: neither shadow limit counts it
    assert await _holders(cluster_store, "per-client", "client-tag") == 1


async def test_the_take_and_the_acquire_share_a_call_in_one_slot(cluster_store: ClusterStore) -> None:
    g = math.gcd(10, 3_600_000)
    take = TakePlan.of([BucketSpec("rl", 3_600_000 // g, 10 // g, 10, 1)])
    slots = SlotPlan.of([_limit("c", 1)])
    assert cluster_store.combines_slots(["t"], ["t"])
    decision, granted = await cluster_store.ratelimit_take_acquire(take, ["t"], slots, ["t"], b"o1")
    assert decision.allowed
    assert granted is not None
    assert granted.allowed
    _, refused = await cluster_store.ratelimit_take_acquire(take, ["t"], slots, ["t"], b"o2")
    assert refused is not None
    assert not refused.allowed
    assert (await cluster_store.ratelimit_take(take, ["t"])).buckets[0].remaining == 8


async def test_fifty_concurrent_requests_on_the_cluster(redis_cluster: RedisCluster) -> None:
    from tests.asgi_helpers import client_for, lifespan_running

    app = HoldingApp(hold_s=0.2)
    gw = GatewayMiddleware(app, {
        "store": {"url": redis_cluster.url, "cluster": True, "timeout": "2s", "key_prefix": unique_prefix()},
        "rate_limit": [{"name": "per-client", "limit": 1000, "period": "1h"}],
        "concurrency_limit": [{"name": "in-flight", "limit": 5},
                              {"name": "all", "limit": 8, "key": "global"}],
    })
    async with lifespan_running(gw), client_for(gw) as client:
        responses = await asyncio.gather(*(client.get("/a", headers=KEY) for _ in range(50)))
        assert app.peak == 5
        assert Counter(r.status_code for r in responses) == {200: 5, 429: 45}
        again = await asyncio.gather(*(client.get("/a", headers=KEY) for _ in range(5)))
        assert {r.status_code for r in again} == {200}
    # two slots (the client's tag, global): the take goes alone, then the acquire over both
    assert metric(gw, "gateway_store_latency_seconds_count", operation="ratelimit_take_acquire") == 0
    assert metric(gw, "gateway_concurrency_decisions_total", limit="in-flight", decision="deny") == 45
