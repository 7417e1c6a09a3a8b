"""One timer for every lease a middleware holds: idempotency claims, concurrency slots.

A holder that runs long renews its lease every third of it; one that dies stops renewing and
loses it a lease later. ``Renewals`` keeps when each live lease is next due behind a single
timer, so a request shorter than a third of its lease costs no timer of its own, only a dict
entry added and removed.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

__all__ = ["Renewable", "Renewals"]


class Renewable(Protocol):
    """A lease holder: ``renew_now`` starts its renewal (and adds it back once renewed)."""

    def renew_now(self) -> None: ...


class Renewals:
    """When each live lease is next due for renewal, behind one timer.

    Leases share one interval and are added in time order, so they fall due in the order they
    were added: the timer waits for the oldest only, and a lease settled before it is due costs
    a dict entry, not a timer."""

    __slots__ = ("_due", "_timer")

    def __init__(self) -> None:
        self._due: dict[Renewable, float] = {}  # insertion order is due order
        self._timer: asyncio.TimerHandle | None = None

    def add(self, lease: Renewable, due_at: float) -> None:
        self._due[lease] = due_at
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_at(due_at, self._fire)

    def discard(self, lease: Renewable) -> None:
        self._due.pop(lease, None)

    def _fire(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        due = self._due
        while due:  # bounded: each turn removes a lease, or returns
            lease, at = next(iter(due.items()))
            if at > now:
                self._timer = loop.call_at(at, self._fire)
                return
            del due[lease]
            lease.renew_now()
