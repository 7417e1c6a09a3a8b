"""ClusterStore: the same decisions on a Redis Cluster, auto-pipelined per primary.

Each EVALSHA goes to the primary serving its keys' slot over that primary's one pipelined
connection (``cluster_routing.py``: the commands of one event-loop turn for one primary leave
in one write; MOVED, ASK, NOSCRIPT, failovers handled there). redis-py's ``RedisCluster`` only
keeps the topology. ``CallGuard`` bounds the whole of each call, redirects and retries included,
by ``store.timeout`` and feeds the breaker.

Every script's keys share one hash tag (``layout.py``), so each call sits in one slot: an
idempotency record is one key, and the buckets of one client share its tag. A request whose
policies have different key values (a ``global`` policy beside a per-client one) spans slots:
its buckets are grouped by slot, one ``ratelimit_take`` per group, the groups in parallel (all
sent in the same turn, so one write per primary). All or none still holds: when any group
denies (or fails), the groups that took tokens get them back through ``ratelimit_refund``.
Shadow buckets (``mode = "shadow"``) keep their rule across slots too: each group gets its slice
of the shadow mask, the request is allowed when every group allowed and would be allowed when
every group would; when it is allowed but not every group would, the groups that charged their
shadow buckets give those back, so a shadow bucket ends up charged iff the whole request would
have passed with it enforced.
Between the take and the refund another request may see those tokens missing; that is the price
of not coordinating across nodes.

A command whose connection broke after it was written may have run. It is resent only when
running a script twice does no harm (``RESEND_SAFE``); otherwise the caller gets
``StoreUnanswered``, as on one Redis.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import ClusterError

from gateway._kept import Kept
from gateway.errors import StoreError
from gateway.store.base import (
    BucketState,
    Claim,
    LeaseTerms,
    RateDecision,
    SlotDecision,
    SlotPlan,
    StoredResponse,
    TakePlan,
)
from gateway.store.breaker import CircuitBreaker
from gateway.store.cluster_routing import CLUSTER_RETRIES, ClusterRouter
from gateway.store.layout import (
    admission_from_reply,
    claim_from_reply,
    decision_from_reply,
    slots_from_reply,
    take_acquire_from_reply,
)
from gateway.store.redis import MAX_CONNECTIONS, TAKE_FRAMES_KEPT
from gateway.store.resp import ScriptCall, bulk, bulks, command
from gateway.store.scripted import ScriptStoreBase, script_call

if TYPE_CHECKING:
    from gateway.metrics import Metrics

__all__ = ["CLUSTER_RETRIES", "RESEND_SAFE", "ClusterStore"]

_log = logging.getLogger("gateway.store")
_PING = command("PING")
_NO_OFFSET = bulk(b"0")
_T = TypeVar("_T")

#: The scripts resent after a lost reply (the connection broke after the command was written,
#: so it may have run): those whose second run by the same caller changes nothing and answers
#: as the first did. A claim by an owner that already holds the record answers "new"; a
#: completion or a renewal by the record's owner writes the same again and answers 1;
#: ``ratelimit_take_claim`` fences its charge by the claim's owner the same way; a slot acquire
#: by an owner that holds the slot counts it as free and takes no second one, and a slot
#: release or renewal by the same owner a second time gives back or extends nothing new. Not resent:
#: ``ratelimit_take`` and ``ratelimit_refund`` (each run moves tokens again) and
#: ``idempotency_release`` (the second run finds the record the first deleted, leaves a
#: withdrawal marker and answers 0: "refused" where the release happened).
RESEND_SAFE = frozenset({
    "idempotency_claim", "idempotency_complete", "idempotency_renew", "ratelimit_take_claim",
    "concurrency_acquire", "concurrency_release", "concurrency_renew",
})


class ClusterStore(ScriptStoreBase):
    """A ``Store`` on a Redis Cluster; ``url`` names any one of its nodes.

    Args:
        client: a ``RedisCluster`` (not yet initialized is fine: ``open`` does it); its slot
            map and node connection settings are used, not its command path.
        key_prefix: ``store.key_prefix``.
        timeout_s: ``store.timeout``, the bound on one call, redirects and retries included.
        metrics: where call latency, errors and the breaker state are shown.
        max_connections: ``store.max_connections``, accepted and unused: calls share one
            pipelined connection per primary.
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
        del max_connections  # one connection per primary
        self._client = client
        self._router = ClusterRouter(client, timeout_s=timeout_s)
        self._take_frames: Kept[tuple[object, ...], _FramedTake] = Kept(TAKE_FRAMES_KEPT)
        self._refund = script_call("ratelimit_refund")
        self._scripts = (self._take, self._refund, self._claim, self._complete, self._release,
                         self._renew, self._take_claim, self._acquire, self._give_back, self._slot_renew,
                         self._take_acquire)

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
            # these settings make the pipelines' connections too, which read without them
            socket_timeout=timeout_s,  # a slot map read from a node that stopped answering
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), retries=0),  # the router decides what is retried
        )
        return cls(client, key_prefix=key_prefix, timeout_s=timeout_s, metrics=metrics,
                   max_connections=max_connections, breaker=breaker)

    @property
    def client(self) -> RedisCluster:
        """The redis-py cluster client (the topology), for diagnostics and tests."""
        return self._client

    @property
    def router(self) -> ClusterRouter:
        """Where commands are sent from, for diagnostics and tests."""
        return self._router

    async def open(self) -> None:
        await self._guard.run("open", self._open)

    async def close(self) -> None:
        await self._router.close()

    async def ping(self) -> None:
        await self._guard.run("ping", self._ping)

    async def ratelimit_take(
        self, plan: TakePlan, tags: Sequence[str], *, clock_offset_ms: int = 0
    ) -> RateDecision:
        if clock_offset_ms:
            take = self._take_framed(plan, tags, bulk(b"%d" % clock_offset_ms))
        else:
            # a client's take is the same commands every time: framed once while remembered
            key = (plan, *tags)
            cached = self._take_frames.get(key)
            if cached is None:
                cached = self._take_frames.keep(key, self._take_framed(plan, tags, _NO_OFFSET))
            take = cached
        if len(take.sends) == 1:
            slot, packed = take.sends[0]
            return await self._send(self._take, slot, packed, decision_from_reply)
        replies: list[Any] = [None] * len(take.sends)
        failure: StoreError | None = None
        try:
            await self._guard.run("ratelimit_take", self._take_groups, take.sends, replies, bounded=True)
        except StoreError as exc:
            failure = exc
        if failure is None:
            placed = _placed(take.groups, replies, len(plan.specs))
            if placed is not None:  # every group charged all its buckets: nothing to undo
                return placed
        decisions = [decision_from_reply(r) if r is not None else None for r in replies]
        allowed = failure is None and all(d is not None and d.allowed for d in decisions)
        would = allowed and all(d is not None and d.would_allow for d in decisions)
        refunds = _refunds(plan, take.groups, decisions, allowed=allowed, would=would)
        if any(refunds):
            await self._refund_taken(plan, take.keys, refunds)
        if failure is not None:
            raise failure
        return _merged(plan, take.groups, decisions, refunds, allowed=allowed, would=would)

    def _take_framed(self, plan: TakePlan, tags: Sequence[str], offset: bytes) -> _FramedTake:
        """One request's take as commands: per slot group, its slot and its framed EVALSHA."""
        keys = self._keys.buckets(tags, plan.names)
        groups = _by_slot(keys)
        sends = []
        for group in groups:
            mask = _mask(plan, group)
            args = offset + bulks(_argv(plan, group)) + (bulk(mask) if mask else b"")
            packed = self._take.evalsha([keys[i] for i in group], args,
                                        1 + 4 * len(group) + (1 if mask else 0))
            sends.append((key_slot(keys[group[0]]), packed))
        return _FramedTake(keys, groups, sends)

    async def _take_groups(self, sends: Sequence[tuple[int, bytes]], replies: list[Any]) -> None:
        """One ``ratelimit_take`` per slot group, all sent at once; each reply lands in
        ``replies`` (a group without one: not decided). The first failure is raised once every
        group is settled."""
        router, load = self._router, self._take.load
        began = asyncio.get_running_loop().time()
        joint = router.submit_all(sends)
        if joint is None:  # a pipeline with no live connection, or a slot with no primary known
            firsts: list[Any] = [None] * len(sends)
        else:
            firsts = await joint  # the usual case: one wake-up for every group's reply
        failure: BaseException | None = None
        for i, first in enumerate(firsts):
            if joint is not None and not isinstance(first, BaseException):
                replies[i] = first
                continue
            slot, packed = sends[i]
            try:
                if first is None:
                    replies[i] = await router.send(slot, packed, load)
                else:  # a redirect, NOSCRIPT, a failover: followed within what is left
                    replies[i] = await router.follow(slot, packed, load, False, first, began=began)
            except Exception as exc:  # this group is undecided; the others still count
                failure = failure or exc
        if failure is not None:
            raise failure

    async def _refund_taken(self, plan: TakePlan, keys: list[bytes], refunds: list[list[int]]) -> None:
        """Give back, per group, what ``_refunds`` names; a refund that fails is logged (those
        tokens come back by refill)."""
        taken = [g for g in refunds if g]
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

    async def concurrency_acquire(
        self, plan: SlotPlan, tags: Sequence[str], owner: bytes, *, clock_offset_ms: int = 0
    ) -> SlotDecision:
        """One ``concurrency_acquire`` per slot group, in parallel; all or none as on one Redis:
        when a group refuses (or fails), the slots the other groups took are given back (and a
        shadow limit's, when another group's shadow limit would refuse)."""
        keys = self._keys.slot_sets(tags, plan.names)
        groups = _by_slot(keys)
        replies = await asyncio.gather(
            *(self._run(self._acquire, [keys[i] for i in g], _slot_args(plan, g, owner, clock_offset_ms))
              for g in groups),
            return_exceptions=True)
        decisions = [slots_from_reply(r) if not isinstance(r, BaseException) else None for r in replies]
        failed = next((r for r in replies if isinstance(r, BaseException)), None)
        allowed = failed is None and all(d is not None and d.allowed for d in decisions)
        would = allowed and all(d is not None and d.would_allow for d in decisions)
        shadow = plan.mask or b"0" * len(keys)
        undo = [keys[i] for g, d in zip(groups, decisions, strict=True) if d is not None for i in g
                if (d.allowed and not allowed and shadow[i:i + 1] == b"0")
                or (d.would_allow and not would and shadow[i:i + 1] == b"1")]
        if undo:
            await self._give_back_slots(undo, owner)
        if failed is not None:
            raise failed
        in_flight, free = [0] * len(keys), [False] * len(keys)
        now_ms = 0
        for g, d in zip(groups, decisions, strict=True):
            assert d is not None
            now_ms = max(now_ms, d.now_ms)
            for i, count, ok in zip(g, d.in_flight, d.free, strict=True):
                in_flight[i], free[i] = count, ok
        return SlotDecision(allowed, would, now_ms, tuple(in_flight), tuple(free))

    async def _give_back_slots(self, keys: Sequence[bytes], owner: bytes) -> int:
        """Release ``owner``'s slots in ``keys``, one call per slot group; a failure is logged
        and left to the lease (the slot comes back when it ends)."""
        groups = _by_slot(keys)
        results = await asyncio.gather(
            *(self._run(self._give_back, [keys[i] for i in g], [owner]) for g in groups),
            return_exceptions=True)
        for result in results:
            if isinstance(result, StoreError):
                _log.warning("concurrency slots not given back; they return when their lease ends",
                             extra={"event": "concurrency.release_failed", "error": str(result)})
            elif isinstance(result, BaseException):
                raise result
        return sum(r for r in results if isinstance(r, int))

    def combines_slots(self, tags: Sequence[str], slot_tags: Sequence[str]) -> bool:
        keys = [*self._keys.buckets(tags, [b""] * len(tags)),
                *self._keys.slot_sets(slot_tags, [b""] * len(slot_tags))]
        return len({key_slot(k) for k in keys}) == 1

    async def ratelimit_take_acquire(
        self, plan: TakePlan, tags: Sequence[str], slots: SlotPlan, slot_tags: Sequence[str], owner: bytes,
    ) -> tuple[RateDecision, SlotDecision | None]:
        keys = [*self._keys.buckets(tags, plan.names), *self._keys.slot_sets(slot_tags, slots.names)]
        if len(_by_slot(keys)) != 1:
            msg = "ratelimit_take_acquire needs every key in one slot: check combines_slots() first"
            raise ValueError(msg)
        args = (len(plan.names), 0, *plan.argv, plan.mask, owner, *slots.argv, slots.mask)
        return take_acquire_from_reply(await self._run(self._take_acquire, keys, args))

    async def concurrency_release(self, plan: SlotPlan, tags: Sequence[str], owner: bytes) -> int:
        keys = self._keys.slot_sets(tags, plan.names)
        groups = _by_slot(keys)
        results = await asyncio.gather(*(self._run(self._give_back, [keys[i] for i in g], [owner])
                                         for g in groups))
        return sum(int(r) for r in results)

    async def concurrency_renew(
        self, plan: SlotPlan, tags: Sequence[str], owner: bytes, *, clock_offset_ms: int = 0
    ) -> int:
        keys = self._keys.slot_sets(tags, plan.names)
        groups = _by_slot(keys)
        results = await asyncio.gather(
            *(self._run(self._slot_renew, [keys[i] for i in g],
                        [owner, clock_offset_ms, *(plan.leases_ms[i] for i in g)]) for g in groups))
        return sum(int(r) for r in results)

    async def idempotency_claim(
        self, record: str, fingerprint: bytes, owner: bytes, terms: LeaseTerms
    ) -> Claim:
        key = self._keys.record(record)
        packed = self._claim.evalsha([key], bulk(fingerprint) + bulk(owner) + terms.claim_argv, 5)
        return claim_from_reply(await self._send(self._claim, key_slot(key), packed))

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
        args = (len(plan.names), 0, *plan.argv, fingerprint, owner, *terms.claim_values,
                *((plan.mask,) if plan.mask else ()))
        return admission_from_reply(await self._run(self._take_claim, keys, args))

    async def idempotency_complete(
        self, record: str, owner: bytes, response: StoredResponse, terms: LeaseTerms
    ) -> bool:
        key = self._keys.record(record)
        args = b"".join((bulk(owner), bulk(b"%d" % response.status), bulk(response.headers),
                         bulk(response.body), terms.ttl_argv))
        return bool(await self._send(self._complete, key_slot(key), self._complete.evalsha([key], args, 5)))

    async def idempotency_release(self, record: str, owner: bytes, terms: LeaseTerms) -> bool:
        key = self._keys.record(record)
        packed = self._release.evalsha([key], bulk(owner) + terms.ttl_argv, 2)
        return bool(await self._send(self._release, key_slot(key), packed))

    async def idempotency_renew(self, record: str, owner: bytes, terms: LeaseTerms) -> bool:
        key = self._keys.record(record)
        packed = self._renew.evalsha([key], bulk(owner) + terms.renew_argv, 3)
        return bool(await self._send(self._renew, key_slot(key), packed))

    def _run(self, script: ScriptCall, keys: list[bytes], args: Sequence[Any]) -> Awaitable[Any]:
        """``script`` on ``keys`` (one slot) with ``args``: its raw reply, within one
        ``store.timeout``, resent after a lost reply only when ``script.name`` is in
        ``RESEND_SAFE``; failures raised as ``StoreError``."""
        return self._send(script, key_slot(keys[0]), script.evalsha(keys, bulks(args), len(args)))

    def _send(
        self, script: ScriptCall, slot: int, packed: bytes, parse: Callable[[Any], _T] | None = None,
    ) -> Coroutine[Any, Any, _T]:
        # bounded: the router keeps each call within store.timeout itself (redirects included)
        return self._guard.run(script.name, self._router.send, slot, packed, script.load,
                               script.name in RESEND_SAFE, bounded=True, parse=parse)

    async def _open(self) -> None:
        """The topology, then every script loaded on every primary."""
        await self._router.open()
        loads = [script.load for script in self._scripts]
        replies = await asyncio.gather(*(self._router.pipeline(node).call_adjacent(*loads)
                                         for node in self._router.primaries()))
        for reply in (r for node_replies in replies for r in node_replies):
            if isinstance(reply, BaseException):
                raise reply

    async def _ping(self) -> None:
        """PING every primary; when one fails, once more after reading the slot map again
        (a failover may have replaced it)."""
        for attempt in range(2):
            primaries = self._router.primaries()
            replies = await asyncio.gather(
                *(self._router.pipeline(node).call(_PING) for node in primaries), return_exceptions=True)
            failed = next((r for r in replies if isinstance(r, BaseException)), None)
            if not primaries:  # the topology was never read (open failed)
                failed = ClusterError("no primary known: the slot map could not be read")
            if failed is None:
                return
            if attempt:
                raise failed
            await self._router.refresh()


class _FramedTake(NamedTuple):
    """A take framed for the cluster: its keys, its slot groups (indices into the plan), and per
    group the slot and the EVALSHA to send there."""

    keys: list[bytes]
    groups: list[list[int]]
    sends: list[tuple[int, bytes]]


def _placed(groups: Sequence[Sequence[int]], replies: Sequence[Any], count: int) -> RateDecision | None:
    """The decision of a request every group allowed with all its buckets charged (shadow ones
    too: each reply's decision is 1), straight from the groups' replies, in plan order; None
    when any group did otherwise (the general path merges and refunds)."""
    states: list[Any] = [None] * count
    now_ms = 0
    for k, group in enumerate(groups):
        raw = replies[k]
        if raw is None or raw[0] != 1:
            return None
        now_ms = max(now_ms, raw[1])
        at = 2
        for i in group:
            states[i] = BucketState(raw[at], raw[at + 1], raw[at + 2])
            at += 3
    return RateDecision(True, now_ms, tuple(states))


def _by_slot(keys: Sequence[bytes]) -> list[list[int]]:
    """The indices of ``keys`` grouped by cluster slot, in first-seen order."""
    groups: dict[int, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key_slot(key), []).append(i)
    return list(groups.values())


def _slot_args(plan: SlotPlan, group: Sequence[int], owner: bytes, offset_ms: int) -> list[int | bytes]:
    """``concurrency_acquire``'s arguments for the limits in ``group``: owner, offset, per limit
    slots and lease, then the group's slice of the shadow mask (when the plan has one)."""
    args: list[int | bytes] = [owner, offset_ms]
    args += [v for i in group for v in plan.argv[2 * i:2 * i + 2]]
    if plan.mask:
        args.append(bytes(plan.mask[i] for i in group))
    return args


def _argv(plan: TakePlan, group: Sequence[int]) -> list[int]:
    """The script arguments (unit, refill, burst, cost) of the buckets in ``group``."""
    return [v for i in group for v in plan.argv[4 * i:4 * i + 4]]


def _mask(plan: TakePlan, group: Sequence[int]) -> bytes:
    """The shadow mask of the buckets in ``group``; empty when none of them is shadow."""
    if not any(plan.specs[i].shadow for i in group):
        return b""
    return b"".join(b"1" if plan.specs[i].shadow else b"0" for i in group)


def _refunds(
    plan: TakePlan, groups: Sequence[Sequence[int]], decisions: Sequence[RateDecision | None], *,
    allowed: bool, would: bool,
) -> list[list[int]]:
    """Per group, the buckets whose charge must be given back (empty lists when none).

    A group charged its enforced buckets when it allowed and its shadow buckets when it would.
    A request not allowed overall (a group denied or failed) gives back all of that; one
    allowed but not ``would`` (a shadow bucket lacked somewhere) gives back the shadow charges
    only, so every shadow bucket is charged iff the whole request would have passed."""
    out: list[list[int]] = []
    for group, d in zip(groups, decisions, strict=True):
        if d is None or would:
            out.append([])
            continue
        charged = [i for i in group if d.would_allow or (d.allowed and not plan.specs[i].shadow)]
        out.append(charged if not allowed else [i for i in charged if plan.specs[i].shadow])
    return out


def _merged(
    plan: TakePlan, groups: Sequence[Sequence[int]], decisions: Sequence[RateDecision | None],
    refunds: Sequence[Sequence[int]], *, allowed: bool, would: bool,
) -> RateDecision:
    """One decision in plan order from the groups' decisions.

    A bucket that was charged and got its tokens back shows its state as of before the take:
    ``cost`` more tokens, the fill time shortened by what they are worth, and no wait (it had
    its cost)."""
    buckets: list[BucketState | None] = [None] * len(plan.specs)
    now_ms = 0
    for group, decision, refunded in zip(groups, decisions, refunds, strict=True):
        assert decision is not None
        now_ms = max(now_ms, decision.now_ms)
        for i, state in zip(group, decision.buckets, strict=True):
            if i in refunded:
                spec = plan.specs[i]
                buckets[i] = BucketState(
                    min(spec.burst, state.remaining + spec.cost),
                    max(0, state.full_ms - spec.cost * spec.unit // spec.refill),
                    0,
                )
            else:
                buckets[i] = state
    return RateDecision(allowed, now_ms, tuple(b for b in buckets if b is not None),
                        shadow_denied=allowed and not would)
