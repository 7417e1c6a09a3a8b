"""CircuitBreaker: an outage costs one store timeout per cool-down, not one per request.

    closed ──(``failures`` consecutive failed calls)──▶ open
    open ──(``cooldown`` elapsed; the next call goes through as the probe)──▶ half_open
    half_open ──(the probe answers)──▶ closed        half_open ──(the probe fails)──▶ open

While open, and while a half-open probe is in flight, calls are refused at once without touching
the network (``StoreCircuitOpen``), so the policies' ``on_store_error`` answers come back in
microseconds instead of after ``store.timeout``. Any answer from the store counts as success
(an error reply is still an answer); only timeouts and refused or broken connections count as
failures. Only outcomes of calls admitted since the circuit last opened count (each call
carries a ticket, the era that admitted it): a late answer to a call sent before it opened
neither cuts the cool-down nor closes it while the probe is out, and a slow store that still
answers some calls cannot make it flap. A probe that is
cancelled (its client left) frees the probe slot for the next call.

One breaker per store per process: workers and machines each learn on their own. It runs on one
event loop and needs no lock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Literal

__all__ = ["BREAKER_STATES", "BreakerState", "CircuitBreaker"]

BreakerState = Literal["closed", "open", "half_open"]
BREAKER_STATES: tuple[BreakerState, ...] = ("closed", "open", "half_open")

_log = logging.getLogger("gateway.store")


class CircuitBreaker:
    """Decides whether a store call may go out, from the outcomes of the calls before it.

    Args:
        failures: consecutive failed calls that open the circuit.
        cooldown_s: how long an open circuit refuses calls before one probe goes through.
        on_change: called with the new state on every transition (metrics hook it).
        clock: monotonic seconds; tests pass their own.
    """

    __slots__ = ("_clock", "_cooldown_s", "_failures", "_generation", "_on_change", "_opened_at",
                 "_probing", "_streak", "state")

    def __init__(
        self,
        *,
        failures: int,
        cooldown_s: float,
        on_change: Callable[[BreakerState], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._failures = failures
        self._cooldown_s = cooldown_s
        self._on_change = on_change
        self._clock = clock
        self.state: BreakerState = "closed"
        self._streak = 0  # consecutive failures while closed
        self._opened_at = 0.0
        self._probing = False  # half-open: the one probe is out
        # bumped each time the circuit opens: a call's ticket says which era admitted it
        self._generation = 1

    def admit(self) -> int | None:
        """A ticket (pass it back with the call's outcome) when a call may go to the store
        now; None to fail it fast.

        The first call after the cool-down is admitted as the half-open probe."""
        if self.state == "closed":
            return self._generation
        if self.state == "open":
            if self._clock() - self._opened_at < self._cooldown_s:
                return None
            self._move("half_open")
        if self._probing:
            return None
        self._probing = True
        return self._generation

    def retry_in_s(self) -> float:
        """Seconds until an open circuit lets its probe through (0 when it would now)."""
        if self.state != "open":
            return 0.0
        return max(0.0, self._opened_at + self._cooldown_s - self._clock())

    def succeeded(self, ticket: int) -> None:
        """The store answered the call ``ticket`` admitted."""
        if ticket != self._generation:
            return  # a late answer to a call sent before the circuit opened
        self._streak = 0
        self._probing = False
        if self.state == "half_open":
            self._move("closed")
            _log.info("store answering again; circuit breaker closed",
                      extra={"event": "store.breaker_closed"})

    def failed(self, ticket: int) -> None:
        """The call ``ticket`` admitted timed out or could not reach the store."""
        if ticket != self._generation:
            return  # a late failure of a call sent before the circuit opened
        if self.state == "half_open":
            self._open()  # still down: quietly, the outage was logged when it began
        elif self.state == "closed":
            self._streak += 1
            if self._streak >= self._failures:
                self._open()
                _log.warning(
                    "store failing; circuit breaker open, calls fail fast for %gs", self._cooldown_s,
                    extra={"event": "store.breaker_opened", "failures": self._failures,
                           "cooldown_s": self._cooldown_s},
                )

    def abandoned(self, ticket: int) -> None:
        """The call ``ticket`` admitted was cancelled before it had an outcome: if it was the
        probe, the next call probes instead."""
        if ticket == self._generation and self.state == "half_open":
            self._probing = False

    def _open(self) -> None:
        self._streak = 0
        self._probing = False
        self._generation += 1
        self._opened_at = self._clock()
        self._move("open")

    def _move(self, state: BreakerState) -> None:
        self.state = state
        if self._on_change is not None:
            self._on_change(state)
