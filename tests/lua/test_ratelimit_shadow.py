"""The shadow mask of lua/ratelimit_take.lua and lua/ratelimit_take_claim.lua, through the store,
on fakeredis and on a real redis-server.

A request is allowed iff every enforced bucket has its cost, and would be allowed iff every
bucket (shadow ones too) has it; enforced buckets are charged iff allowed, shadow buckets iff it
would be allowed; reply 1 = allowed and would, 2 = allowed but not would, 0 = denied.
"""

from __future__ import annotations

import math
import random

from gateway.config import IdempotencyConfig
from gateway.store import BucketSpec, LeaseTerms, RateDecision, TakePlan
from gateway.store.redis import RedisStore
from gateway.store.resp import bulk
from tests.lua.test_ratelimit_take import ModelBucket

TERMS = LeaseTerms.from_config(IdempotencyConfig())
FP = b"f" * 64
HOUR = 3_600_000


def spec(name: str, burst: int, *, shadow: bool = False, cost: int = 1, limit: int = 1,
         period_ms: int = HOUR) -> BucketSpec:
    g = math.gcd(limit, period_ms)
    return BucketSpec(name=name, unit=period_ms // g, refill=limit // g, burst=burst, cost=cost,
                      shadow=shadow)


def left(d: RateDecision) -> list[int]:
    return [b.remaining for b in d.buckets]


def lacking(d: RateDecision) -> list[bool]:
    """Per bucket, whether it lacked its cost; sound only for uncharged buckets (see the script)."""
    return [b.wait_ms > 0 for b in d.buckets]


def test_the_mask_is_built_only_when_a_bucket_is_shadow() -> None:
    """An all-enforced plan carries no mask (its calls are byte-identical to before); a mixed
    plan carries one character per bucket, framed once."""
    plain = TakePlan.of([spec("a", 1), spec("b", 1)])
    assert (plain.mask, plain.mask_resp, plain.mask_args) == (b"", b"", 0)
    mixed = TakePlan.of([spec("a", 1), spec("b", 1, shadow=True), spec("c", 1)])
    assert (mixed.mask, mixed.mask_resp, mixed.mask_args) == (b"010", bulk(b"010"), 1)


async def test_enforced_allows_shadow_denies(store: RedisStore) -> None:
    """A lacking shadow bucket: reply 2, the request allowed, the enforced bucket charged, and
    neither the lacking shadow bucket nor another shadow bucket with room charged."""
    plan = TakePlan.of([spec("e", 5), spec("s", 1, shadow=True), spec("roomy", 9, shadow=True)])
    first = await store.ratelimit_take(plan, ["a", "a", "a"])
    assert (first.allowed, first.would_allow, first.shadow_denied) == (True, True, False)
    assert left(first) == [4, 0, 8]
    second = await store.ratelimit_take(plan, ["a", "a", "a"])
    assert (second.allowed, second.would_allow, second.shadow_denied) == (True, False, True)
    assert left(second) == [3, 0, 8]  # e charged; s and roomy not
    assert lacking(second)[1:] == [True, False]
    assert second.buckets[1].wait_ms > 0


async def test_enforced_denies_shadow_has_room(store: RedisStore) -> None:
    """An enforced denial with a shadow bucket that had room: reply 0, nothing charged at all."""
    plan = TakePlan.of([spec("e", 1), spec("s", 5, shadow=True)])
    assert left(await store.ratelimit_take(plan, ["b", "b"])) == [0, 4]
    for _ in range(3):
        denied = await store.ratelimit_take(plan, ["b", "b"])
        assert (denied.allowed, denied.would_allow) == (False, False)
        assert left(denied) == [0, 4]
        assert lacking(denied) == [True, False]


async def test_enforced_and_shadow_both_lack(store: RedisStore) -> None:
    """Both lack: denied (reply 0), and each bucket's wait says it lacked."""
    plan = TakePlan.of([spec("e", 1), spec("s", 1, shadow=True)])
    await store.ratelimit_take(plan, ["c", "c"])
    denied = await store.ratelimit_take(plan, ["c", "c"])
    assert not denied.allowed
    assert lacking(denied) == [True, True]


async def test_two_shadows_one_denying_and_no_enforced_bucket(store: RedisStore) -> None:
    """Only shadow buckets: never denied; while one lacks, neither is charged."""
    plan = TakePlan.of([spec("s1", 5, shadow=True), spec("s2", 2, shadow=True)])
    answers = [await store.ratelimit_take(plan, ["d", "d"]) for _ in range(6)]
    assert all(a.allowed for a in answers)
    assert [a.would_allow for a in answers] == [True, True, False, False, False, False]
    assert [left(a) for a in answers] == [[4, 1], [3, 0]] + [[3, 0]] * 4
    assert all(lacking(a) == [False, True] for a in answers[2:])


async def test_a_mask_of_zeros_is_the_call_without_a_mask(store: RedisStore) -> None:
    """The raw script with mask "00" answers what it answers without the argument (0 or 1)."""
    keys = [store.key("e1", "x").encode(), store.key("e2", "x").encode()]
    argv = [0, *TakePlan.of([spec("x", 1), spec("x", 2)]).argv]
    sha = store._take.sha
    # same store state for both: each pair of calls runs on its own keys
    no_mask = [await store.client.evalsha(sha, 2, *keys, *argv) for _ in range(2)]
    keys2 = [store.key("e3", "x").encode(), store.key("e4", "x").encode()]
    zeros = [await store.client.evalsha(sha, 2, *keys2, *argv, "00") for _ in range(2)]
    assert [r[0] for r in no_mask] == [1, 0]
    # the same tokens left and the same waits (to the clock's ms: the calls are ms apart)
    assert [r[2::3] for r in no_mask] == [r[2::3] for r in zeros]
    assert [[w > 0 for w in r[4::3]] for r in no_mask] == [[w > 0 for w in r[4::3]] for r in zeros]
    assert [r[0] for r in zeros] == [1, 0]


async def test_take_claim_with_a_shadow_denial_claims_and_charges_only_enforced(store: RedisStore) -> None:
    """The combined script passes the mask on: a shadow denial still claims (reply 2), charges
    the enforced bucket alone; an enforced denial claims nothing."""
    plan = TakePlan.of([spec("e", 2), spec("s", 1, shadow=True)])
    first, claim = await store.ratelimit_take_claim(plan, ["t", "t"], "r1", FP, b"o1", terms=TERMS)
    assert first.would_allow
    assert claim is not None
    assert claim.outcome == "new"
    second, claim = await store.ratelimit_take_claim(plan, ["t", "t"], "r2", FP, b"o2", terms=TERMS)
    assert (second.allowed, second.shadow_denied) == (True, True)
    assert left(second) == [0, 0]
    assert claim is not None
    assert claim.outcome == "new"
    third, claim = await store.ratelimit_take_claim(plan, ["t", "t"], "r3", FP, b"o3", terms=TERMS)
    assert not third.allowed
    assert claim is None
    assert not await store.client.exists(store.record_key("r3"))


async def test_take_claim_resend_after_a_shadow_denial_answers_the_same(store: RedisStore) -> None:
    """A resend (its reply lost) of an allowed-but-shadow-denied admission answers the same,
    shadow_denied included, and charges nothing again."""
    plan = TakePlan.of([spec("e", 5), spec("s", 1, shadow=True)])
    await store.ratelimit_take(plan, ["u", "u"])
    first = await store.ratelimit_take_claim(plan, ["u", "u"], "r", FP, b"owner", terms=TERMS)
    resent = await store.ratelimit_take_claim(plan, ["u", "u"], "r", FP, b"owner", terms=TERMS)
    assert resent == first
    assert first[0].shadow_denied
    after = await store.ratelimit_take(plan, ["u", "u"])
    assert left(after) == [2, 0]  # e: 5 - 3 (the first take, the admission once, this one)


def model(buckets: list[ModelBucket], costs: list[int], shadow: list[bool], now_ms: int
          ) -> tuple[int, list[tuple[int, int, int]]]:
    """The reference for a masked take, in exact rational arithmetic."""
    levels = [b.level(now_ms) for b in buckets]
    has = [lv >= c for lv, c in zip(levels, costs, strict=True)]
    allowed = all(h for h, s in zip(has, shadow, strict=True) if not s)
    would = all(has)
    out = []
    for b, before, c, s in zip(buckets, levels, costs, shadow, strict=True):
        charged = would or (allowed and not s)
        lv = before - c if charged else before
        if charged:
            b.tokens, b.last_ms = lv, now_ms
        wait = b.ms_for(c - lv) if lv < c else 0
        out.append((math.floor(lv), b.ms_for(b.burst - lv), wait))
    return (1 if would else 2) if allowed else 0, out


async def test_random_masked_takes_match_the_model(store: RedisStore) -> None:
    """400 takes on three buckets with random masks, costs and clock steps: every reply, field
    for field, is the exact model's."""
    rng = random.Random(15)
    shapes = [(3, 2000, 4), (1, 700, 2), (5, 9000, 6)]  # limit, period_ms, burst
    models = [ModelBucket(limit=lim, period_ms=p, burst=b) for lim, p, b in shapes]
    offset = 0
    for step in range(400):
        shadow = [rng.random() < 0.5 for _ in shapes]
        costs = [rng.randint(1, b) for _, _, b in shapes]
        plan = TakePlan.of([spec(f"p{i}", b, shadow=s, cost=c, limit=lim, period_ms=p)
                            for i, ((lim, p, b), s, c) in enumerate(zip(shapes, shadow, costs, strict=True))])
        d = await store.ratelimit_take(plan, ["m"] * 3, clock_offset_ms=offset)
        code, expected = model(models, costs, shadow, d.now_ms)
        got = (1 if d.would_allow else 2) if d.allowed else 0
        assert (got, [(b.remaining, b.full_ms, b.wait_ms) for b in d.buckets]) == (code, expected), step
        offset += rng.choice((0, 0, 50, 300, 1500))
