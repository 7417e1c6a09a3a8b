"""lua/idempotency_{claim,complete,release,renew}.lua, called through the store, on fakeredis and Redis.

Each test reads the record hash back with the store's plain client, so the claims are about what
the scripts write, not only what they answer. Leases that must lapse are short (0.2 s) and the
tests wait for them by polling the store's own clock (TIME) against the record's lease end ``lx``,
with a deadline, never by sleeping a guessed time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Literal

import pytest

from gateway.config import IdempotencyConfig
from gateway.errors import StoreScriptError
from gateway.store.base import Claim, LeaseTerms, StoredResponse
from gateway.store.redis import RedisStore

FP = b"POST /orders ?a=1 sha256:" + bytes(range(32))
OTHER_FP = b"POST /orders ?a=1 sha256:" + bytes(32)
REC = "3f2a9c0d1e"  # a record name: in production a hash of identity and key
BINARY_BODY = bytes(range(256)) * 3
NUL_HEADERS = b"content-type\x00application/octet-stream\x00x-a\x00\x00\x00x-b\x00\xff\xfe"
DEADLINE_S = 5.0


def terms(
    lock_s: float = 10.0, ttl_s: float = 60.0, mode: Literal["unknown", "retry"] = "unknown"
) -> LeaseTerms:
    return LeaseTerms.from_config(IdempotencyConfig(lock_ttl_s=lock_s, ttl_s=ttl_s, on_lost_claim=mode))


TERMS = terms()


async def server_ms(store: RedisStore) -> int:
    """The store's clock, ms since the epoch, as the scripts compute it from TIME."""
    sec, usec = await store.client.time()
    return int(sec) * 1000 + int(usec) // 1000


async def record(store: RedisStore, name: str = REC) -> dict[bytes, bytes]:
    raw: dict[bytes, bytes] = await store.client.hgetall(store.record_key(name))
    return raw


async def pttl(store: RedisStore, name: str = REC) -> int:
    return int(await store.client.pttl(store.record_key(name)))


async def wait_for(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + DEADLINE_S
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting: {what}"
        await asyncio.sleep(0.02)


async def wait_past(store: RedisStore, end_ms: int) -> None:
    """Wait until the store's clock is strictly past ``end_ms`` (a lease end)."""

    async def past() -> bool:
        return await server_ms(store) > end_ms

    await wait_for(past, f"store clock past {end_ms}")


async def lease_end(store: RedisStore, name: str = REC) -> int:
    return int((await record(store, name))[b"lx"])


async def claimed(store: RedisStore, owner: bytes, t: LeaseTerms, name: str = REC) -> None:
    assert await store.idempotency_claim(name, FP, owner, t) == Claim("new")


# ---------------------------------------------------------------- claim on a fresh record
async def test_fresh_claim_writes_owner_fingerprint_and_lease_unknown_mode(store: RedisStore) -> None:
    """A fresh claim answers new and writes st=p, o, fp, lx = now + lock_ttl, TTL = lock_ttl + ttl."""
    t = terms(lock_s=10, ttl_s=60, mode="unknown")
    before = await server_ms(store)
    assert await store.idempotency_claim(REC, FP, b"owner-1", t) == Claim("new")
    after = await server_ms(store)
    rec = await record(store)
    assert set(rec) == {b"st", b"o", b"fp", b"lx"}
    assert rec[b"st"] == b"p"
    assert rec[b"o"] == b"owner-1"
    assert rec[b"fp"] == FP
    assert before + 10_000 <= int(rec[b"lx"]) <= after + 10_000
    assert 69_000 < await pttl(store) <= 70_000


async def test_fresh_claim_ttl_is_the_lease_alone_in_retry_mode(store: RedisStore) -> None:
    """With on_lost_claim=retry the linger is 0: the claim's TTL is lock_ttl and no more."""
    t = terms(lock_s=10, ttl_s=60, mode="retry")
    before = await server_ms(store)
    await claimed(store, b"owner-1", t)
    after = await server_ms(store)
    assert before + 10_000 <= await lease_end(store) <= after + 10_000
    assert 9_000 < await pttl(store) <= 10_000


async def test_resent_claim_by_the_owner_is_new_and_changes_nothing(store: RedisStore) -> None:
    """A claim resent by its owner (a lost reply) answers new again and neither moves lx nor the TTL."""
    t = terms()
    await claimed(store, b"owner-1", t)
    rec, ttl_before = await record(store), await pttl(store)
    await asyncio.sleep(0.03)  # the store clock moves on: a rewritten lx or TTL would show it
    assert await store.idempotency_claim(REC, FP, b"owner-1", t) == Claim("new")
    assert await record(store) == rec
    assert await pttl(store) <= ttl_before - 20


async def test_other_owner_sees_in_flight_with_lease_left(store: RedisStore) -> None:
    """Another owner's claim during a live lease answers in_flight with 0 < lease_left <= lock_ttl."""
    t = terms(lock_s=10)
    await claimed(store, b"owner-1", t)
    rec = await record(store)
    now = await server_ms(store)
    got = await store.idempotency_claim(REC, FP, b"owner-2", t)
    assert got.outcome == "in_flight"
    assert 0 < got.lease_left_ms <= 10_000
    assert got.lease_left_ms <= int(rec[b"lx"]) - now  # measured from the store clock, not later
    assert got.lease_left_ms > 5_000
    assert await record(store) == rec  # the holder keeps it


# ---------------------------------------------------------------- fingerprint mismatch
async def mismatch_leaves_record_alone(store: RedisStore, t: LeaseTerms) -> None:
    rec, ttl_before = await record(store), await pttl(store)
    assert rec
    await asyncio.sleep(0.02)
    for owner in (b"owner-1", b"owner-2"):
        assert await store.idempotency_claim(REC, OTHER_FP, owner, t) == Claim("mismatch")
    assert await record(store) == rec
    assert await pttl(store) < ttl_before


async def test_mismatch_on_a_claim_in_flight(store: RedisStore) -> None:
    """Another fingerprint on a claimed record is a mismatch, for the owner too, and writes nothing."""
    t = terms()
    await claimed(store, b"owner-1", t)
    await mismatch_leaves_record_alone(store, t)


async def test_mismatch_on_a_done_record(store: RedisStore) -> None:
    """Another fingerprint on a completed record is a mismatch and does not replay or rewrite it."""
    t = terms()
    await claimed(store, b"owner-1", t)
    assert await store.idempotency_complete(REC, b"owner-1", StoredResponse(201, b"h", b"b"), t)
    await mismatch_leaves_record_alone(store, t)


async def test_mismatch_on_an_unknown_record(store: RedisStore) -> None:
    """Another fingerprint on an outcome-unknown record is a mismatch and writes nothing."""
    t = terms(lock_s=0.2, ttl_s=60)
    await claimed(store, b"owner-1", t)
    await wait_past(store, await lease_end(store))
    assert await store.idempotency_claim(REC, FP, b"owner-2", t) == Claim("unknown")
    assert (await record(store))[b"st"] == b"u"
    await mismatch_leaves_record_alone(store, t)


async def test_mismatch_does_not_settle_a_lapsed_claim(store: RedisStore) -> None:
    """A mismatched claim on a lapsed lease leaves it for a matching claim to settle."""
    t = terms(lock_s=0.2, ttl_s=60)
    await claimed(store, b"owner-1", t)
    await wait_past(store, await lease_end(store))
    await mismatch_leaves_record_alone(store, t)
    assert (await record(store))[b"st"] == b"p"


# ---------------------------------------------------------------- complete and replay
async def test_complete_stores_response_and_replays_it_byte_exact(store: RedisStore) -> None:
    """The owner's complete stores st=d with status, headers and body for ttl; every claim replays it."""
    t = terms(lock_s=10, ttl_s=60)
    await claimed(store, b"owner-1", t)
    response = StoredResponse(201, NUL_HEADERS, BINARY_BODY)
    assert await store.idempotency_complete(REC, b"owner-1", response, t) is True
    rec = await record(store)
    assert rec[b"st"] == b"d"
    assert rec[b"o"] == b"owner-1"
    assert rec[b"fp"] == FP
    assert rec[b"s"] == b"201"
    assert rec[b"h"] == NUL_HEADERS
    assert rec[b"b"] == BINARY_BODY
    assert b"lx" not in rec  # completion clears the lease
    assert 59_000 < await pttl(store) <= 60_000
    for owner in (b"owner-1", b"owner-2", b"owner-3"):
        got = await store.idempotency_claim(REC, FP, owner, t)
        assert got.outcome == "done"
        assert got.response == response
        assert got.response is not None
        assert type(got.response.status) is int
    assert await record(store) == rec


async def test_complete_with_empty_headers_and_body(store: RedisStore) -> None:
    """An empty header blob and an empty body are stored and replayed as empty, not lost."""
    t = terms()
    await claimed(store, b"owner-1", t)
    assert await store.idempotency_complete(REC, b"owner-1", StoredResponse(204, b"", b""), t)
    got = await store.idempotency_claim(REC, FP, b"owner-2", t)
    assert got == Claim("done", response=StoredResponse(204, b"", b""))


async def test_resent_complete_by_the_owner_is_accepted_without_rewriting(store: RedisStore) -> None:
    """A complete resent by the owner answers 1 and keeps the first response and its TTL."""
    t = terms(ttl_s=60)
    await claimed(store, b"owner-1", t)
    first = StoredResponse(200, b"first", b"first body")
    assert await store.idempotency_complete(REC, b"owner-1", first, t)
    rec, ttl_before = await record(store), await pttl(store)
    await asyncio.sleep(0.03)
    assert await store.idempotency_complete(REC, b"owner-1", StoredResponse(500, b"x", b"other"), t)
    assert await record(store) == rec
    assert await pttl(store) <= ttl_before - 20  # no fresh PEXPIRE
    got = await store.idempotency_claim(REC, FP, b"owner-2", t)
    assert got.response == first


# ---------------------------------------------------------------- fencing
async def test_non_owner_cannot_complete_release_or_renew_a_claim(store: RedisStore) -> None:
    """On another owner's live claim, complete, release and renew all answer 0 and write nothing."""
    t = terms()
    await claimed(store, b"owner-1", t)
    rec, ttl_before = await record(store), await pttl(store)
    await asyncio.sleep(0.02)
    assert await store.idempotency_complete(REC, b"owner-2", StoredResponse(200, b"h", b"b"), t) is False
    assert await store.idempotency_release(REC, b"owner-2", TERMS) is False
    assert await store.idempotency_renew(REC, b"owner-2", t) is False
    assert await record(store) == rec
    assert await pttl(store) < ttl_before
    got = await store.idempotency_claim(REC, FP, b"owner-3", t)
    assert got.outcome == "in_flight"


async def test_non_owner_cannot_touch_a_done_record(store: RedisStore) -> None:
    """On a completed record, another owner's complete, release and renew answer 0 and write nothing."""
    t = terms()
    await claimed(store, b"owner-1", t)
    assert await store.idempotency_complete(REC, b"owner-1", StoredResponse(200, b"h", b"b"), t)
    rec, ttl_before = await record(store), await pttl(store)
    await asyncio.sleep(0.02)
    assert await store.idempotency_complete(REC, b"owner-2", StoredResponse(500, b"x", b"y"), t) is False
    assert await store.idempotency_release(REC, b"owner-2", TERMS) is False
    assert await store.idempotency_renew(REC, b"owner-2", t) is False
    assert await record(store) == rec
    assert await pttl(store) < ttl_before


async def test_complete_renew_on_a_missing_record_write_nothing(store: RedisStore) -> None:
    """On a record that does not exist, complete and renew answer 0 and create no key."""
    t = terms()
    for other in (b"owner-2", b"owner-3"):
        assert await store.idempotency_complete(REC, other, StoredResponse(200, b"h", b"b"), t) is False
    assert await store.idempotency_renew(REC, b"owner-1", t) is False
    assert await store.client.exists(store.record_key(REC)) == 0


async def test_release_of_a_claim_not_there_withdraws_it(store: RedisStore) -> None:
    """Release on a missing record answers 0 and leaves a withdrawal marker with the records'
    ttl: the withdrawn owner's late claim is refused and writes nothing (nor can it complete or
    renew), while any other attempt claims the key as free."""
    t = terms(ttl_s=60)
    assert await store.idempotency_release(REC, b"owner-1", t) is False
    assert await record(store) == {b"st": b"x", b"o": b"owner-1"}
    assert 59_000 < await store.client.pttl(store.record_key(REC)) <= 60_000
    with pytest.raises(StoreScriptError, match="withdrawn"):
        await store.idempotency_claim(REC, FP, b"owner-1", t)
    for other in (b"owner-2", b"owner-3"):
        assert await store.idempotency_complete(REC, other, StoredResponse(200, b"h", b"b"), t) is False
    assert await store.idempotency_renew(REC, b"owner-1", t) is False
    assert await record(store) == {b"st": b"x", b"o": b"owner-1"}
    assert (await store.idempotency_claim(REC, OTHER_FP, b"owner-2", t)).outcome == "new"
    rec = await record(store)
    assert (rec[b"st"], rec[b"o"], rec[b"fp"]) == (b"p", b"owner-2", OTHER_FP)
    # the withdrawn claim arriving after the retry's claim meets it in flight, and writes nothing
    late = await store.idempotency_claim(REC, OTHER_FP, b"owner-1", t)
    assert late.outcome == "in_flight"
    assert await record(store) == rec


async def test_release_never_withdraws_over_an_existing_record(store: RedisStore) -> None:
    """A release that is not the owner's live claim leaves any existing record exactly as it was."""
    t = terms()
    await claimed(store, b"owner-1", t)
    rec = await record(store)
    assert await store.idempotency_release(REC, b"owner-2", t) is False
    assert await record(store) == rec


# ---------------------------------------------------------------- renew
async def test_renew_extends_lease_and_ttl(store: RedisStore) -> None:
    """The owner's renew moves lx to now + lock_ttl and the TTL back to lock_ttl + linger."""
    t = terms(lock_s=10, ttl_s=60)
    await claimed(store, b"owner-1", t)
    lx_before = await lease_end(store)
    await asyncio.sleep(0.05)
    ttl_before = await pttl(store)  # down by the 50 ms slept
    before = await server_ms(store)
    assert await store.idempotency_renew(REC, b"owner-1", t) is True
    after = await server_ms(store)
    rec = await record(store)
    assert before + 10_000 <= int(rec[b"lx"]) <= after + 10_000
    assert int(rec[b"lx"]) >= lx_before + 40
    ttl_after = await pttl(store)
    assert ttl_after > ttl_before
    assert 69_000 < ttl_after <= 70_000
    assert (rec[b"st"], rec[b"o"], rec[b"fp"]) == (b"p", b"owner-1", FP)


async def test_renew_in_retry_mode_keeps_ttl_equal_to_the_lease(store: RedisStore) -> None:
    """In retry mode a renew sets the TTL to lock_ttl alone (no linger)."""
    t = terms(lock_s=10, ttl_s=60, mode="retry")
    await claimed(store, b"owner-1", t)
    lx_before = int((await record(store))[b"lx"])
    await asyncio.sleep(0.05)
    assert await store.idempotency_renew(REC, b"owner-1", t)
    # timed on the store's clock, not by how fast this test runs: the key expires as the lease does
    before = await server_ms(store)
    ttl = await pttl(store)
    after = await server_ms(store)
    lx = int((await record(store))[b"lx"])
    assert lx >= lx_before + 40  # renewed
    assert ttl <= 10_000
    assert before - 1 <= lx - ttl <= after + 1  # no linger past the lease


async def test_renew_after_complete_is_refused(store: RedisStore) -> None:
    """Once the owner completed, its renew answers 0 and leaves the stored response as it was."""
    t = terms()
    await claimed(store, b"owner-1", t)
    assert await store.idempotency_complete(REC, b"owner-1", StoredResponse(200, b"h", b"b"), t)
    rec, ttl_before = await record(store), await pttl(store)
    await asyncio.sleep(0.02)
    assert await store.idempotency_renew(REC, b"owner-1", t) is False
    assert await record(store) == rec
    assert await pttl(store) < ttl_before


async def test_renewed_claim_stays_in_flight_past_several_leases(store: RedisStore) -> None:
    """A holder renewing every lock_ttl/3 keeps its claim in flight for others across 4 lease periods."""
    lock_s = 0.45
    t = terms(lock_s=lock_s, ttl_s=60)
    start = await server_ms(store)
    await claimed(store, b"owner-1", t)
    checks = 0
    while await server_ms(store) - start < 4 * lock_s * 1000:
        await asyncio.sleep(lock_s / 3)
        assert await store.idempotency_renew(REC, b"owner-1", t) is True
        got = await store.idempotency_claim(REC, FP, b"owner-%d" % (checks + 2), t)
        assert got.outcome == "in_flight"
        assert 0 < got.lease_left_ms <= 450
        checks += 1
    assert checks >= 4
    rec = await record(store)
    assert (rec[b"st"], rec[b"o"]) == (b"p", b"owner-1")
    assert await store.idempotency_complete(REC, b"owner-1", StoredResponse(200, b"h", b"b"), t)


# ---------------------------------------------------------------- lost claims
async def test_lost_claim_unknown_mode_settles_to_unknown(store: RedisStore) -> None:
    """In unknown mode a lapsed claim becomes st=u at the next claim, remembered ttl after its lease
    end (as if unsettled): nobody but its holder can settle it, and the holder can no longer
    renew or release it (its late completion: the next test)."""
    t = terms(lock_s=0.2, ttl_s=30, mode="unknown")
    await claimed(store, b"owner-1", t)
    end = await lease_end(store)
    # well past the lease, so a TTL counted from the settlement instead would show as too long
    await wait_past(store, end + 400)
    assert await store.idempotency_claim(REC, FP, b"owner-2", t) == Claim("unknown")
    settled_at = await server_ms(store)
    rec = await record(store)
    assert rec == {b"st": b"u", b"o": b"owner-1", b"fp": FP}
    ttl_before = await pttl(store)
    expected = end + 30_000 - settled_at  # lease end + ttl, seen from now
    assert expected - 100 < ttl_before <= expected + 5
    await asyncio.sleep(0.03)
    for owner in (b"owner-3", b"owner-2", b"owner-1"):
        assert await store.idempotency_claim(REC, FP, owner, t) == Claim("unknown")
    for other in (b"owner-2", b"owner-3"):
        assert await store.idempotency_complete(REC, other, StoredResponse(200, b"h", b"b"), t) is False
    assert await store.idempotency_renew(REC, b"owner-1", t) is False
    assert await store.idempotency_release(REC, b"owner-1", TERMS) is False
    assert await record(store) == rec
    assert await pttl(store) <= ttl_before - 20  # neither the claims nor the refusals reset the TTL


async def test_the_holders_late_outcome_replaces_outcome_unknown(store: RedisStore) -> None:
    """A holder whose lapsed claim was settled as unknown (it was alive, only the store was not)
    completes it late: the record is done with its response for ttl, and every claim replays it."""
    t = terms(lock_s=0.2, ttl_s=30, mode="unknown")
    await claimed(store, b"owner-1", t)
    await wait_past(store, await lease_end(store))
    assert await store.idempotency_claim(REC, FP, b"owner-2", t) == Claim("unknown")
    real = StoredResponse(201, b"h", b"charged")
    assert await store.idempotency_complete(REC, b"owner-1", real, t) is True
    assert 29_000 < await pttl(store) <= 30_000
    assert (await record(store))[b"st"] == b"d"
    for owner in (b"owner-2", b"owner-3"):
        assert await store.idempotency_claim(REC, FP, owner, t) == Claim("done", response=real)
    # a resent completion is the same one; another response from another owner changes nothing
    assert await store.idempotency_complete(REC, b"owner-1", real, t) is True
    assert await store.idempotency_complete(REC, b"owner-2", StoredResponse(500, b"", b"x"), t) is False
    assert await store.idempotency_claim(REC, FP, b"owner-4", t) == Claim("done", response=real)


async def test_a_completion_on_a_gone_record_writes_nothing(store: RedisStore) -> None:
    """A record the store lost (or that expired) is nobody's: a late completion writes nothing,
    so no record without a fingerprint or TTL can appear."""
    t = terms(lock_s=0.2, ttl_s=30, mode="unknown")
    assert await store.idempotency_complete(REC, b"owner-1", StoredResponse(200, b"", b"ok"), t) is False
    assert await store.client.exists(store.record_key(REC)) == 0


async def test_lost_claim_retry_mode_is_taken_over(store: RedisStore) -> None:
    """In retry mode a lapsed claim goes to the next claimant; the old owner is fenced, the new completes."""
    t = terms(lock_s=0.2, ttl_s=30, mode="retry")
    await claimed(store, b"owner-1", t)
    await wait_past(store, await lease_end(store))
    # the record either expired with its lease (linger 0) or is settled by this claim: new either way
    assert await store.idempotency_claim(REC, FP, b"owner-2", t) == Claim("new")
    rec = await record(store)
    assert (rec[b"st"], rec[b"o"], rec[b"fp"]) == (b"p", b"owner-2", FP)
    assert 0 < await pttl(store) <= 200
    assert await store.idempotency_complete(REC, b"owner-1", StoredResponse(500, b"old", b"old"), t) is False
    assert await store.idempotency_renew(REC, b"owner-1", t) is False
    assert await store.idempotency_release(REC, b"owner-1", TERMS) is False
    assert (await record(store))[b"o"] == b"owner-2"
    fresh = StoredResponse(201, b"new", b"new body")
    assert await store.idempotency_complete(REC, b"owner-2", fresh, t) is True
    assert 29_000 < await pttl(store) <= 30_000
    got = await store.idempotency_claim(REC, FP, b"owner-3", t)
    assert got == Claim("done", response=fresh)


async def test_lapsed_claim_still_stored_is_handed_over_in_retry_mode(store: RedisStore) -> None:
    """In retry mode a lapsed claim still stored (written with a linger) is re-claimed, not reported."""
    t_unknown = terms(lock_s=0.2, ttl_s=30, mode="unknown")
    t_retry = terms(lock_s=10, ttl_s=30, mode="retry")
    await claimed(store, b"owner-1", t_unknown)  # lingers 30 s past its lease
    await wait_past(store, await lease_end(store))
    assert await store.client.exists(store.record_key(REC)) == 1
    before = await server_ms(store)
    assert await store.idempotency_claim(REC, FP, b"owner-2", t_retry) == Claim("new")
    rec = await record(store)
    assert (rec[b"st"], rec[b"o"], rec[b"fp"]) == (b"p", b"owner-2", FP)
    assert int(rec[b"lx"]) >= before + 10_000
    assert 9_000 < await pttl(store) <= 10_000
    assert await store.idempotency_complete(REC, b"owner-1", StoredResponse(500, b"", b""), t_retry) is False
    assert await store.idempotency_complete(REC, b"owner-2", StoredResponse(200, b"", b"ok"), t_retry)


async def test_completed_record_outlives_its_lease(store: RedisStore) -> None:
    """A completed record is not renewed, yet stays done past lock_ttl: completion ended the lease."""
    t = terms(lock_s=0.2, ttl_s=30, mode="unknown")
    await claimed(store, b"owner-1", t)
    lx = await lease_end(store)
    response = StoredResponse(200, b"h", b"body")
    assert await store.idempotency_complete(REC, b"owner-1", response, t)
    await wait_past(store, lx + 50)
    for owner in (b"owner-2", b"owner-1"):
        assert await store.idempotency_claim(REC, FP, owner, t) == Claim("done", response=response)
    assert (await record(store))[b"st"] == b"d"


# ---------------------------------------------------------------- release and expiry
async def test_release_deletes_the_claim_and_frees_the_key(store: RedisStore) -> None:
    """The owner's release answers 1 and deletes the record; a claim is new."""
    t = terms()
    await claimed(store, b"owner-1", t)
    assert await store.idempotency_release(REC, b"owner-1", TERMS) is True
    assert await store.client.exists(store.record_key(REC)) == 0
    assert await store.idempotency_complete(REC, b"owner-1", StoredResponse(200, b"", b""), t) is False
    assert await store.client.exists(store.record_key(REC)) == 0
    await claimed(store, b"owner-2", t)
    assert (await record(store))[b"o"] == b"owner-2"


async def test_release_after_complete_is_refused(store: RedisStore) -> None:
    """A completed record cannot be released, even by its owner."""
    t = terms()
    await claimed(store, b"owner-1", t)
    assert await store.idempotency_complete(REC, b"owner-1", StoredResponse(200, b"h", b"b"), t)
    rec = await record(store)
    assert await store.idempotency_release(REC, b"owner-1", TERMS) is False
    assert await record(store) == rec


async def test_completed_record_expires_after_ttl(store: RedisStore) -> None:
    """After ttl a completed record is gone and the key can be claimed anew."""
    t = terms(lock_s=10, ttl_s=0.3)
    await claimed(store, b"owner-1", t)
    assert await store.idempotency_complete(REC, b"owner-1", StoredResponse(200, b"h", b"b"), t)
    assert 0 < await pttl(store) <= 300
    assert (await store.idempotency_claim(REC, FP, b"owner-2", t)).outcome == "done"

    async def gone() -> bool:
        return await store.client.exists(store.record_key(REC)) == 0

    await wait_for(gone, "completed record to expire")
    await claimed(store, b"owner-3", t)
    assert (await record(store))[b"st"] == b"p"


async def test_unknown_record_expires_after_ttl(store: RedisStore) -> None:
    """An outcome-unknown record is remembered for ttl, then the key is free again."""
    t = terms(lock_s=0.2, ttl_s=0.3, mode="unknown")
    await claimed(store, b"owner-1", t)
    await wait_past(store, await lease_end(store))
    assert await store.idempotency_claim(REC, FP, b"owner-2", t) == Claim("unknown")
    assert 0 < await pttl(store) <= 300

    async def gone() -> bool:
        return await store.client.exists(store.record_key(REC)) == 0

    await wait_for(gone, "unknown record to expire")
    await claimed(store, b"owner-3", t)


# ---------------------------------------------------------------- concurrency and key layout
async def test_concurrent_claims_have_exactly_one_winner(store: RedisStore) -> None:
    """50 concurrent claims by distinct owners on one record: exactly one new, 49 in flight."""
    t = terms(lock_s=10)
    owners = [b"owner-%02d" % i for i in range(50)]
    results = await asyncio.gather(*(store.idempotency_claim(REC, FP, o, t) for o in owners))
    outcomes = [r.outcome for r in results]
    assert outcomes.count("new") == 1
    assert outcomes.count("in_flight") == 49
    winner = owners[outcomes.index("new")]
    assert (await record(store))[b"o"] == winner
    assert all(0 < r.lease_left_ms <= 10_000 for r in results if r.outcome == "in_flight")


async def test_records_are_independent(store: RedisStore) -> None:
    """Claims, completion and release on one record name leave another record name untouched."""
    t = terms()
    await claimed(store, b"owner-a", t, name="rec-a")
    await claimed(store, b"owner-b", t, name="rec-b")
    b_before = await record(store, "rec-b")
    assert await store.idempotency_complete("rec-a", b"owner-a", StoredResponse(200, b"", b"a"), t)
    assert await store.idempotency_complete("rec-a", b"owner-b", StoredResponse(200, b"", b"x"), t) is False
    assert await record(store, "rec-b") == b_before
    assert (await store.idempotency_claim("rec-b", FP, b"owner-c", t)).outcome == "in_flight"
    assert await store.idempotency_release("rec-b", b"owner-b", TERMS)
    assert (await store.idempotency_claim("rec-a", FP, b"owner-c", t)).outcome == "done"
    await claimed(store, b"owner-c", t, name="rec-c")


async def test_record_key_carries_the_record_as_hash_tag(store: RedisStore) -> None:
    """The key a claim writes is record_key's, with the record name as its cluster hash tag {...}."""
    await claimed(store, b"owner-1", terms(), name="rec-a")
    a, b = store.record_key("rec-a"), store.record_key("rec-b")
    prefix = a[: a.index("{")]
    assert [k.decode() for k in await store.client.keys(prefix + "*")] == [a]
    assert a != b
    assert a.endswith(":v1:idem:{rec-a}")
    start = a.index("{")
    assert a[start + 1:a.index("}", start)] == "rec-a"  # the first {...}: what the cluster hashes
