"""What a store is: the protocol every backend meets, and the values it returns.

A store makes each decision with one atomic script (``lua/``). ``RedisStore`` runs them on a
Redis server; ``memory://`` runs the very same scripts on fakeredis in-process. Callers see only
these types and ``gateway.errors.StoreError``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway.config import RateLimitPolicy
from gateway.store.resp import bulks

__all__ = ["BucketSpec", "BucketState", "RateDecision", "Store", "TakePlan"]


@dataclass(frozen=True, slots=True)
class BucketSpec:
    """A policy's bucket in the script's integer terms.

    One token is ``unit`` units and the bucket gains ``refill`` units per millisecond:
    limit/period reduced by their gcd, so the script's arithmetic stays exact.
    """

    name: str
    unit: int
    refill: int
    burst: int
    cost: int

    @classmethod
    def from_policy(cls, policy: RateLimitPolicy) -> BucketSpec:
        g = math.gcd(policy.limit, policy.period_ms)
        return cls(
            name=policy.name,
            unit=policy.period_ms // g,
            refill=policy.limit // g,
            burst=policy.burst,
            cost=policy.cost,
        )


@dataclass(frozen=True, slots=True)
class TakePlan:
    """The buckets one request takes from, with the script arguments built once."""

    specs: tuple[BucketSpec, ...]
    argv: tuple[int, ...]  # per bucket: unit, refill, burst, cost
    names: tuple[bytes, ...]  # per bucket, the policy name as it appears in keys
    argv_resp: bytes  # argv framed as RESP bulk strings, once

    @classmethod
    def of(cls, specs: Sequence[BucketSpec]) -> TakePlan:
        argv = tuple(v for s in specs for v in (s.unit, s.refill, s.burst, s.cost))
        return cls(
            specs=tuple(specs),
            argv=argv,
            names=tuple(s.name.encode() for s in specs),
            argv_resp=bulks(argv),
        )


@dataclass(frozen=True, slots=True)
class BucketState:
    """One bucket after a decision (after the charge when the request was allowed)."""

    remaining: int  # whole tokens left
    full_ms: int  # until the bucket is full again
    wait_ms: int  # until the request's cost is available; 0 when it is now


@dataclass(frozen=True, slots=True)
class RateDecision:
    """The outcome of ``ratelimit_take``: all buckets charged, or none."""

    allowed: bool
    now_ms: int  # the store's clock when it decided
    buckets: tuple[BucketState, ...]


class Store(Protocol):
    """A backend that makes the gateway's atomic decisions.

    Every method raises ``gateway.errors.StoreError`` (or a subclass) when it cannot decide.
    """

    async def open(self) -> None:
        """Check the store answers and load the scripts; called from lifespan startup."""

    async def close(self) -> None:
        """Release connections; called from lifespan shutdown."""

    async def ping(self) -> None:
        """Raise ``StoreError`` unless the store answers within its timeout."""

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
