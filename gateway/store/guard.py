"""CallGuard: the one gate every store call passes, on a single Redis and on a cluster alike.

In order: the circuit breaker may refuse the call outright (``StoreCircuitOpen``, no network);
otherwise the call runs under one deadline, ``store.timeout``, that covers waiting for a
connection, connecting, redirects and the reply; every foreign exception becomes a
``gateway.errors.StoreError`` here and nowhere else; the outcome feeds the breaker, and the
latency and any error are counted per operation.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from redis.exceptions import (
    ClusterDownError,
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.errors import (
    StoreCircuitOpen,
    StoreError,
    StoreScriptError,
    StoreTimeout,
    StoreUnanswered,
    StoreUnavailable,
)
from gateway.store.breaker import CircuitBreaker
from gateway.store.pipeline import ReplyLost

if TYPE_CHECKING:
    from prometheus_client import Counter

    from gateway.metrics import Metrics
    from gateway.tallies import HistogramTally

__all__ = ["CallGuard", "new_breaker", "store_error"]

# error replies that mean "this store cannot decide now", not "the script is wrong": a replica
# that was a master (READONLY), a cluster mid-failover, a store out of memory under noeviction
_UNAVAILABLE_REPLIES = (ReadOnlyError, ClusterDownError, MasterDownError, TryAgainError, OutOfMemoryError)


def store_error(exc: BaseException, timeout_s: float) -> StoreError | None:
    """The ``StoreError`` a foreign exception means; None for one that is not a store failure
    (a cancellation, a bug), which then propagates unchanged."""
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, RedisTimeoutError | TimeoutError):
        return StoreTimeout(f"the store did not answer within {timeout_s:g}s")
    if isinstance(exc, ReplyLost):
        return StoreUnanswered(str(exc))
    if isinstance(exc, _UNAVAILABLE_REPLIES):
        return StoreUnavailable(str(exc))
    if isinstance(exc, ResponseError):
        return StoreScriptError(str(exc))
    if isinstance(exc, RedisError | OSError | RedisClusterException):
        return StoreUnavailable(str(exc) or type(exc).__name__)
    return None


def _kind(error: StoreError) -> str:
    if isinstance(error, StoreTimeout):
        return "timeout"
    if isinstance(error, StoreUnavailable):
        return "unavailable"
    return "script"


class CallGuard:
    """Breaker, deadline, error translation and accounting around store calls.

    Args:
        timeout_s: ``store.timeout``, the bound on one call from start to reply.
        breaker: the store's circuit breaker.
        metrics: where latency and errors are counted; nothing is counted when None.
    """

    __slots__ = ("_errors", "_latency", "_timeout_s", "breaker")

    def __init__(self, *, timeout_s: float, breaker: CircuitBreaker, metrics: Metrics | None) -> None:
        self._timeout_s = timeout_s
        self.breaker = breaker
        self._latency: Mapping[str, HistogramTally] | None = metrics.store_latency if metrics else None
        self._errors: Mapping[tuple[str, str], Counter] | None = metrics.store_error if metrics else None

    async def run(
        self, operation: str, call: Callable[..., Awaitable[Any]], *args: Any, bounded: bool = False,
        parse: Callable[[Any], Any] | None = None,
    ) -> Any:
        """``call(*args)`` (one store operation), awaited within the timeout: its result, through
        ``parse`` when given; or ``StoreError``. ``call`` is made only once the breaker admits
        it (an open breaker sends nothing).

        ``operation`` names it in the metrics; one they do not list (``"open"``) is not counted.
        ``bounded``: the call keeps to the timeout itself (the pipeline does, more cheaply),
        so no timeout context is put around it here."""
        breaker = self.breaker
        ticket = breaker.admit()
        if ticket is None:
            self._count_error(operation, "circuit_open")
            wait = breaker.retry_in_s()
            msg = f"the store is failing; calls fail fast (circuit breaker open, next try in {wait:.2g}s)"
            raise StoreCircuitOpen(msg)
        start = time.perf_counter()
        try:
            if bounded:
                result = await call(*args)
            else:
                async with asyncio.timeout(self._timeout_s):
                    result = await call(*args)
        except BaseException as exc:
            error = store_error(exc, self._timeout_s)
            if error is None:
                breaker.abandoned(ticket)  # cancelled (or a bug): no verdict on the store
                raise
            if isinstance(error, StoreUnavailable):
                breaker.failed(ticket)
            else:
                breaker.succeeded(ticket)  # an error reply is still an answer
            self._count_error(operation, _kind(error))
            if error is exc:
                raise
            raise error from exc
        finally:
            latency = self._latency.get(operation) if self._latency is not None else None
            if latency is not None:
                latency.observe(time.perf_counter() - start)
        breaker.succeeded(ticket)
        return result if parse is None else parse(result)

    def _count_error(self, operation: str, kind: str) -> None:
        counter = self._errors.get((operation, kind)) if self._errors is not None else None
        if counter is not None:
            counter.inc()


def new_breaker(failures: int, cooldown_s: float, metrics: Metrics | None) -> CircuitBreaker:
    """A store's circuit breaker, its state shown in ``metrics`` when given."""
    return CircuitBreaker(failures=failures, cooldown_s=cooldown_s,
                          on_change=metrics.breaker_changed if metrics else None)

