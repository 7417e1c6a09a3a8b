"""RedisStore: each decision is one EVALSHA of a ``lua/`` script, on Redis or on fakeredis.

The only module that imports ``redis``. Every foreign exception (redis-py's, OSError, a
timeout) becomes a ``gateway.errors.StoreError`` here, and every call, from waiting for a
connection to the reply (a reconnect and a script reload included), is bounded by
``store.timeout``.

Decisions skip redis-py's generic client path (its pool takes a lock, probes the socket and
records metrics on every command) and go through ``_Lane``: redis-py ``Connection`` objects
(URL parsing, AUTH/SELECT/TLS, the hiredis parser) reused LIFO, at most ``MAX_CONNECTIONS`` at
once, with the command framed once per plan (``resp.py``). Scripts are named by their SHA1,
computed locally; after NOSCRIPT (a restarted Redis, ``SCRIPT FLUSH``, a failover) the script is
loaded on that connection and the call sent once more.

Key layout: buckets are ``{key_prefix}:v1:rl:{TAG}:{policy}``, idempotency records
``{key_prefix}:v1:idem:{RECORD}``. ``v1`` is the data version (bump it when a script reads or
writes fields differently); ``{TAG}`` is a Redis Cluster hash tag, the hashed key value, so all
buckets of one client share a slot; ``{RECORD}`` (a hash of identity and key) spreads records
over the slots.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.errors import StoreScriptError, StoreTimeout, StoreUnavailable
from gateway.store.base import BucketState, Claim, LeaseTerms, RateDecision, StoredResponse, TakePlan
from gateway.store.resp import ScriptCall, bulk, command
from gateway.store.scripts import read_script

if TYPE_CHECKING:
    from prometheus_client import Histogram

    from gateway.metrics import Metrics

__all__ = ["DATA_VERSION", "MAX_CONNECTIONS", "RedisStore", "connection_options"]

DATA_VERSION = "v1"
#: Connections a store uses at once; past it a call waits (within its timeout) for one.
MAX_CONNECTIONS = 64
_NO_OFFSET = bulk(b"0")
_PING = command("PING")
_BUCKET_KEY = b"%b{%b}:%b"  # prefix, {tag} (the cluster hash tag), policy name
_RECORD_KEY = b"%b{%b}"  # prefix, {record} (the cluster hash tag)


_NEW = Claim("new")
_MISMATCH = Claim("mismatch")
_UNKNOWN = Claim("unknown")


def connection_options(timeout_s: float) -> dict[str, Any]:
    """redis-py connection settings: connecting is bounded by the store timeout; reads carry
    no timeout of their own (the call's single bound covers them); no retries inside
    redis-py (``_Lane`` decides what is safe to retry)."""
    return {
        "socket_timeout": None,
        "socket_connect_timeout": timeout_s,
        "retry": Retry(NoBackoff(), retries=0),
        "max_connections": MAX_CONNECTIONS,
    }


class _Lane:
    """Up to ``size`` connections, each carrying one command/reply at a time, reused LIFO."""

    __slots__ = ("_idle", "_live", "_make", "_slots")

    def __init__(self, make: Callable[[], AbstractConnection], size: int) -> None:
        self._make = make
        self._idle: list[AbstractConnection] = []
        self._live: set[AbstractConnection] = set()
        self._slots = asyncio.Semaphore(size)

    async def call(self, packed: bytes) -> Any:
        """Send one framed command and return its reply (an error reply is raised)."""
        await self._slots.acquire()
        try:
            if not self._idle:
                return await self._exchange(self._open(), packed)
            try:
                return await self._exchange(self._idle.pop(), packed)
            except (RedisConnectionError, OSError):
                # a reused connection was dead (Redis restarted or closed it while idle): the
                # other idle ones died with it; once more on a new connection
                await self._drop_idle()
            return await self._exchange(self._open(), packed)
        finally:
            self._slots.release()

    async def _exchange(self, conn: AbstractConnection, packed: bytes) -> Any:
        try:
            await conn.send_packed_command(packed, check_health=False)
            reply = await conn.read_response()
        except ResponseError:
            self._idle.append(conn)  # an error reply leaves the connection in step
            raise
        except BaseException:
            # broken, timed out or cancelled mid-exchange: the connection is out of step
            await self._drop(conn)
            raise
        self._idle.append(conn)
        return reply

    def _open(self) -> AbstractConnection:
        conn = self._make()  # connects on first send
        self._live.add(conn)
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


class RedisStore:
    """A ``Store`` on a Redis server (or on fakeredis, for ``memory://``)."""

    def __init__(
        self, client: Redis, *, key_prefix: str, timeout_s: float, metrics: Metrics | None = None
    ) -> None:
        self._client = client
        # per operation, the latency histogram every call (errors and timeouts too) lands in
        self._latency: Mapping[str, Histogram] | None = metrics.store_latency if metrics else None
        self._timeout_s = timeout_s
        self._rl_prefix = f"{key_prefix}:{DATA_VERSION}:rl:".encode()
        self._idem_prefix = f"{key_prefix}:{DATA_VERSION}:idem:".encode()
        pool: ConnectionPool = client.connection_pool
        self._lane = _Lane(pool.make_connection, MAX_CONNECTIONS)
        self._take = ScriptCall("ratelimit_take", read_script("ratelimit_take"))
        self._claim = ScriptCall("idempotency_claim", read_script("idempotency_claim"))
        self._complete = ScriptCall("idempotency_complete", read_script("idempotency_complete"))
        self._release = ScriptCall("idempotency_release", read_script("idempotency_release"))
        self._renew = ScriptCall("idempotency_renew", read_script("idempotency_renew"))
        self._scripts = (self._take, self._claim, self._complete, self._release, self._renew)

    @classmethod
    def from_url(
        cls, url: str, *, key_prefix: str, timeout_s: float, metrics: Metrics | None = None
    ) -> RedisStore:
        pool = ConnectionPool.from_url(url, **connection_options(timeout_s))
        return cls(Redis.from_pool(pool), key_prefix=key_prefix, timeout_s=timeout_s, metrics=metrics)

    @property
    def client(self) -> Redis:
        """A plain redis-py client on the same server, for diagnostics and tests."""
        return self._client

    def key(self, tag: str, policy: str) -> str:
        """The store key of one policy's bucket for one tag."""
        return (_BUCKET_KEY % (self._rl_prefix, tag.encode(), policy.encode())).decode()

    def record_key(self, record: str) -> str:
        """The store key of one idempotency record."""
        return self._record_key(record).decode()

    def _record_key(self, record: str) -> bytes:
        return _RECORD_KEY % (self._idem_prefix, record.encode())

    async def open(self) -> None:
        for script in self._scripts:
            await self._bounded(script.load, None)

    async def close(self) -> None:
        await self._lane.close()
        await self._client.aclose()

    async def ping(self) -> None:
        await self._call(_PING)

    async def ratelimit_take(
        self, plan: TakePlan, tags: Sequence[str], *, clock_offset_ms: int = 0
    ) -> RateDecision:
        prefix = self._rl_prefix
        keys = [_BUCKET_KEY % (prefix, t.encode(), n) for t, n in zip(tags, plan.names, strict=True)]
        offset = bulk(b"%d" % clock_offset_ms) if clock_offset_ms else _NO_OFFSET
        packed = self._take.evalsha(keys, offset + plan.argv_resp, 1 + len(plan.argv))
        raw: list[int] = await self._call(packed, self._take)
        buckets = []
        for i in range(2, len(raw), 3):
            buckets.append(BucketState(raw[i], raw[i + 1], raw[i + 2]))
        return RateDecision(raw[0] == 1, raw[1], tuple(buckets))

    async def idempotency_claim(
        self, record: str, fingerprint: bytes, owner: bytes, terms: LeaseTerms
    ) -> Claim:
        key = self._record_key(record)
        packed = self._claim.evalsha([key], bulk(fingerprint) + bulk(owner) + terms.claim_argv, 5)
        raw: list[Any] = await self._call(packed, self._claim)
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
        msg = f"idempotency_claim returned {outcome!r}"
        raise StoreScriptError(msg)

    async def idempotency_complete(
        self, record: str, owner: bytes, response: StoredResponse, terms: LeaseTerms
    ) -> bool:
        key = self._record_key(record)
        args = b"".join((bulk(owner), bulk(b"%d" % response.status), bulk(response.headers),
                         bulk(response.body), terms.ttl_argv))
        return bool(await self._call(self._complete.evalsha([key], args, 5), self._complete))

    async def idempotency_release(self, record: str, owner: bytes) -> bool:
        key = self._record_key(record)
        return bool(await self._call(self._release.evalsha([key], bulk(owner), 1), self._release))

    async def idempotency_renew(self, record: str, owner: bytes, terms: LeaseTerms) -> bool:
        key = self._record_key(record)
        packed = self._renew.evalsha([key], bulk(owner) + terms.renew_argv, 3)
        return bool(await self._call(packed, self._renew))

    async def _call(self, packed: bytes, script: ScriptCall | None = None) -> Any:
        """One command within the timeout, every failure translated; NOSCRIPT reloads once."""
        if self._latency is None:
            return await self._bounded(packed, script)
        start = time.perf_counter()
        try:
            return await self._bounded(packed, script)
        finally:
            self._latency[script.name if script else "ping"].observe(time.perf_counter() - start)

    async def _bounded(self, packed: bytes, script: ScriptCall | None) -> Any:
        try:
            async with asyncio.timeout(self._timeout_s):
                try:
                    return await self._lane.call(packed)
                except NoScriptError:
                    if script is None:
                        raise
                    await self._lane.call(script.load)
                    return await self._lane.call(packed)
        except (RedisTimeoutError, TimeoutError) as exc:
            msg = f"the store did not answer within {self._timeout_s:g}s"
            raise StoreTimeout(msg) from exc
        except ResponseError as exc:
            raise StoreScriptError(str(exc)) from exc
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc) or type(exc).__name__) from exc
