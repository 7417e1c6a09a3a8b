"""Where things live in Redis: key names, and the script replies turned into result types.

Buckets are ``{key_prefix}:v1:rl:{TAG}:{policy}``, concurrency slot sets
``{key_prefix}:v1:cl:{TAG}:{limit}``, idempotency records
``{key_prefix}:v1:idem:{RECORD}``. ``v1`` is the data version (bump it when a script reads or
writes fields differently). ``{TAG}`` is a Redis Cluster hash tag, the hashed key value (or
``global``), so all buckets (and slot sets) of one client share a slot and one script can take them together;
``{RECORD}`` (a hash of identity and key) spreads records over the slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gateway.errors import StoreScriptError
from gateway.store.base import BucketState, Claim, RateDecision, SlotDecision, StoredResponse

__all__ = ["DATA_VERSION", "KeyLayout", "admission_from_reply", "claim_from_reply", "decision_from_reply",
           "slots_from_reply", "take_acquire_from_reply"]

DATA_VERSION = "v1"
_BUCKET_KEY = b"%b{%b}:%b"  # prefix, {tag} (the cluster hash tag), policy name
_RECORD_KEY = b"%b{%b}"  # prefix, {record} (the cluster hash tag)
_NEW = Claim("new")
_MISMATCH = Claim("mismatch")
_UNKNOWN = Claim("unknown")


class KeyLayout:
    """The store keys of one ``key_prefix``."""

    __slots__ = ("_cl_prefix", "_idem_prefix", "_rl_prefix")

    def __init__(self, key_prefix: str) -> None:
        self._rl_prefix = f"{key_prefix}:{DATA_VERSION}:rl:".encode()
        self._cl_prefix = f"{key_prefix}:{DATA_VERSION}:cl:".encode()
        self._idem_prefix = f"{key_prefix}:{DATA_VERSION}:idem:".encode()

    def buckets(self, tags: Sequence[str], names: Sequence[bytes]) -> list[bytes]:
        """The bucket keys of one request: per policy, its tag and its name."""
        prefix = self._rl_prefix
        return [_BUCKET_KEY % (prefix, t.encode(), n) for t, n in zip(tags, names, strict=True)]

    def slot_sets(self, tags: Sequence[str], names: Sequence[bytes]) -> list[bytes]:
        """The slot-set keys of one request: per concurrency limit, its tag and its name."""
        prefix = self._cl_prefix
        return [_BUCKET_KEY % (prefix, t.encode(), n) for t, n in zip(tags, names, strict=True)]

    def record(self, record: str) -> bytes:
        """The key of one idempotency record."""
        return _RECORD_KEY % (self._idem_prefix, record.encode())


def decision_from_reply(raw: Sequence[int]) -> RateDecision:
    """``ratelimit_take``'s reply: the decision (1 allowed, 2 allowed but a shadow bucket lacked
    its cost, 0 denied), now, then remaining/full_ms/wait_ms per bucket."""
    if len(raw) == 5:  # one bucket, the common case
        buckets: tuple[BucketState, ...] = (BucketState(raw[2], raw[3], raw[4]),)
    else:
        buckets = tuple(BucketState(raw[i], raw[i + 1], raw[i + 2]) for i in range(2, len(raw), 3))
    return RateDecision(raw[0] != 0, raw[1], buckets, raw[0] == 2)


def slots_from_reply(raw: Sequence[int]) -> SlotDecision:
    """``concurrency_acquire``'s reply: allowed (0, 1, or 2: a shadow limit would refuse), now,
    then in_flight/free per limit."""
    return SlotDecision(raw[0] != 0, raw[0] == 1, raw[1], tuple(raw[2::2]), tuple(f == 1 for f in raw[3::2]))


def claim_from_reply(raw: Sequence[Any]) -> Claim:
    """``idempotency_claim``'s reply: the outcome, then what it carries."""
    outcome = raw[0]
    if outcome == b"new":
        return _NEW
    if outcome == b"done":
        return Claim("done", response=StoredResponse(raw[1], raw[2], raw[3]))
    if outcome == b"in_flight":
        return Claim("in_flight", lease_left_ms=raw[1])
    if outcome == b"mismatch":
        return _MISMATCH
    if outcome == b"unknown":
        return _UNKNOWN
    # "withdrawn" only ever answers a claim whose caller gave up on it (timed out) and withdrew
    msg = f"idempotency_claim returned {outcome!r}"
    raise StoreScriptError(msg)


def admission_from_reply(raw: Sequence[Any]) -> tuple[RateDecision, Claim | None]:
    """``ratelimit_take_claim``'s reply: the take's reply, then the claim's when it allowed."""
    decision = decision_from_reply(raw[0])
    return decision, (claim_from_reply(raw[1]) if len(raw) > 1 else None)


def take_acquire_from_reply(raw: Sequence[Any]) -> tuple[RateDecision, SlotDecision | None]:
    """``ratelimit_take_acquire``'s reply: the take's reply, then the acquire's when it allowed."""
    return decision_from_reply(raw[0]), (slots_from_reply(raw[1]) if len(raw) > 1 else None)
