"""RedisStore: each decision is one EVALSHA of a ``lua/`` script, on one Redis (named by the URL
or by Redis Sentinels) or on fakeredis.

Every call goes through ``CallGuard`` (``guard.py``): the circuit breaker, one deadline of
``store.timeout`` from waiting for a connection to the reply (a reconnect and a script reload
included), and the translation of every foreign exception into ``gateway.errors.StoreError``.

Decisions skip redis-py's generic client path (its pool takes a lock, probes the socket and
records metrics on every command). On a Redis server they are auto-pipelined (``pipeline.py``):
the commands of every request in one event-loop turn leave in one write on one connection, and
the replies come back to their callers in order. redis-py still makes that connection (URL
parsing, AUTH/SELECT/TLS, Sentinel). On fakeredis (``memory://``), whose connections are not
sockets, they go through ``_Lane``: connections reused LIFO, one command at a time, at most
``store.max_connections`` at once. Commands are framed once per plan where they can be
(``resp.py``). Scripts are named by their SHA1,
computed locally; after NOSCRIPT (a restarted Redis, ``SCRIPT FLUSH``, a failover) the script is
loaded on that connection and the call sent once more. Key names: ``layout.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, TypeVar

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ReadOnlyError, ResponseError

from gateway._kept import Kept
from gateway.store.base import (
    Claim,
    LeaseTerms,
    RateDecision,
    RecordWatch,
    SlotDecision,
    SlotPlan,
    StoredResponse,
    TakePlan,
)
from gateway.store.breaker import CircuitBreaker
from gateway.store.layout import (
    admission_from_reply,
    claim_from_reply,
    decision_from_reply,
    slots_from_reply,
    take_acquire_from_reply,
)
from gateway.store.notify import RecordNotices
from gateway.store.pipeline import Pipeline
from gateway.store.resp import ScriptCall, bulk, bulks, command
from gateway.store.scripted import ScriptStoreBase

if TYPE_CHECKING:
    from gateway.metrics import Metrics

__all__ = ["MAX_CONNECTIONS", "TAKE_FRAMES_KEPT", "RedisStore", "connection_options"]

_T = TypeVar("_T")
#: Connections a store uses at once by default (``store.max_connections``); past it a call
#: waits (within its timeout) for one.
MAX_CONNECTIONS = 64
_NO_OFFSET = bulk(b"0")
#: Framed ``ratelimit_take`` commands kept for reuse (one per client and plan seen lately).
TAKE_FRAMES_KEPT = 16_384
_PING = command("PING")


def connection_options(timeout_s: float, max_connections: int = MAX_CONNECTIONS) -> dict[str, Any]:
    """redis-py connection settings: connecting is bounded by the store timeout; reads carry
    no timeout of their own (the call's single bound covers them); no retries inside
    redis-py (``_Lane`` decides what is safe to retry)."""
    return {
        "socket_timeout": None,
        "socket_connect_timeout": timeout_s,
        "retry": Retry(NoBackoff(), retries=0),
        "max_connections": max_connections,
    }


class _Lane:
    """Up to ``size`` connections, each carrying one command/reply at a time, reused LIFO."""

    __slots__ = ("_idle", "_live", "_make", "_slots")

    def __init__(self, make: Callable[[], AbstractConnection], size: int) -> None:
        self._make = make
        self._idle: list[AbstractConnection] = []
        self._live: set[AbstractConnection] = set()
        self._slots = asyncio.Semaphore(size)

    async def call(self, packed: bytes, load: bytes | None = None) -> Any:
        """Send one framed command and return its reply (an error reply is raised). ``load``:
        its script's ``SCRIPT LOAD``, sent before the command once more after NOSCRIPT."""
        try:
            return await self._call(packed)
        except NoScriptError:
            if load is None:
                raise
            await self._call(load)
            return await self._call(packed)

    async def _call(self, packed: bytes) -> Any:
        await self._slots.acquire()
        try:
            if not self._idle:
                return await self._exchange(await self._open(), packed)
            try:
                return await self._exchange(self._idle.pop(), packed)
            except (RedisConnectionError, OSError):
                # a reused connection was dead (Redis restarted or closed it while idle), or
                # its server was demoted (through Sentinel, READONLY comes as a connection
                # error; nothing ran, a replica takes no writes): the other idle ones share its
                # fate; once more on a new connection, which asks the sentinels afresh
                await self._drop_idle()
            return await self._exchange(await self._open(), packed)
        finally:
            self._slots.release()

    async def _exchange(self, conn: AbstractConnection, packed: bytes) -> Any:
        try:
            await conn.send_packed_command(packed, check_health=False)
            reply = await conn.read_response()
        except ReadOnlyError:
            # this server became a replica (a failover): its connections must find the master
            await self._drop(conn)
            await self._drop_idle()
            raise
        except ResponseError:
            self._idle.append(conn)  # an error reply leaves the connection in step
            raise
        except BaseException:
            # broken, timed out or cancelled mid-exchange: the connection is out of step
            await self._drop(conn)
            raise
        self._idle.append(conn)
        return reply

    async def _open(self) -> AbstractConnection:
        """A new connection, connected. By ``connect()`` itself, not send's implicit connect:
        only ``connect()`` makes a Sentinel-managed connection ask the sentinels for the master.
        Reused connections are never reconnected here: one the server closed fails its send
        and is dropped."""
        conn = self._make()
        self._live.add(conn)
        try:
            await conn.connect()  # type: ignore[no-untyped-call]
        except BaseException:
            await self._drop(conn)
            raise
        return conn

    async def _drop(self, conn: AbstractConnection) -> None:
        self._live.discard(conn)
        await conn.disconnect(nowait=True)

    async def _drop_idle(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await self._drop(conn)

    async def close(self) -> None:
        self._idle.clear()
        live, self._live = self._live, set()
        for conn in live:
            await conn.disconnect(nowait=True)


class RedisStore(ScriptStoreBase):
    """A ``Store`` on one Redis server (or the master Sentinels name; or fakeredis, for ``memory://``).

    Args:
        client: a redis-py client; its pool's connection settings (URL, auth, TLS) are used.
        key_prefix: ``store.key_prefix``.
        timeout_s: ``store.timeout``, the bound on one call.
        metrics: where call latency, errors and the breaker state are shown.
        max_connections: ``store.max_connections`` (for the lane; a pipelined store uses one).
        breaker: the circuit breaker (a new one, 5 failures / 1 s, when None).
        pipelined: auto-pipeline the calls over one connection; False sends them one at a
            time over a lane of connections. None (the default) pipelines unless the client is
            fakeredis, whose connections are not sockets.
    """

    def __init__(
        self,
        client: Redis,
        *,
        key_prefix: str,
        timeout_s: float,
        metrics: Metrics | None = None,
        max_connections: int = MAX_CONNECTIONS,
        breaker: CircuitBreaker | None = None,
        pipelined: bool | None = None,
    ) -> None:
        super().__init__(key_prefix=key_prefix, timeout_s=timeout_s, metrics=metrics, breaker=breaker)
        self._client = client
        pool: ConnectionPool = client.connection_pool
        if pipelined is None:
            pipelined = not pool.connection_class.__module__.startswith("fakeredis")
        self._lane: Pipeline | _Lane = (
            Pipeline(pool.make_connection, timeout_s=timeout_s)
            if pipelined else _Lane(pool.make_connection, max_connections)
        )
        self._bounded = pipelined  # the pipeline bounds every call itself, cheaper than the guard
        self._notices = RecordNotices(client, timeout_s)
        self._take_frames: Kept[tuple[object, ...], bytes] = Kept(TAKE_FRAMES_KEPT)
        self._take_claim_frames: Kept[tuple[object, ...], tuple[bytes, bytes, bytes]] = Kept(TAKE_FRAMES_KEPT)
        self._scripts = (self._take, self._claim, self._complete, self._release, self._renew,
                         self._take_claim, self._acquire, self._give_back, self._slot_renew,
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
    ) -> RedisStore:
        pool = ConnectionPool.from_url(url, **connection_options(timeout_s, max_connections))
        return cls(Redis.from_pool(pool), key_prefix=key_prefix, timeout_s=timeout_s, metrics=metrics,
                   max_connections=max_connections, breaker=breaker)

    @classmethod
    def from_sentinels(
        cls,
        url: str,
        sentinels: Sequence[str],
        service_name: str,
        *,
        key_prefix: str,
        timeout_s: float,
        metrics: Metrics | None = None,
        max_connections: int = MAX_CONNECTIONS,
        breaker: CircuitBreaker | None = None,
    ) -> RedisStore:
        """A store on the master that Redis Sentinels (``"host:port"`` each) name ``service_name``.

        Each new connection asks the sentinels where the master is, so after a failover the
        lane's next connection reaches the new one (redis-py's ``SentinelManagedConnection``;
        a READONLY reply from a demoted master becomes a connection error, and the lane
        replaces its connections). ``url`` gives the scheme (``rediss`` = TLS), credentials and
        database of the master; its host and port are not used. Sentinels are asked without
        credentials or TLS, each question bounded by ``timeout_s``.
        """
        # as ConnectionPool.from_url does: the URL's own options (?ssl_cert_reqs=...) win
        options: dict[str, Any] = {**connection_options(timeout_s, max_connections), **parse_url(url)}
        for unused in ("host", "port", "connection_class"):  # the sentinels name the master
            options.pop(unused, None)
        options["ssl"] = url.startswith("rediss:")  # picks SentinelManagedSSLConnection
        ask = {"socket_connect_timeout": timeout_s, "socket_timeout": timeout_s,
               "retry": Retry(NoBackoff(), retries=0)}
        sentinel = Sentinel([_host_port(a) for a in sentinels], sentinel_kwargs=ask)  # type: ignore[no-untyped-call, unused-ignore]
        client = sentinel.master_for(service_name, **options)
        return cls(client, key_prefix=key_prefix, timeout_s=timeout_s, metrics=metrics,
                   max_connections=max_connections, breaker=breaker)

    @property
    def client(self) -> Redis:
        """A plain redis-py client on the same server, for diagnostics and tests."""
        return self._client

    async def open(self) -> None:
        for script in self._scripts:
            await self._guard.run("open", self._lane.call, script.load, bounded=self._bounded)

    async def close(self) -> None:
        await self._notices.close()
        await self._lane.close()
        await self._client.aclose()
        pool = self._client.connection_pool
        if isinstance(pool, SentinelConnectionPool):
            await pool.sentinel_manager.aclose()  # the clients that ask the sentinels

    async def ping(self) -> None:
        await self._guard.run("ping", self._lane.call, _PING, bounded=self._bounded)

    def ratelimit_take(
        self, plan: TakePlan, tags: Sequence[str], *, clock_offset_ms: int = 0
    ) -> Coroutine[Any, Any, RateDecision]:
        if clock_offset_ms:
            packed = self._take_command(plan, tags, bulk(b"%d" % clock_offset_ms))
            return self._run(self._take, packed, decision_from_reply)
        # a client's take is the same command every time: framed once while it is remembered
        key = (plan, *tags)
        framed = self._take_frames.get(key)
        if framed is None:
            framed = self._take_frames.keep(key, self._take_command(plan, tags, _NO_OFFSET))
        return self._run(self._take, framed, decision_from_reply)

    def _take_command(self, plan: TakePlan, tags: Sequence[str], offset: bytes) -> bytes:
        keys = self._keys.buckets(tags, plan.names)
        return self._take.evalsha(keys, offset + plan.argv_resp + plan.mask_resp,
                                  1 + len(plan.argv) + plan.mask_args)

    def concurrency_acquire(
        self, plan: SlotPlan, tags: Sequence[str], owner: bytes, *, clock_offset_ms: int = 0
    ) -> Coroutine[Any, Any, SlotDecision]:
        keys = self._keys.slot_sets(tags, plan.names)
        offset = bulk(b"%d" % clock_offset_ms) if clock_offset_ms else _NO_OFFSET
        packed = self._acquire.evalsha(keys, bulk(owner) + offset + plan.argv_resp, 2 + plan.nargs)
        return self._run(self._acquire, packed, slots_from_reply)

    def combines_slots(self, tags: Sequence[str], slot_tags: Sequence[str]) -> bool:
        return True  # one server holds every key

    def ratelimit_take_acquire(
        self, plan: TakePlan, tags: Sequence[str], slots: SlotPlan, slot_tags: Sequence[str], owner: bytes,
    ) -> Coroutine[Any, Any, tuple[RateDecision, SlotDecision | None]]:
        keys = self._keys.buckets(tags, plan.names)
        keys += self._keys.slot_sets(slot_tags, slots.names)
        args = b"".join((bulk(b"%d" % len(plan.names)), _NO_OFFSET, plan.argv_resp, bulk(plan.mask),
                         bulk(owner), slots.combined_resp))
        # n, offset, the buckets' arguments, their mask, owner, the limits' arguments, their mask
        packed = self._take_acquire.evalsha(keys, args, 5 + len(plan.argv) + len(slots.argv))
        return self._run(self._take_acquire, packed, take_acquire_from_reply)

    def concurrency_release(
        self, plan: SlotPlan, tags: Sequence[str], owner: bytes
    ) -> Coroutine[Any, Any, int]:
        keys = self._keys.slot_sets(tags, plan.names)
        return self._run(self._give_back, self._give_back.evalsha(keys, bulk(owner), 1), int)

    def concurrency_renew(
        self, plan: SlotPlan, tags: Sequence[str], owner: bytes, *, clock_offset_ms: int = 0
    ) -> Coroutine[Any, Any, int]:
        keys = self._keys.slot_sets(tags, plan.names)
        offset = bulk(b"%d" % clock_offset_ms) if clock_offset_ms else _NO_OFFSET
        packed = self._slot_renew.evalsha(keys, bulk(owner) + offset + plan.renew_resp, 2 + len(keys))
        return self._run(self._slot_renew, packed, int)

    def idempotency_claim(
        self, record: str, fingerprint: bytes, owner: bytes, terms: LeaseTerms
    ) -> Coroutine[Any, Any, Claim]:
        key = self._keys.record(record)
        packed = self._claim.evalsha([key], bulk(fingerprint) + bulk(owner) + terms.claim_argv, 5)
        return self._run(self._claim, packed, claim_from_reply)

    def combines(self, tags: Sequence[str], record: str) -> bool:
        return True  # one server holds every key

    def ratelimit_take_claim(
        self, plan: TakePlan, tags: Sequence[str], record: str, fingerprint: bytes, owner: bytes, *,
        terms: LeaseTerms,
    ) -> Coroutine[Any, Any, tuple[RateDecision, Claim | None]]:
        # what a client's admissions share (the buckets' keys, the plan's arguments) is framed
        # once while it is remembered; the record, fingerprint and owner are framed each time
        key = (plan, terms.claim_argv, *tags)
        framed = self._take_claim_frames.get(key)
        if framed is None:
            framed = self._take_claim_frames.keep(key, self._take_claim_parts(plan, tags, terms))
        head, middle, tail = framed
        packed = b"".join((head, bulk(self._keys.record(record)), middle, bulk(fingerprint), bulk(owner),
                           tail))
        return self._run(self._take_claim, packed, admission_from_reply)

    def _take_claim_parts(
        self, plan: TakePlan, tags: Sequence[str], terms: LeaseTerms
    ) -> tuple[bytes, bytes, bytes]:
        """``ratelimit_take_claim``'s command in the parts a client's admissions share: up to
        the record's key (the EVALSHA head and the buckets' keys), between it and the
        fingerprint (n, offset, the buckets' arguments), and after the owner."""
        keys = self._keys.buckets(tags, plan.names)
        head = self._take_claim.head(len(keys) + 1, 7 + len(plan.argv) + plan.mask_args) + bulks(keys)
        middle = bulk(b"%d" % len(plan.names)) + _NO_OFFSET + plan.argv_resp
        return head, middle, terms.claim_argv + plan.mask_resp

    def idempotency_complete(
        self, record: str, owner: bytes, response: StoredResponse, terms: LeaseTerms
    ) -> Coroutine[Any, Any, bool]:
        key = self._keys.record(record)
        args = b"".join((bulk(owner), bulk(b"%d" % response.status), bulk(response.headers),
                         bulk(response.body), terms.ttl_argv, terms.notify_argv))
        return self._run(self._complete, self._complete.evalsha([key], args, 6), bool)

    def idempotency_release(self, record: str, owner: bytes, terms: LeaseTerms) -> Coroutine[Any, Any, bool]:
        key = self._keys.record(record)
        packed = self._release.evalsha([key], bulk(owner) + terms.ttl_argv + terms.notify_argv, 3)
        return self._run(self._release, packed, bool)

    def idempotency_watch(self, record: str) -> AbstractAsyncContextManager[RecordWatch | None]:
        # the channel is named like the record's key (lua/idempotency_complete.lua)
        return self._notices.watch(self._keys.record(record))

    def idempotency_renew(self, record: str, owner: bytes, terms: LeaseTerms) -> Coroutine[Any, Any, bool]:
        key = self._keys.record(record)
        packed = self._renew.evalsha([key], bulk(owner) + terms.renew_argv, 3)
        return self._run(self._renew, packed, bool)

    def _run(self, script: ScriptCall, packed: bytes, parse: Callable[[Any], _T]) -> Coroutine[Any, Any, _T]:
        """One EVALSHA through the guard, its reply through ``parse``; after NOSCRIPT the
        script is loaded and the call sent once more (by the pipeline or the lane), within the
        same bound. Not a coroutine of its own: a store method returns the guard's."""
        return self._guard.run(script.name, self._lane.call, packed, script.load, bounded=self._bounded,
                               parse=parse)


def _host_port(address: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` (as ``store.sentinels`` holds them) to a pair."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)
