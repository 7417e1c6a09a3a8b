"""RedisStore: each decision is one EVALSHA of a ``lua/`` script on ``redis.asyncio``.

The only module that imports ``redis``. Every foreign exception (redis-py's, OSError, a
timeout) becomes a ``gateway.errors.StoreError`` here, and every call is bounded by
``store.timeout``. Scripts are registered once per store (the SHA1 is computed locally) and
called with EVALSHA; after NOSCRIPT (a restarted Redis, ``SCRIPT FLUSH``, a failover) redis-py
loads the script again and retries once.

Key layout, ``{key_prefix}:v1:rl:{TAG}:{policy}``: ``v1`` is the data version (bump it when a
script reads or writes fields differently); ``{TAG}`` is a Redis Cluster hash tag, the hashed
key value, so all buckets of one client share a slot.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.errors import StoreScriptError, StoreTimeout, StoreUnavailable
from gateway.store.base import BucketState, RateDecision, TakePlan
from gateway.store.scripts import read_script

__all__ = ["DATA_VERSION", "MAX_CONNECTIONS", "BoundedPool", "RedisStore", "pool_options"]

#: The pool class every store uses (memory.py hands it to fakeredis; only this module imports redis).
BoundedPool = BlockingConnectionPool

DATA_VERSION = "v1"
#: Connections per store. Past it a call waits (up to the timeout) for a free one: redis-py's
#: default asyncio pool raises MaxConnectionsError at 100 instead.
MAX_CONNECTIONS = 64
_T = TypeVar("_T")

# One immediate reconnect when a pooled connection turns out dead (a restarted Redis);
# asyncio.timeout below bounds the whole call, retries included.
_RETRY = Retry(NoBackoff(), retries=1, supported_errors=(RedisConnectionError,))


def pool_options(timeout_s: float) -> dict[str, object]:
    """Keyword arguments for a bounded, waiting pool: waiting for a free connection,
    connecting and reading are each bounded by ``timeout_s``."""
    return {
        "max_connections": MAX_CONNECTIONS,
        "timeout": timeout_s,
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": _RETRY,
    }


class RedisStore:
    """A ``Store`` on a Redis server (or on fakeredis, for ``memory://``)."""

    def __init__(self, client: Redis, *, key_prefix: str, timeout_s: float) -> None:
        self._client = client
        self._timeout_s = timeout_s
        self._rl_prefix = f"{key_prefix}:{DATA_VERSION}:rl:"
        self._take = client.register_script(read_script("ratelimit_take"))
        self._scripts = (self._take,)

    @classmethod
    def from_url(cls, url: str, *, key_prefix: str, timeout_s: float) -> RedisStore:
        """A store on its own bounded pool (see ``pool_options``)."""
        pool = BlockingConnectionPool.from_url(url, **pool_options(timeout_s))
        return cls(Redis.from_pool(pool), key_prefix=key_prefix, timeout_s=timeout_s)

    @property
    def client(self) -> Redis:
        """The underlying client, for diagnostics and tests; decisions go through the methods."""
        return self._client

    def key(self, tag: str, policy: str) -> str:
        """The store key of one policy's bucket for one tag."""
        return f"{self._rl_prefix}{{{tag}}}:{policy}"

    async def open(self) -> None:
        await self.ping()
        for script in self._scripts:
            await self._call(self._client.script_load(script.script))

    async def close(self) -> None:
        await self._client.aclose()

    async def ping(self) -> None:
        await self._call(self._client.ping())

    async def ratelimit_take(
        self, plan: TakePlan, tags: Sequence[str], *, clock_offset_ms: int = 0
    ) -> RateDecision:
        prefix = self._rl_prefix
        keys = [f"{prefix}{{{tag}}}:{spec.name}" for tag, spec in zip(tags, plan.specs, strict=True)]
        raw: list[int] = await self._call(self._take(keys, (clock_offset_ms, *plan.argv)))
        buckets = tuple(BucketState(*raw[i : i + 3]) for i in range(2, len(raw), 3))
        return RateDecision(raw[0] == 1, raw[1], buckets)

    async def _call(self, call: Awaitable[_T]) -> _T:
        """Await one store call within the timeout, translating every failure."""
        try:
            async with asyncio.timeout(self._timeout_s):
                return await call
        except (RedisTimeoutError, TimeoutError) as exc:
            msg = f"the store did not answer within {self._timeout_s:g}s"
            raise StoreTimeout(msg) from exc
        except ResponseError as exc:
            raise StoreScriptError(str(exc)) from exc
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc) or type(exc).__name__) from exc
