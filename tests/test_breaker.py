"""The circuit breaker: its state machine on a controlled clock, and the store's calls through it.

The fault tests (``test_faults.py``) show the same on a killed and a paused redis-server; here
each transition is pinned down exactly, and the guard's accounting is checked call by call.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.errors import StoreCircuitOpen, StoreScriptError, StoreTimeout, StoreUnavailable
from gateway.metrics import Metrics
from gateway.store import TakePlan
from gateway.store.breaker import BreakerState, CircuitBreaker
from gateway.store.guard import CallGuard, new_breaker
from gateway.store.redis import RedisStore
from tests.redis_process import HOST, free_port


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Clock) -> tuple[CircuitBreaker, list[BreakerState]]:
    """Opens after 3 failures, cools down for 2 s; records every state it moves to."""
    seen: list[BreakerState] = []
    return CircuitBreaker(failures=3, cooldown_s=2.0, on_change=seen.append, clock=clock), seen


def admitted(b: CircuitBreaker) -> int:
    """The ticket of a call the breaker lets through (failing when it refuses)."""
    ticket = b.admit()
    assert ticket is not None
    return ticket


def trip(b: CircuitBreaker) -> int:
    """Three admitted calls fail in a row: the breaker of ``breaker()`` opens. Returns the
    ticket those calls had."""
    tickets = [admitted(b) for _ in range(3)]
    for ticket in tickets:
        b.failed(ticket)
    assert b.state == "open"
    return tickets[0]


class TestStateMachine:
    def test_opens_after_consecutive_failures_only(self) -> None:
        """Failures open the circuit only when ``failures`` of them come in a row: a success in
        between starts the count again."""
        clock = Clock()
        b, seen = breaker(clock)
        for failed in (True, True, False, True, True):
            ticket = admitted(b)
            if failed:
                b.failed(ticket)
            else:
                b.succeeded(ticket)
        assert b.state == "closed"
        b.failed(admitted(b))
        assert (b.state, seen) == ("open", ["open"])
        assert b.admit() is None

    def test_open_refuses_until_the_cooldown_then_admits_one_probe(self) -> None:
        """While open every call is refused; after the cool-down exactly one call goes through
        (half-open) and the others are still refused while it is out."""
        clock = Clock()
        b, seen = breaker(clock)
        trip(b)
        clock.now += 1.999
        assert b.admit() is None
        assert b.retry_in_s() == pytest.approx(0.001)
        clock.now += 0.001
        probe = admitted(b)
        assert b.state == "half_open"
        assert [b.admit() for _ in range(5)] == [None] * 5
        b.succeeded(probe)
        assert (b.state, seen) == ("closed", ["open", "half_open", "closed"])
        assert all(b.admit() is not None for _ in range(5))

    def test_failed_probe_opens_for_another_cooldown(self) -> None:
        """A probe that fails opens the circuit again, for a whole new cool-down from then."""
        clock = Clock()
        b, seen = breaker(clock)
        trip(b)
        clock.now += 5
        b.failed(admitted(b))
        assert b.state == "open"
        assert b.retry_in_s() == pytest.approx(2.0)
        clock.now += 1.5
        assert b.admit() is None
        assert seen == ["open", "half_open", "open"]

    def test_a_cancelled_probe_frees_the_probe_slot(self) -> None:
        """A probe cancelled before its outcome (its client left) lets the next call probe,
        instead of leaving the circuit half-open and refusing forever."""
        clock = Clock()
        b, _ = breaker(clock)
        trip(b)
        clock.now += 2
        probe = admitted(b)
        assert b.admit() is None
        b.abandoned(probe)
        admitted(b)
        assert b.state == "half_open"

    def test_late_success_while_open_does_not_cut_the_cooldown(self) -> None:
        """A call admitted before the circuit opened that answers afterwards (a slow store)
        does not close it: the cool-down runs its course, then one probe decides."""
        clock = Clock()
        b, seen = breaker(clock)
        tickets = [admitted(b) for _ in range(4)]
        for ticket in tickets[:3]:
            b.failed(ticket)
        b.succeeded(tickets[3])  # the fourth call, sent while closed, answers late
        assert (b.state, seen) == ("open", ["open"])
        assert b.admit() is None
        clock.now += 2
        b.succeeded(admitted(b))
        assert seen == ["open", "half_open", "closed"]

    def test_late_success_while_half_open_does_not_close_it(self) -> None:
        """While the probe is out, a late answer to a call sent before the circuit opened does
        not close it (the store may still be down): only the probe's outcome decides."""
        clock = Clock()
        b, seen = breaker(clock)
        tickets = [admitted(b) for _ in range(4)]
        for ticket in tickets[:3]:
            b.failed(ticket)
        clock.now += 2
        probe = admitted(b)
        b.succeeded(tickets[3])
        assert b.state == "half_open"
        assert b.admit() is None
        b.failed(probe)
        assert seen == ["open", "half_open", "open"]

    def test_late_failure_while_open_does_not_extend_the_cooldown(self) -> None:
        """A call admitted before the circuit opened that fails afterwards changes nothing."""
        clock = Clock()
        b, _ = breaker(clock)
        before = trip(b)
        clock.now += 1.5
        b.failed(before)
        clock.now += 0.5
        admitted(b)


def closed_port_guard(clock: Clock, metrics: Metrics) -> CallGuard:
    b = CircuitBreaker(failures=2, cooldown_s=1.0, on_change=metrics.breaker_changed, clock=clock)
    return CallGuard(timeout_s=0.5, breaker=b, metrics=metrics)


def value(metrics: Metrics, name: str, **labels: str) -> float:
    got = metrics.registry.get_sample_value(name, labels)
    return 0.0 if got is None else got


class TestGuard:
    async def test_failures_open_then_calls_fail_fast_without_running(self) -> None:
        """After ``failures`` unavailable calls the guard refuses without awaiting the call, and
        counts each refusal as ``circuit_open``; the breaker's state shows in the gauge."""
        clock, metrics = Clock(), Metrics()
        guard = closed_port_guard(clock, metrics)
        ran = 0

        async def broken() -> None:
            nonlocal ran
            ran += 1
            raise ConnectionRefusedError("refused")

        for _ in range(2):
            with pytest.raises(StoreUnavailable):
                await guard.run("ping", broken)
        for _ in range(3):
            with pytest.raises(StoreCircuitOpen, match="circuit breaker open"):
                await guard.run("ping", broken)
        assert ran == 2
        assert value(metrics, "gateway_store_errors_total", operation="ping", kind="unavailable") == 2
        assert value(metrics, "gateway_store_errors_total", operation="ping", kind="circuit_open") == 3
        assert value(metrics, "gateway_store_breaker_state", state="open") == 1
        assert value(metrics, "gateway_store_breaker_state", state="closed") == 0
        assert value(metrics, "gateway_store_breaker_opened_total") == 1

    async def test_timeout_counts_as_failure_and_script_error_as_an_answer(self) -> None:
        """A call past the timeout is a ``StoreTimeout`` and a failure; an error reply is a
        ``StoreScriptError`` and closes the streak (the store answered)."""
        clock, metrics = Clock(), Metrics()
        guard = CallGuard(timeout_s=0.05, metrics=metrics,
                          breaker=CircuitBreaker(failures=2, cooldown_s=1.0, clock=clock))

        async def hangs() -> None:
            await asyncio.sleep(10)

        async def script_error() -> None:
            from redis.exceptions import ResponseError
            raise ResponseError("ERR bad script")

        start = time.monotonic()
        with pytest.raises(StoreTimeout):
            await guard.run("ratelimit_take", hangs)
        assert time.monotonic() - start < 1
        with pytest.raises(StoreScriptError, match="bad script"):
            await guard.run("ratelimit_take", script_error)
        with pytest.raises(StoreTimeout):
            await guard.run("ratelimit_take", hangs)
        assert guard.breaker.state == "closed"  # timeout, answer, timeout: never two in a row
        assert value(metrics, "gateway_store_errors_total", operation="ratelimit_take", kind="timeout") == 2
        assert value(metrics, "gateway_store_errors_total", operation="ratelimit_take", kind="script") == 1
        assert value(metrics, "gateway_store_latency_seconds_count", operation="ratelimit_take") == 3

    async def test_readonly_replica_is_unavailable_not_a_script_error(self) -> None:
        """A READONLY reply (the server became a replica in a failover) is a store failure that
        feeds the breaker, not a script bug."""
        from redis.exceptions import ReadOnlyError

        guard = CallGuard(timeout_s=1, metrics=None, breaker=CircuitBreaker(failures=1, cooldown_s=1))

        async def readonly() -> None:
            raise ReadOnlyError("You can't write against a read only replica.")

        with pytest.raises(StoreUnavailable) as caught:
            await guard.run("ratelimit_take", readonly)
        assert not isinstance(caught.value, StoreScriptError)
        assert guard.breaker.state == "open"

    async def test_cancelled_probe_is_abandoned(self) -> None:
        """A half-open probe cancelled from outside propagates the cancellation and lets the
        next call probe."""
        clock = Clock()
        b = CircuitBreaker(failures=1, cooldown_s=1.0, clock=clock)
        guard = CallGuard(timeout_s=5, metrics=None, breaker=b)
        b.failed(admitted(b))
        clock.now += 1
        task = asyncio.ensure_future(guard.run("ping", asyncio.sleep, 10))
        await asyncio.sleep(0.01)
        assert b.state == "half_open"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        admitted(b)


class TestRedisStoreBreaker:
    async def test_nothing_listening_costs_failures_calls_then_none(self) -> None:
        """On a port where nothing listens, the store makes ``breaker_failures`` real attempts;
        the next calls within the cool-down fail without a connection attempt (they come back
        in well under a millisecond each) and say so."""
        metrics = Metrics()
        store = RedisStore.from_url(f"redis://{HOST}:{free_port()}/0", key_prefix="t", timeout_s=0.5,
                                    metrics=metrics, breaker=new_breaker(3, 30.0, metrics))
        plan = TakePlan.of([])
        try:
            for _ in range(3):
                with pytest.raises(StoreUnavailable) as caught:
                    await store.ratelimit_take(plan, [])
                assert not isinstance(caught.value, StoreCircuitOpen)
            start = time.perf_counter()
            for _ in range(100):
                with pytest.raises(StoreCircuitOpen):
                    await store.ratelimit_take(plan, [])
            per_call = (time.perf_counter() - start) / 100
            assert store.breaker_state() == "open"
            with pytest.raises(StoreCircuitOpen):
                await store.ping()
        finally:
            await store.close()
        assert per_call < 0.001
        assert value(metrics, "gateway_store_errors_total", operation="ratelimit_take",
                     kind="unavailable") == 3
        assert value(metrics, "gateway_store_errors_total", operation="ratelimit_take",
                     kind="circuit_open") == 100

