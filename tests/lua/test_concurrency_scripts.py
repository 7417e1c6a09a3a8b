"""lua/concurrency_acquire, _release, _renew and ratelimit_take_acquire through the store, on
fakeredis and on a real redis-server: slots all or none, resends, leases, TTLs, shadow limits,
and the rate limit's take and the acquire as one decision."""

from __future__ import annotations

import asyncio
import math

from gateway.config import ConcurrencyLimit
from gateway.store import BucketSpec, SlotPlan, TakePlan
from gateway.store.redis import RedisStore


def limit(name: str, slots: int, lease_ms: int = 10_000, *, shadow: bool = False) -> ConcurrencyLimit:
    return ConcurrencyLimit(name=name, limit=slots, lease_ms=lease_ms, mode="shadow" if shadow else "enforce")


def spec(name: str, limit_: int, period_ms: int, burst: int, cost: int = 1) -> BucketSpec:
    g = math.gcd(limit_, period_ms)
    return BucketSpec(name=name, unit=period_ms // g, refill=limit_ // g, burst=burst, cost=cost)


async def holders(store: RedisStore, name: str, tag: str) -> int:
    key = store._keys.slot_sets([tag], [name.encode()])[0]
    return int(await store.client.zcard(key))


async def test_slots_up_to_the_limit_then_a_refusal_that_writes_nothing(store: RedisStore) -> None:
    plan = SlotPlan.of([limit("c", 2)])
    first = await store.concurrency_acquire(plan, ["t"], b"o1")
    second = await store.concurrency_acquire(plan, ["t"], b"o2")
    third = await store.concurrency_acquire(plan, ["t"], b"o3")
    assert (first.allowed, second.allowed, third.allowed) == (True, True, False)
    assert second.in_flight == (2,)
    assert third.free == (False,)
    assert await holders(store, "c", "t") == 2
    # other key values have slots of their own
    assert (await store.concurrency_acquire(plan, ["other"], b"o3")).allowed


async def test_all_or_none_over_the_matched_limits(store: RedisStore) -> None:
    wide, narrow = limit("wide", 5), limit("narrow", 1)
    plan = SlotPlan.of([wide, narrow])
    assert (await store.concurrency_acquire(plan, ["t", "t"], b"o1")).allowed
    refused = await store.concurrency_acquire(plan, ["t", "t"], b"o2")
    assert not refused.allowed
    assert refused.free == (True, False)
    assert await holders(store, "wide", "t") == 1  # the limit with room took nothing either


async def test_a_resend_takes_no_second_slot(store: RedisStore) -> None:
    plan = SlotPlan.of([limit("c", 1)])
    assert (await store.concurrency_acquire(plan, ["t"], b"o1")).allowed
    again = await store.concurrency_acquire(plan, ["t"], b"o1")
    assert again.allowed
    assert again.in_flight == (1,)
    assert not (await store.concurrency_acquire(plan, ["t"], b"o2")).allowed


async def test_release_frees_the_slot_once(store: RedisStore) -> None:
    plan = SlotPlan.of([limit("c", 1)])
    await store.concurrency_acquire(plan, ["t"], b"o1")
    assert await store.concurrency_release(plan, ["t"], b"o1") == 1
    assert await store.concurrency_release(plan, ["t"], b"o1") == 0
    assert await store.concurrency_release(plan, ["t"], b"never") == 0
    assert (await store.concurrency_acquire(plan, ["t"], b"o2")).allowed


async def test_a_holder_that_stops_renewing_loses_its_slot_after_the_lease(store: RedisStore) -> None:
    plan = SlotPlan.of([limit("c", 1, lease_ms=1_000)])
    await store.concurrency_acquire(plan, ["t"], b"dead")
    assert not (await store.concurrency_acquire(plan, ["t"], b"o2", clock_offset_ms=800)).allowed
    late = await store.concurrency_acquire(plan, ["t"], b"o2", clock_offset_ms=1_100)
    assert late.allowed
    assert late.in_flight == (1,)  # the dead holder was dropped


async def test_a_renewal_keeps_the_slot_past_its_first_lease(store: RedisStore) -> None:
    plan = SlotPlan.of([limit("c", 1, lease_ms=1_000)])
    await store.concurrency_acquire(plan, ["t"], b"alive")
    assert await store.concurrency_renew(plan, ["t"], b"alive", clock_offset_ms=800) == 1
    assert not (await store.concurrency_acquire(plan, ["t"], b"o2", clock_offset_ms=1_500)).allowed
    assert (await store.concurrency_acquire(plan, ["t"], b"o2", clock_offset_ms=2_000)).allowed
    # a holder whose slot went to someone else does not get it back by renewing
    assert await store.concurrency_renew(plan, ["t"], b"alive", clock_offset_ms=2_100) == 0


async def test_every_slot_set_has_a_ttl_covering_its_last_lease(store: RedisStore) -> None:
    plan = SlotPlan.of([limit("c", 3, lease_ms=5_000)])
    await store.concurrency_acquire(plan, ["t"], b"o1")
    key = store._keys.slot_sets(["t"], [b"c"])[0]
    ttl = await store.client.pttl(key)
    assert 4_000 < ttl <= 5_001
    await store.concurrency_release(plan, ["t"], b"o1")
    assert not await store.client.exists(key)  # an empty set is gone


async def test_shadow_limits_count_but_never_refuse(store: RedisStore) -> None:
    plan = SlotPlan.of([limit("real", 5), limit("dark", 1, shadow=True)])
    first = await store.concurrency_acquire(plan, ["t", "t"], b"o1")
    assert (first.allowed, first.would_allow) == (True, True)
    second = await store.concurrency_acquire(plan, ["t", "t"], b"o2")
    assert (second.allowed, second.would_allow) == (True, False)
    assert second.free == (True, False)
    # the shadow limit took no slot for the request enforcing it would have refused
    assert await holders(store, "dark", "t") == 1
    assert await holders(store, "real", "t") == 2


async def test_an_enforced_refusal_takes_no_shadow_slot(store: RedisStore) -> None:
    plan = SlotPlan.of([limit("real", 1), limit("dark", 5, shadow=True)])
    await store.concurrency_acquire(plan, ["t", "t"], b"o1")
    refused = await store.concurrency_acquire(plan, ["t", "t"], b"o2")
    assert (refused.allowed, refused.would_allow) == (False, False)
    assert await holders(store, "dark", "t") == 1


async def test_concurrent_acquires_grant_exactly_the_limit(store: RedisStore) -> None:
    plan = SlotPlan.of([limit("c", 5)])
    decisions = await asyncio.gather(*(store.concurrency_acquire(plan, ["t"], b"o%d" % i) for i in range(50)))
    assert sum(d.allowed for d in decisions) == 5
    assert await holders(store, "c", "t") == 5


async def test_take_and_acquire_charge_and_hold_together(store: RedisStore) -> None:
    take = TakePlan.of([spec("rl", 1, 3_600_000, 3)])
    slots = SlotPlan.of([limit("c", 1)])
    decision, granted = await store.ratelimit_take_acquire(take, ["t"], slots, ["t"], b"o1")
    assert decision.allowed
    assert granted is not None
    assert granted.allowed
    assert decision.buckets[0].remaining == 2
    assert await holders(store, "c", "t") == 1


async def test_a_concurrency_refusal_gives_the_tokens_back(store: RedisStore) -> None:
    take = TakePlan.of([spec("rl", 1, 3_600_000, 3)])
    slots = SlotPlan.of([limit("c", 1)])
    await store.ratelimit_take_acquire(take, ["t"], slots, ["t"], b"o1")
    _, refused = await store.ratelimit_take_acquire(take, ["t"], slots, ["t"], b"o2")
    assert refused is not None
    assert not refused.allowed
    after = await store.ratelimit_take(take, ["t"])
    assert after.buckets[0].remaining == 1  # two charges (o1 and this take), not three


async def test_a_rate_limit_denial_takes_no_slot(store: RedisStore) -> None:
    take = TakePlan.of([spec("rl", 1, 3_600_000, 1)])
    slots = SlotPlan.of([limit("c", 5)])
    await store.ratelimit_take_acquire(take, ["t"], slots, ["t"], b"o1")
    denied, granted = await store.ratelimit_take_acquire(take, ["t"], slots, ["t"], b"o2")
    assert not denied.allowed
    assert granted is None
    assert await holders(store, "c", "t") == 1


async def test_a_concurrency_refusal_gives_shadow_buckets_back_too(store: RedisStore) -> None:
    """With a shadow policy beside an enforced one, the combined call passes the mask on: the
    shadow bucket is charged when it would allow, and given back with the rest on a refusal."""
    enforced = spec("rl", 1, 3_600_000, 3)
    shadow = BucketSpec(name="dark", unit=enforced.unit, refill=enforced.refill, burst=3, cost=1, shadow=True)
    take = TakePlan.of([enforced, shadow])
    slots = SlotPlan.of([limit("c", 1)])
    first, _ = await store.ratelimit_take_acquire(take, ["t", "t"], slots, ["t"], b"o1")
    assert first.allowed
    assert [b.remaining for b in first.buckets] == [2, 2]
    _, refused = await store.ratelimit_take_acquire(take, ["t", "t"], slots, ["t"], b"o2")
    assert refused is not None
    assert not refused.allowed
    after = await store.ratelimit_take(take, ["t", "t"])
    assert [b.remaining for b in after.buckets] == [1, 1]  # one charge each before, this one now
