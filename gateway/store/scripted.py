"""ScriptStoreBase: what every Redis-backed store shares, on one Redis and on a cluster alike.

Key names (``layout.py``), the ``CallGuard`` every call passes (``guard.py``), and the
``lua/`` scripts behind the ``Store`` protocol, each read and hashed once per store.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from gateway.store.breaker import BreakerState, CircuitBreaker
from gateway.store.guard import CallGuard, new_breaker
from gateway.store.layout import KeyLayout
from gateway.store.resp import ScriptCall
from gateway.store.scripts import read_script

if TYPE_CHECKING:
    from gateway.metrics import Metrics
    from gateway.store.base import RecordWatch

__all__ = ["ScriptStoreBase", "script_call"]


@contextlib.asynccontextmanager
async def _no_watch() -> AsyncIterator[RecordWatch | None]:
    yield None


def script_call(name: str) -> ScriptCall:
    """The ``lua/`` script ``name``, ready to call."""
    return ScriptCall(name, read_script(name))


class ScriptStoreBase:
    """What the Redis and Redis Cluster stores share: key names, the guard on every call, and
    the scripts of the ``Store`` protocol (``ScriptCall``: source, SHA1, framed EVALSHA heads).

    Args:
        key_prefix: ``store.key_prefix``.
        timeout_s: ``store.timeout``, the bound on one call.
        metrics: where call latency, errors and the breaker state are shown.
        breaker: the circuit breaker (a new one, 5 failures / 1 s, when None).
    """

    def __init__(
        self, *, key_prefix: str, timeout_s: float, metrics: Metrics | None, breaker: CircuitBreaker | None
    ) -> None:
        self._keys = KeyLayout(key_prefix)
        self._timeout_s = timeout_s
        self._guard = CallGuard(timeout_s=timeout_s, metrics=metrics,
                                breaker=breaker or new_breaker(5, 1.0, metrics))
        self._take = script_call("ratelimit_take")
        self._claim = script_call("idempotency_claim")
        self._complete = script_call("idempotency_complete")
        self._release = script_call("idempotency_release")
        self._renew = script_call("idempotency_renew")
        self._take_claim = script_call("ratelimit_take_claim")
        self._acquire = script_call("concurrency_acquire")
        self._give_back = script_call("concurrency_release")
        self._slot_renew = script_call("concurrency_renew")
        self._take_acquire = script_call("ratelimit_take_acquire")

    def key(self, tag: str, policy: str) -> str:
        """The store key of one policy's bucket for one tag."""
        return self._keys.buckets([tag], [policy.encode()])[0].decode()

    def record_key(self, record: str) -> str:
        """The store key of one idempotency record."""
        return self._keys.record(record).decode()

    def idempotency_watch(self, record: str) -> contextlib.AbstractAsyncContextManager[RecordWatch | None]:
        """No notices by default (a Redis Cluster: a PUBLISH would go to every node): waiters
        poll. ``RedisStore`` overrides it with pub/sub."""
        return _no_watch()

    def breaker_state(self) -> BreakerState:
        return self._guard.breaker.state
