"""What a store is: the protocol every backend meets, and the values it returns.

A store makes each decision with one atomic script (``lua/``). ``RedisStore`` runs them on a
Redis server; ``memory://`` runs the very same scripts on fakeredis in-process. Callers see only
these types and ``gateway.errors.StoreError``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

from gateway.config import ConcurrencyLimit, IdempotencyConfig, RateLimitPolicy
from gateway.store.breaker import BreakerState
from gateway.store.resp import bulks

__all__ = [
    "BucketSpec",
    "BucketState",
    "Claim",
    "ClaimOutcome",
    "LeaseTerms",
    "RateDecision",
    "RecordWatch",
    "SlotDecision",
    "SlotPlan",
    "Store",
    "StoredResponse",
    "TakePlan",
]

ClaimOutcome = Literal["new", "mismatch", "in_flight", "done", "unknown"]


@dataclass(frozen=True, slots=True)
class BucketSpec:
    """A policy's bucket in the script's integer terms.

    One token is ``unit`` units and the bucket gains ``refill`` units per millisecond:
    limit/period reduced by their gcd, so the script's arithmetic stays exact. A ``shadow``
    bucket (``mode = "shadow"``) is decided and charged as if enforced, but never denies.
    """

    name: str
    unit: int
    refill: int
    burst: int
    cost: int
    shadow: bool = False

    @classmethod
    def from_policy(cls, policy: RateLimitPolicy) -> BucketSpec:
        g = math.gcd(policy.limit, policy.period_ms)
        return cls(
            name=policy.name,
            unit=policy.period_ms // g,
            refill=policy.limit // g,
            burst=policy.burst,
            cost=policy.cost,
            shadow=policy.shadow,
        )


@dataclass(frozen=True, slots=True, eq=False)
class TakePlan:
    """The buckets one request takes from, with the script arguments built once.

    Equal and hashed by identity: a plan is built once per distinct set of policies and then
    keys per-request caches (``RedisStore``'s framed commands), where hashing its fields on
    every request would cost more than the framing it saves.

    ``mask`` is the scripts' optional shadow mask (one ``0``/``1`` per bucket, ``1`` = shadow),
    empty when every bucket is enforced: then it is not sent at all, and the call is the one
    made before shadow mode existed."""

    specs: tuple[BucketSpec, ...]
    argv: tuple[int, ...]  # per bucket: unit, refill, burst, cost
    names: tuple[bytes, ...]  # per bucket, the policy name as it appears in keys
    argv_resp: bytes  # argv framed as RESP bulk strings, once
    mask: bytes = b""  # b"0110": which buckets are shadow; b"" when none is
    mask_resp: bytes = b""  # the mask framed as one RESP bulk string, b"" when there is none

    @classmethod
    def of(cls, specs: Sequence[BucketSpec]) -> TakePlan:
        argv = tuple(v for s in specs for v in (s.unit, s.refill, s.burst, s.cost))
        mask = b"".join(b"1" if s.shadow else b"0" for s in specs) if any(s.shadow for s in specs) else b""
        return cls(
            specs=tuple(specs),
            argv=argv,
            names=tuple(s.name.encode() for s in specs),
            argv_resp=bulks(argv),
            mask=mask,
            mask_resp=bulks((mask,)) if mask else b"",
        )

    @property
    def mask_args(self) -> int:
        """How many arguments the mask adds to a script call: 1, or 0 without shadow buckets."""
        return 1 if self.mask else 0


class BucketState(NamedTuple):
    """One bucket after a decision (after the charge when the request was allowed).

    A named tuple, as ``RateDecision``: one is made per bucket per request, and a tuple is
    built several times faster than a frozen dataclass."""

    remaining: int  # whole tokens left
    full_ms: int  # until the bucket is full again
    wait_ms: int  # until the request's cost is available; 0 when it is now


class RateDecision(NamedTuple):
    """The outcome of ``ratelimit_take``: all buckets charged, or none.

    With shadow buckets: ``allowed`` when every enforced bucket had its cost (those are
    charged); ``would_allow`` when every bucket, shadow ones included, had it (then the shadow
    buckets are charged too). ``shadow_denied`` marks the third case, allowed but not
    ``would_allow`` (the script's reply 2). A bucket that was not charged lacked its cost
    iff its ``wait_ms`` is above 0."""

    allowed: bool
    now_ms: int  # the store's clock when it decided
    buckets: tuple[BucketState, ...]
    shadow_denied: bool = False  # allowed, but a shadow bucket lacked its cost (nothing shadow charged)

    @property
    def would_allow(self) -> bool:
        """Whether the request passes with every policy enforced, shadow ones too."""
        return self.allowed and not self.shadow_denied


@dataclass(frozen=True, slots=True)
class SlotPlan:
    """The concurrency limits one request takes a slot from, with the script arguments built once."""

    names: tuple[bytes, ...]  # per limit, its name as it appears in keys
    argv: tuple[int, ...]  # per limit: slots, lease_ms
    leases_ms: tuple[int, ...]  # per limit, for concurrency_renew
    mask: bytes  # per limit '1' for shadow, '0' enforced; b"" when every limit is enforced
    argv_resp: bytes  # argv (and the mask, when there is one) framed as RESP bulk strings, once
    renew_resp: bytes  # the leases framed, once
    combined_resp: bytes  # argv then the mask (b"" too) framed, as ratelimit_take_acquire takes them

    @classmethod
    def of(cls, limits: Sequence[ConcurrencyLimit]) -> SlotPlan:
        argv = tuple(v for c in limits for v in (c.limit, c.lease_ms))
        shadow = any(c.mode == "shadow" for c in limits)
        mask = b"".join(b"1" if c.mode == "shadow" else b"0" for c in limits) if shadow else b""
        leases = tuple(c.lease_ms for c in limits)
        return cls(
            names=tuple(c.name.encode() for c in limits),
            argv=argv,
            leases_ms=leases,
            mask=mask,
            argv_resp=bulks(argv) + (bulks((mask,)) if mask else b""),
            renew_resp=bulks(leases),
            combined_resp=bulks((*argv, mask)),
        )

    @property
    def nargs(self) -> int:
        """How many ARGV values ``argv_resp`` holds."""
        return len(self.argv) + (1 if self.mask else 0)


@dataclass(frozen=True, slots=True)
class SlotDecision:
    """The outcome of ``concurrency_acquire``: a slot of every enforced limit taken, or none.

    ``allowed`` when every enforced limit had a free slot; ``would_allow`` when every limit,
    shadow ones included, had one (a shadow limit's slot is only taken then)."""

    allowed: bool
    would_allow: bool
    now_ms: int
    in_flight: tuple[int, ...]  # per limit, holders after the call
    free: tuple[bool, ...]  # per limit, whether it had a slot for this request


@dataclass(frozen=True, slots=True)
class LeaseTerms:
    """How Idempotency-Key records live, from ``[idempotency]``, with script arguments framed once.

    A claim's lease is ``lock_ttl``; a lost claim is remembered ``linger`` after its lease ends
    (``ttl`` when it becomes an outcome-unknown record, 0 when the key is simply free again).
    """

    lock_ttl_ms: int
    claim_values: tuple[int | str, ...]  # lock_ttl, linger, on_lost_claim
    renew_values: tuple[int, ...]  # lock_ttl, linger
    ttl_values: tuple[int, ...]  # ttl
    claim_argv: bytes  # the same, framed as RESP bulk strings
    renew_argv: bytes
    ttl_argv: bytes
    # idempotency.on_in_flight = "wait": completions and releases tell waiting duplicates
    notify: bool = False
    notify_argv: bytes = bulks(("0",))

    @classmethod
    def from_config(cls, config: IdempotencyConfig) -> LeaseTerms:
        lock_ms = max(1, round(config.lock_ttl_s * 1000))
        ttl_ms = max(1, round(config.ttl_s * 1000))
        linger_ms = ttl_ms if config.on_lost_claim == "unknown" else 0
        claim = (lock_ms, linger_ms, config.on_lost_claim)
        return cls(
            lock_ttl_ms=lock_ms,
            claim_values=claim,
            renew_values=(lock_ms, linger_ms),
            ttl_values=(ttl_ms,),
            claim_argv=bulks(claim),
            renew_argv=bulks((lock_ms, linger_ms)),
            ttl_argv=bulks((ttl_ms,)),
            notify=config.on_in_flight == "wait",
            notify_argv=bulks(("1" if config.on_in_flight == "wait" else "0",)),
        )


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A response as an idempotency record keeps it; ``headers`` are encoded by the caller."""

    status: int
    headers: bytes
    body: bytes


@dataclass(frozen=True, slots=True)
class Claim:
    """The outcome of ``idempotency_claim`` (see ``lua/idempotency_claim.lua``)."""

    outcome: ClaimOutcome
    lease_left_ms: int = 0  # in_flight: until the holder's lease ends unless it renews
    response: StoredResponse | None = None  # done: what to replay


class RecordWatch(Protocol):
    """Word that an idempotency record was completed or released (``Store.idempotency_watch``).

    ``generation`` counts the notices so far; a waiter notes it before it looks at the record,
    and ``changed`` returns at once if a notice came meanwhile, so none is missed."""

    generation: int
    broken: bool  # notices stopped (the connection failed): the waiter polls from now on

    async def changed(self, seen: int, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) for a notice after generation ``seen``; False on the
        timeout, or at once when notices cannot come any more (the connection broke)."""
        ...


class Store(Protocol):
    """A backend that makes the gateway's atomic decisions.

    Every method raises ``gateway.errors.StoreError`` (or a subclass) when it cannot decide.
    """

    async def open(self) -> None:
        """Check the store answers and load the scripts; called from lifespan startup."""

    async def close(self) -> None:
        """Release connections; called from lifespan shutdown."""

    async def ping(self) -> None:
        """Raise ``StoreError`` unless the store answers within its timeout (every node's
        primary, on a cluster); goes through the circuit breaker like any call."""

    def breaker_state(self) -> BreakerState:
        """The circuit breaker's state: closed, open (failing fast) or half_open (probing)."""
        ...

    async def ratelimit_take(
        self, plan: TakePlan, tags: Sequence[str], *, clock_offset_ms: int = 0
    ) -> RateDecision:
        """Charge ``plan``'s buckets for one request, all or none.

        Args:
            plan: the buckets, from ``TakePlan.of``.
            tags: per bucket, the hashed key value (identity, ip, header) or ``"global"``;
                buckets with the same tag belong to the same client and hash slot.
            clock_offset_ms: added to the store's clock; tests move time with it, production
                never passes it.
        """
        ...

    async def concurrency_acquire(
        self, plan: SlotPlan, tags: Sequence[str], owner: bytes, *, clock_offset_ms: int = 0
    ) -> SlotDecision:
        """Take a slot of every limit in ``plan`` for the request ``owner``, all or none
        (``lua/concurrency_acquire.lua``); a resend by the same owner takes no second slot.

        Args:
            plan: the limits, from ``SlotPlan.of``.
            tags: per limit, the hashed key value or ``"global"``, as for ``ratelimit_take``.
            owner: this request's random token; release and renew need it.
            clock_offset_ms: added to the store's clock (tests only).
        """
        ...

    def combines_slots(self, tags: Sequence[str], slot_tags: Sequence[str]) -> bool:
        """Whether ``ratelimit_take_acquire`` can decide these buckets and slot sets in one
        script: always on one Redis (Sentinel, ``memory://``); on a cluster when every key is in
        one slot (the same key value: buckets and slot sets share its hash tag)."""
        ...

    async def ratelimit_take_acquire(
        self, plan: TakePlan, tags: Sequence[str], slots: SlotPlan, slot_tags: Sequence[str], owner: bytes,
    ) -> tuple[RateDecision, SlotDecision | None]:
        """``ratelimit_take`` and, only when it allows, ``concurrency_acquire``, as one atomic
        decision in one round trip (``lua/ratelimit_take_acquire.lua``); the slots are None when
        the rate limit denied, and when the acquire refused the take's tokens are back. Callers
        check ``combines_slots`` first."""
        ...

    async def concurrency_release(self, plan: SlotPlan, tags: Sequence[str], owner: bytes) -> int:
        """Give back ``owner``'s slots; the number given back (0 for slots it no longer held)."""
        ...

    async def concurrency_renew(
        self, plan: SlotPlan, tags: Sequence[str], owner: bytes, *, clock_offset_ms: int = 0
    ) -> int:
        """Extend the lease of ``owner``'s slots; the number of slots it still held."""
        ...

    async def idempotency_claim(
        self, record: str, fingerprint: bytes, owner: bytes, terms: LeaseTerms
    ) -> Claim:
        """Claim the record for ``owner``, or report it in flight, mismatched, done or unknown.

        Args:
            record: the record's name: a hash of the client identity and the key.
            fingerprint: the request's fingerprint (method, path, query, body digest).
            owner: this attempt's random token; complete, release and renew need it.
            terms: lease and retention, from ``LeaseTerms.from_config``.
        """
        ...

    def combines(self, tags: Sequence[str], record: str) -> bool:
        """Whether ``ratelimit_take_claim`` can decide these buckets and this record in one
        script: always on one Redis (Sentinel, ``memory://``); on a cluster only when every key
        is in one slot."""
        ...

    async def ratelimit_take_claim(
        self, plan: TakePlan, tags: Sequence[str], record: str, fingerprint: bytes, owner: bytes, *,
        terms: LeaseTerms,
    ) -> tuple[RateDecision, Claim | None]:
        """``ratelimit_take`` and, only when it allows, ``idempotency_claim``, as one atomic
        decision in one round trip (``lua/ratelimit_take_claim.lua``); the claim is None when
        the rate limit denied. Callers check ``combines`` first. Resent after it ran (its reply
        lost), it answers the same decision and charges nothing again."""
        ...

    async def idempotency_complete(
        self, record: str, owner: bytes, response: StoredResponse, terms: LeaseTerms
    ) -> bool:
        """Store ``response`` as the record's outcome for ``terms.ttl``; False when ``owner``
        no longer holds the claim (nothing is written)."""
        ...

    async def idempotency_release(self, record: str, owner: bytes, terms: LeaseTerms) -> bool:
        """Delete ``owner``'s claim (the request never reached the upstream); False when it
        is not ``owner``'s live claim. When there is no record, ``owner``'s claim is withdrawn:
        should it still arrive (it timed out on its way), it is refused."""
        ...

    async def idempotency_renew(self, record: str, owner: bytes, terms: LeaseTerms) -> bool:
        """Extend ``owner``'s lease by ``terms.lock_ttl``; False when the claim is not
        ``owner``'s any more."""
        ...

    def idempotency_watch(self, record: str) -> AbstractAsyncContextManager[RecordWatch | None]:
        """While the context is open, notices of ``record``'s completion or release (sent by
        holders whose ``terms.notify`` is on), from the moment the context is entered; None
        where this store cannot send them (the caller polls instead). Never raises a store
        error: a watch that cannot be set up is None."""
        ...
