"""lua/ratelimit_take_claim.lua through the store, on fakeredis and on a real redis-server: the
rate-limit take and the Idempotency-Key claim as one decision, against the two scripts alone."""

from __future__ import annotations

import math
import random

from gateway.config import IdempotencyConfig
from gateway.store import BucketSpec, LeaseTerms, TakePlan
from gateway.store.redis import RedisStore

TERMS = LeaseTerms.from_config(IdempotencyConfig())
FP = b"f" * 64


def spec(name: str, limit: int, period_ms: int, burst: int, cost: int = 1) -> BucketSpec:
    g = math.gcd(limit, period_ms)
    return BucketSpec(name=name, unit=period_ms // g, refill=limit // g, burst=burst, cost=cost)


PLAN = TakePlan.of([spec("per-client", 1, 3_600_000, 3), spec("costly", 1, 3_600_000, 5, cost=2)])


async def test_allowed_charges_every_bucket_once_and_claims(store: RedisStore) -> None:
    decision, claim = await store.ratelimit_take_claim(PLAN, ["c1", "c1"], "r1", FP, b"o1", terms=TERMS)
    assert decision.allowed
    assert [b.remaining for b in decision.buckets] == [2, 3]
    assert claim is not None
    assert claim.outcome == "new"
    record = await store.client.hgetall(store.record_key("r1"))
    assert record[b"st"] == b"p"
    assert record[b"o"] == b"o1"
    # the next take sees exactly one charge
    after = await store.ratelimit_take(PLAN, ["c1", "c1"])
    assert [b.remaining for b in after.buckets] == [1, 1]


async def test_a_denial_claims_nothing_and_charges_nothing(store: RedisStore) -> None:
    plan = TakePlan.of([spec("p", 1, 3_600_000, 1)])
    first, _ = await store.ratelimit_take_claim(plan, ["c2"], "r-a", FP, b"o1", terms=TERMS)
    assert first.allowed
    denied, claim = await store.ratelimit_take_claim(plan, ["c2"], "r-b", FP, b"o2", terms=TERMS)
    assert not denied.allowed
    assert claim is None
    assert denied.buckets[0].wait_ms > 0
    assert not await store.client.exists(store.record_key("r-b"))
    # so the same key, once the client may pass, runs: it is new, not in flight
    free = TakePlan.of([spec("other", 10, 1000, 10)])
    _, again = await store.ratelimit_take_claim(free, ["c2"], "r-b", FP, b"o3", terms=TERMS)
    assert again is not None
    assert again.outcome == "new"


async def test_a_resend_answers_the_same_and_charges_nothing_again(store: RedisStore) -> None:
    """The same call sent twice (its reply lost the first time) is the same claim and the same
    take: the bucket is charged once and both answers agree."""
    plan = TakePlan.of([spec("p", 1, 3_600_000, 2)])
    first = await store.ratelimit_take_claim(plan, ["c3"], "r3", FP, b"owner", terms=TERMS)
    resent = await store.ratelimit_take_claim(plan, ["c3"], "r3", FP, b"owner", terms=TERMS)
    assert resent == first
    assert first[1] is not None
    assert first[1].outcome == "new"
    left = await store.ratelimit_take(plan, ["c3"])
    assert left.allowed
    assert left.buckets[0].remaining == 0


async def test_other_attempts_are_charged_and_meet_the_claim(store: RedisStore) -> None:
    plan = TakePlan.of([spec("p", 1, 3_600_000, 10)])
    await store.ratelimit_take_claim(plan, ["c4"], "r4", FP, b"o1", terms=TERMS)
    busy, claim = await store.ratelimit_take_claim(plan, ["c4"], "r4", FP, b"o2", terms=TERMS)
    assert busy.allowed
    assert busy.buckets[0].remaining == 8
    assert claim is not None
    assert claim.outcome == "in_flight"
    assert claim.lease_left_ms > 0
    other, mismatch = await store.ratelimit_take_claim(plan, ["c4"], "r4", b"g" * 64, b"o3", terms=TERMS)
    assert other.buckets[0].remaining == 7
    assert mismatch is not None
    assert mismatch.outcome == "mismatch"


async def test_a_completed_record_is_replayed_and_forgets_the_take(store: RedisStore) -> None:
    from gateway.store import StoredResponse

    plan = TakePlan.of([spec("p", 1, 3_600_000, 10)])
    await store.ratelimit_take_claim(plan, ["c5"], "r5", FP, b"o1", terms=TERMS)
    assert await store.idempotency_complete("r5", b"o1", StoredResponse(201, b"", b"paid"), TERMS)
    assert not await store.client.hexists(store.record_key("r5"), "rl")
    replay, claim = await store.ratelimit_take_claim(plan, ["c5"], "r5", FP, b"o2", terms=TERMS)
    assert replay.allowed
    assert replay.buckets[0].remaining == 8
    assert claim is not None
    assert claim.outcome == "done"
    assert claim.response == StoredResponse(201, b"", b"paid")


async def test_same_answers_as_the_two_scripts_one_after_the_other(store: RedisStore) -> None:
    """A random run of keyed requests: the combined script and take-then-claim (claim only
    when allowed), each on its own clients, agree on every decision and every claim."""
    rng = random.Random(7)
    plan = TakePlan.of([spec("a", 3, 1000, 4), spec("b", 1, 3_600_000, 6, cost=2)])
    for i in range(60):
        client = f"c{rng.randrange(3)}"
        record = f"r{rng.randrange(8)}"
        fp = rng.choice((FP, b"g" * 64))
        owner = b"o%d" % i
        combined = await store.ratelimit_take_claim(plan, ["x" + client] * 2, "x" + record, fp, owner,
                                                    terms=TERMS)
        taken = await store.ratelimit_take(plan, ["y" + client] * 2)
        claimed = (await store.idempotency_claim("y" + record, fp, owner, TERMS)) if taken.allowed else None
        assert combined[0].allowed == taken.allowed, i
        assert [b.remaining for b in combined[0].buckets] == [b.remaining for b in taken.buckets], i
        assert [b.wait_ms > 0 for b in combined[0].buckets] == [b.wait_ms > 0 for b in taken.buckets], i
        assert (combined[1] and combined[1].outcome) == (claimed and claimed.outcome), i
