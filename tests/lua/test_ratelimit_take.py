"""lua/ratelimit_take.lua, called through the store, on fakeredis and on a real redis-server.

Time is moved with the script's clock offset, which only ever grows here: the store's clock
then runs at least as fast as real time, so a bucket that expires (TTL) is one the model also
sees as full, and the comparison with the model stays exact.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.store import BucketSpec, RateDecision, TakePlan
from gateway.store.memory import memory_store
from gateway.store.redis import RedisStore
from tests.conftest import TEST_STORE_TIMEOUT_S, unique_prefix
from tests.redis_process import RedisProcess


def spec(name: str, limit: int, period_ms: int, burst: int, cost: int = 1) -> BucketSpec:
    g = math.gcd(limit, period_ms)
    return BucketSpec(name=name, unit=period_ms // g, refill=limit // g, burst=burst, cost=cost)


@dataclass
class ModelBucket:
    """The reference: a token bucket in exact rational arithmetic, straight from the contract."""

    limit: int
    period_ms: int
    burst: int
    tokens: Fraction = field(default=Fraction(0))
    last_ms: int | None = None

    def level(self, now_ms: int) -> Fraction:
        if self.last_ms is None:
            return Fraction(self.burst)  # a bucket never used is full
        refill = Fraction((now_ms - self.last_ms) * self.limit, self.period_ms)
        return min(Fraction(self.burst), self.tokens + max(Fraction(0), refill))

    def ms_for(self, tokens: Fraction) -> int:
        return math.ceil(tokens * self.period_ms / self.limit)


def model_take(
    buckets: list[ModelBucket], costs: list[int], now_ms: int
) -> tuple[bool, list[tuple[int, int, int]]]:
    levels = [b.level(now_ms) for b in buckets]
    allowed = all(lv >= c for lv, c in zip(levels, costs, strict=True))
    out = []
    for b, before, c in zip(buckets, levels, costs, strict=True):
        lv = before - c if allowed else before
        if allowed:
            b.tokens, b.last_ms = lv, now_ms
        wait = b.ms_for(c - lv) if lv < c else 0
        out.append((math.floor(lv), b.ms_for(b.burst - lv), wait))
    return allowed, out


def as_tuples(d: RateDecision) -> list[tuple[int, int, int]]:
    return [(b.remaining, b.full_ms, b.wait_ms) for b in d.buckets]


async def test_full_bucket_lets_burst_pass_then_denies(store: RedisStore) -> None:
    """From a full bucket exactly `burst` requests pass at once and the next is denied."""
    plan = TakePlan.of([spec("p", limit=10, period_ms=60_000, burst=5)])
    results = [await store.ratelimit_take(plan, ["a"]) for _ in range(6)]
    assert [r.allowed for r in results] == [True] * 5 + [False]
    assert [r.buckets[0].remaining for r in results] == [4, 3, 2, 1, 0, 0]
    assert results[-1].buckets[0].wait_ms > 0


async def test_denial_charges_no_other_policy(store: RedisStore) -> None:
    """When one policy denies, the other policies of the request keep their tokens."""
    plan = TakePlan.of([spec("tight", 1, 60_000, 1), spec("loose", 100, 60_000, 10)])
    first = await store.ratelimit_take(plan, ["a", "a"])
    assert first.allowed
    assert [b.remaining for b in first.buckets] == [0, 9]
    for _ in range(5):
        denied = await store.ratelimit_take(plan, ["a", "a"])
        assert not denied.allowed
        assert denied.buckets[1].remaining == 9  # loose was not charged
        assert denied.buckets[1].wait_ms == 0
        assert denied.buckets[0].wait_ms > 0
    alone = await store.ratelimit_take(TakePlan.of([spec("loose", 100, 60_000, 10)]), ["a"])
    assert alone.buckets[0].remaining == 8


async def test_tags_are_separate_buckets(store: RedisStore) -> None:
    """Two tags (two clients) never share tokens."""
    plan = TakePlan.of([spec("p", 1, 60_000, 1)])
    assert (await store.ratelimit_take(plan, ["a"])).allowed
    assert not (await store.ratelimit_take(plan, ["a"])).allowed
    assert (await store.ratelimit_take(plan, ["b"])).allowed


async def test_sustained_rate_is_exact_over_a_long_run(store: RedisStore) -> None:
    """5,000 requests 97 ms apart at 7 per 3 s pass exactly burst + floor(T * 7/3000): no drift."""
    plan = TakePlan.of([spec("p", limit=7, period_ms=3000, burst=2)])
    offset, passed, last_now, first_now = 0, 0, 0, None
    for _ in range(5000):
        d = await store.ratelimit_take(plan, ["a"], clock_offset_ms=offset)
        first_now = d.now_ms if first_now is None else first_now
        passed += d.allowed
        last_now = d.now_ms
        offset += 97
    elapsed = last_now - first_now
    # the level never reaches the cap after the first request (97 ms < one token), so every
    # token ever refilled was spent, to the last whole one
    assert passed == 2 + (elapsed * 7) // 3000


async def test_ttl_is_the_time_to_full(store: RedisStore) -> None:
    """A written bucket expires 1 ms after it would be full again, and an allowed take sets it."""
    plan = TakePlan.of([spec("p", limit=1, period_ms=10_000, burst=3)])
    d = await store.ratelimit_take(plan, ["a"])
    assert d.buckets[0].full_ms == 10_000
    pttl = await store.client.pttl(store.key("a", "p"))
    assert 0 < pttl <= 10_001
    assert pttl > 9_000  # set from this call, not some default


async def test_expired_bucket_is_full(store: RedisStore) -> None:
    """Once its TTL has passed, the bucket is gone and behaves as full (burst passes again)."""
    plan = TakePlan.of([spec("p", limit=50, period_ms=1000, burst=2)])  # full again in 40 ms
    assert [(await store.ratelimit_take(plan, ["a"])).allowed for _ in range(3)] == [True, True, False]
    deadline = asyncio.get_running_loop().time() + 5
    while await store.client.exists(store.key("a", "p")):
        assert asyncio.get_running_loop().time() < deadline, "bucket never expired"
        await asyncio.sleep(0.01)
    assert [(await store.ratelimit_take(plan, ["a"])).allowed for _ in range(3)] == [True, True, False]


async def test_clock_stepping_back_refills_nothing_twice(store: RedisStore) -> None:
    """A store clock that jumps back (failover) neither refills nor moves the bucket's time back."""
    plan = TakePlan.of([spec("p", limit=1, period_ms=1000, burst=1)])
    base = 100_000
    assert (await store.ratelimit_take(plan, ["a"], clock_offset_ms=base)).allowed
    back = await store.ratelimit_take(plan, ["a"], clock_offset_ms=base - 60_000)
    assert not back.allowed
    # the bucket's time stayed at the later clock: the token is due 1 s after it, not earlier
    assert back.buckets[0].wait_ms > 60_000
    assert not (await store.ratelimit_take(plan, ["a"], clock_offset_ms=base + 500)).allowed
    assert (await store.ratelimit_take(plan, ["a"], clock_offset_ms=base + 1000)).allowed


async def test_changed_policy_keeps_whole_tokens(store: RedisStore) -> None:
    """A policy whose limit changes keeps the client's whole tokens instead of refilling them."""
    old = TakePlan.of([spec("p", limit=100, period_ms=60_000, burst=100)])
    for _ in range(97):
        await store.ratelimit_take(old, ["a"])
    new = TakePlan.of([spec("p", limit=7, period_ms=60_000, burst=10)])
    d = await store.ratelimit_take(new, ["a"])
    assert d.allowed
    assert d.buckets[0].remaining == 2  # 3 whole tokens were left; this request took one


async def test_huge_values_stay_exact(store: RedisStore) -> None:
    """Near the config's exactness bound (burst x unit just under 2^50) the counts stay exact."""
    limit, period_ms = 999_983, 86_400_000  # prime limit: unit = period, no gcd reduction
    burst = (2**50 - 1) // period_ms
    plan = TakePlan.of([spec("p", limit, period_ms, burst, cost=3)])
    d = await store.ratelimit_take(plan, ["a"])
    assert d.allowed
    assert d.buckets[0].remaining == burst - 3
    assert d.buckets[0].full_ms == math.ceil(3 * period_ms / limit)


# ---------------------------------------------------------------- property test vs the model
@pytest.fixture(scope="module", params=["memory", "redis"])
def sync_store(request: pytest.FixtureRequest) -> Iterator[tuple[asyncio.Runner, RedisStore]]:
    """A store driven from synchronous hypothesis tests through one asyncio runner."""
    runner = asyncio.Runner()
    if request.param == "memory":
        st_ = memory_store(key_prefix=unique_prefix(), timeout_s=TEST_STORE_TIMEOUT_S)
    else:
        server: RedisProcess = request.getfixturevalue("redis_server")
        st_ = RedisStore.from_url(server.url, key_prefix=unique_prefix(), timeout_s=TEST_STORE_TIMEOUT_S)
    try:
        yield runner, st_
    finally:
        runner.run(st_.close())
        runner.close()


policy_st = st.tuples(
    st.integers(1, 60),  # limit
    st.sampled_from([1, 7, 250, 1000, 3000, 60_000, 86_400_000]) | st.integers(1, 100_000),  # period ms
    st.integers(1, 40),  # burst
)
steps_st = st.lists(
    st.tuples(st.integers(0, 120_000) | st.integers(0, 50), st.integers(1, 40)), min_size=1, max_size=30
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(policies=st.lists(policy_st, min_size=1, max_size=3), steps=steps_st, data=st.data())
def test_matches_exact_model(
    sync_store: tuple[asyncio.Runner, RedisStore],
    policies: list[tuple[int, int, int]],
    steps: list[tuple[int, int]],
    data: st.DataObject,
) -> None:
    """For random policies, arrival gaps and costs, every answer equals the exact rational model."""
    runner, store = sync_store
    tag = unique_prefix()
    models = [ModelBucket(limit, period, burst) for limit, period, burst in policies]
    offset = 0
    for gap, cost_seed in steps:
        offset += gap
        costs = [1 + cost_seed % b for _, _, b in policies]
        if data.draw(st.booleans(), label="uniform cost"):
            costs = [min(c, costs[0]) for c in costs]
        plan = TakePlan.of([spec(f"p{i}", lim, per, b, cost=c)
                            for i, ((lim, per, b), c) in enumerate(zip(policies, costs, strict=True))])
        got = runner.run(store.ratelimit_take(plan, [tag] * len(policies), clock_offset_ms=offset))
        allowed, expected = model_take(models, costs, got.now_ms)
        assert got.allowed == allowed
        assert as_tuples(got) == expected
