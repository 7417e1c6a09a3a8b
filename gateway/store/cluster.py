"""ClusterStore: the same decisions on a Redis Cluster, through redis-py's ``RedisCluster``.

The client owns the topology: it routes each EVALSHA by its keys' slot, follows MOVED and ASK,
and after a connection error re-reads the slot map (a failover) and tries again, a bounded
number of times; ``CallGuard`` bounds the whole of it by ``store.timeout`` and feeds the breaker.

Every script's keys share one hash tag (``layout.py``), so each call sits in one slot: an
idempotency record is one key, and the buckets of one client share its tag. A request whose
policies have different key values (a ``global`` policy beside a per-client one) spans slots:
its buckets are grouped by slot, one ``ratelimit_take`` per group, the groups in parallel. All
or none still holds: when any group denies (or fails), the groups that took tokens get them
back through ``ratelimit_refund``. Between the take and the refund another request may see those
tokens missing; that is the price of not coordinating across nodes.

On NOSCRIPT (a promoted replica, a restarted node, ``SCRIPT FLUSH``) the call is sent once more
as EVAL, which runs the script and caches it on that node: one extra round trip, no error.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import NoScriptError

from gateway.errors import StoreError
from gateway.store.base import BucketState, Claim, LeaseTerms, RateDecision, StoredResponse, TakePlan
from gateway.store.breaker import CircuitBreaker
from gateway.store.layout import admission_from_reply, claim_from_reply, decision_from_reply
from gateway.store.redis import MAX_CONNECTIONS
from gateway.store.resp import ScriptCall
from gateway.store.scripted import ScriptStoreBase, script_call

if TYPE_CHECKING:
    from gateway.metrics import Metrics

__all__ = ["CLUSTER_RETRIES", "ClusterStore"]

_log = logging.getLogger("gateway.store")
#: Times the client re-reads the slot map and resends after a connection error or a cluster
#: mid-failover; MOVED/ASK redirects are followed separately (redis-py caps them at 16).
CLUSTER_RETRIES = 2


class ClusterStore(ScriptStoreBase):
    """A ``Store`` on a Redis Cluster; ``url`` names any one of its nodes.

    Args:
        client: a ``RedisCluster`` (not yet initialized is fine: ``open`` does it).
        key_prefix: ``store.key_prefix``.
        timeout_s: ``store.timeout``, the bound on one call, redirects and retries included.
        metrics: where call latency, errors and the breaker state are shown.
        max_connections: ``store.max_connections``: calls in flight at once, over all nodes.
        breaker: the circuit breaker (a new one, 5 failures / 1 s, when None).
    """

    def __init__(
        self,
        client: RedisCluster,
        *,
        key_prefix: str,
        timeout_s: float,
        metrics: Metrics | None = None,
        max_connections: int = MAX_CONNECTIONS,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        super().__init__(key_prefix=key_prefix, timeout_s=timeout_s, metrics=metrics, breaker=breaker)
        self._client = client
        # redis-py's per-node pools raise instead of waiting when full: calls wait here instead
        self._slots = asyncio.Semaphore(max_connections)
        self._refund = script_call("ratelimit_refund")
        self._scripts = (self._take, self._refund, self._claim, self._complete, self._release,
                         self._renew, self._take_claim)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        key_prefix: str,
        timeout_s: float,
        metrics: Metrics | None = None,
        max_connections: int = MAX_CONNECTIONS,
        breaker: CircuitBreaker | None = None,
    ) -> ClusterStore:
        client = RedisCluster.from_url(
            url,
            socket_timeout=None,  # the call's one deadline covers reads
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), retries=CLUSTER_RETRIES),
            max_connections=max_connections + 2,  # never the limit: the semaphore is
        )
        return cls(client, key_prefix=key_prefix, timeout_s=timeout_s, metrics=metrics,
                   max_connections=max_connections, breaker=breaker)

    @property
    def client(self) -> RedisCluster:
        """The redis-py cluster client, for diagnostics and tests."""
        return self._client

    async def open(self) -> None:
        await self._guard.run("open", self._load_scripts())

    async def close(self) -> None:
        await self._client.aclose()

    async def ping(self) -> None:
        await self._guard.run("ping", self._command("PING", target_nodes=RedisCluster.PRIMARIES))

    async def ratelimit_take(
        self, plan: TakePlan, tags: Sequence[str], *, clock_offset_ms: int = 0
    ) -> RateDecision:
        keys = self._keys.buckets(tags, plan.names)
        groups = _by_slot(keys)
        if len(groups) == 1:
            raw = await self._run(self._take, keys, (clock_offset_ms, *plan.argv))
            return decision_from_reply(raw)
        results = await asyncio.gather(
            *(self._run(self._take, [keys[i] for i in group], (clock_offset_ms, *_argv(plan, group)))
              for group in groups),
            return_exceptions=True,
        )
        decisions: list[RateDecision | None] = []
        failure: BaseException | None = None
        for result in results:
            if isinstance(result, BaseException):
                failure = failure or result
                decisions.append(None)
            else:
                decisions.append(decision_from_reply(result))
        allowed = failure is None and all(d is not None and d.allowed for d in decisions)
        if not allowed:
            await self._refund_taken(plan, keys, groups, decisions)
        if failure is not None:
            raise failure
        return _merged(plan, groups, decisions, allowed)

    async def _refund_taken(
        self, plan: TakePlan, keys: list[bytes], groups: list[list[int]],
        decisions: Sequence[RateDecision | None],
    ) -> None:
        """Give back what the groups that allowed took; a refund that fails is logged (those
        tokens come back by refill)."""
        taken = [g for g, d in zip(groups, decisions, strict=True) if d is not None and d.allowed]
        results = await asyncio.gather(
            *(self._run(self._refund, [keys[i] for i in group], _argv(plan, group)) for group in taken),
            return_exceptions=True,
        )
        for group, result in zip(taken, results, strict=True):
            if isinstance(result, StoreError):
                _log.warning("rate limit refund failed; those tokens return by refill", extra={
                    "event": "ratelimit.refund_failed",
                    "policies": [plan.specs[i].name for i in group], "error": str(result)})
            elif isinstance(result, BaseException):
                raise result

    async def idempotency_claim(
        self, record: str, fingerprint: bytes, owner: bytes, terms: LeaseTerms
    ) -> Claim:
        raw = await self._run(self._claim, [self._keys.record(record)],
                              (fingerprint, owner, *terms.claim_values))
        return claim_from_reply(raw)

    def combines(self, tags: Sequence[str], record: str) -> bool:
        slot = key_slot(self._keys.record(record))
        return all(key_slot(k) == slot for k in self._keys.buckets(tags, [b""] * len(tags)))

    async def ratelimit_take_claim(
        self, plan: TakePlan, tags: Sequence[str], record: str, fingerprint: bytes, owner: bytes, *,
        terms: LeaseTerms,
    ) -> tuple[RateDecision, Claim | None]:
        keys = [*self._keys.buckets(tags, plan.names), self._keys.record(record)]
        if len(_by_slot(keys)) != 1:
            msg = "ratelimit_take_claim needs every key in one slot: check combines() first"
            raise ValueError(msg)
        args = (len(plan.names), 0, *plan.argv, fingerprint, owner, *terms.claim_values)
        return admission_from_reply(await self._run(self._take_claim, keys, args))

    async def idempotency_complete(
        self, record: str, owner: bytes, response: StoredResponse, terms: LeaseTerms
    ) -> bool:
        args = (owner, response.status, response.headers, response.body, *terms.ttl_values)
        return bool(await self._run(self._complete, [self._keys.record(record)], args))

    async def idempotency_release(self, record: str, owner: bytes, terms: LeaseTerms) -> bool:
        args = (owner, *terms.ttl_values)
        return bool(await self._run(self._release, [self._keys.record(record)], args))

    async def idempotency_renew(self, record: str, owner: bytes, terms: LeaseTerms) -> bool:
        args = (owner, *terms.renew_values)
        return bool(await self._run(self._renew, [self._keys.record(record)], args))

    def _run(self, script: ScriptCall, keys: list[bytes], args: Sequence[Any]) -> Any:
        return self._guard.run(script.name, self._eval(script, keys, args))

    async def _eval(self, script: ScriptCall, keys: list[bytes], args: Sequence[Any]) -> Any:
        """EVALSHA in the keys' slot; after NOSCRIPT, EVAL (which also caches the script)."""
        try:
            return await self._command("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await self._command("EVAL", script.source, len(keys), *keys, *args)

    async def _command(self, *args: Any, **options: Any) -> Any:
        async with self._slots:
            return await self._client.execute_command(*args, **options)

    async def _load_scripts(self) -> None:
        await self._client.initialize()
        for script in self._scripts:
            await self._command("SCRIPT LOAD", script.source, target_nodes=RedisCluster.PRIMARIES)


def _by_slot(keys: Sequence[bytes]) -> list[list[int]]:
    """The indices of ``keys`` grouped by cluster slot, in first-seen order."""
    groups: dict[int, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key_slot(key), []).append(i)
    return list(groups.values())


def _argv(plan: TakePlan, group: Sequence[int]) -> list[int]:
    """The script arguments (unit, refill, burst, cost) of the buckets in ``group``."""
    return [v for i in group for v in plan.argv[4 * i:4 * i + 4]]


def _merged(
    plan: TakePlan, groups: Sequence[Sequence[int]], decisions: Sequence[RateDecision | None],
    allowed: bool,
) -> RateDecision:
    """One decision in plan order from the groups' decisions.

    After a denial, a group that took tokens and got them back shows its state as of before
    the take: ``cost`` more tokens and the fill time shortened by what they are worth."""
    buckets: list[BucketState | None] = [None] * len(plan.specs)
    now_ms = 0
    for group, decision in zip(groups, decisions, strict=True):
        assert decision is not None
        now_ms = max(now_ms, decision.now_ms)
        for i, state in zip(group, decision.buckets, strict=True):
            if not allowed and decision.allowed:
                spec = plan.specs[i]
                buckets[i] = BucketState(
                    min(spec.burst, state.remaining + spec.cost),
                    max(0, state.full_ms - spec.cost * spec.unit // spec.refill),
                    0,
                )
            else:
                buckets[i] = state
    return RateDecision(allowed, now_ms, tuple(b for b in buckets if b is not None))
