"""Holding in-flight slots in the store for a request: renewed while it runs, given back once.

Shared by the concurrency limit (``concurrency.py``) and the fleet load shedder
(``shedding.py``): both take slots with ``concurrency_acquire`` and must give them back however
the request ends. ``SlotKeeper.run`` wraps the app's call: the slots are back before the last
body message of a whole response goes out (a client's next request never finds its finished
one still counted), before the server's 500 when the app raises, and in a task of their own
when the request is cancelled. A request that outlives a third of the shortest lease renews on
one timer per keeper (``gateway.renewals``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from gateway._asgi import ASGIApp, Message, Receive, Scope, Send
from gateway.errors import StoreError
from gateway.renewals import Renewals
from gateway.requestid import current_request_id
from gateway.store import SlotPlan, Store

if TYPE_CHECKING:
    from prometheus_client import Gauge

__all__ = ["RELEASE_ATTEMPTS", "SlotHolding", "SlotKeeper"]

_log = logging.getLogger("gateway.concurrency")
#: The most store calls one release makes (each bounded by ``store.timeout``); past them the
#: slots come back when their lease ends.
RELEASE_ATTEMPTS = 3
_RELEASE_BACKOFF_S = 0.05


class SlotHolding:
    """The slots one request holds, from the store's grant to their release."""

    __slots__ = ("_gauges", "_keeper", "_names", "_plan", "_renewing", "_tags", "count", "done", "owner",
                 "releasing", "stopped")

    def __init__(self, keeper: SlotKeeper, plan: SlotPlan, tags: list[str], owner: bytes, *, count: int,
                 gauges: Sequence[Gauge], names: Sequence[str]) -> None:
        self._keeper = keeper
        self._plan = plan
        self._tags = tags
        self.owner = owner
        self.count = count  # slots held (a shadow limit that would refuse holds none)
        self._gauges = gauges
        self._names = names
        self.stopped = False  # renewals stopped, gauges down: the release has begun
        self.done = False  # the release is over (given back, or given up to the lease)
        self._renewing: asyncio.Task[None] | None = None
        self.releasing: asyncio.Task[None] | None = None  # a release in a task of its own
        for gauge in gauges:
            gauge.inc()

    def renew_now(self) -> None:
        """Extend the slots' lease (``Renewals`` calls this when it is due)."""
        self._renewing = asyncio.get_running_loop().create_task(self._renew())

    async def _renew(self) -> None:
        keeper = self._keeper
        try:
            kept = await keeper.store.concurrency_renew(self._plan, self._tags, self.owner)
        except StoreError as exc:
            _log.warning("concurrency slots not renewed; trying again", extra={
                "event": "concurrency.renew_failed", "error": str(exc), "request_id": current_request_id()})
            kept = self.count  # not answered is not lost: the slots are ours until their lease ends
        self._renewing = None
        if kept < self.count:
            _log.warning("concurrency slot lost: its lease ended before it was renewed", extra={
                "event": "concurrency.slot_lost", "policies": list(self._names),
                "request_id": current_request_id()})
        if not self.stopped:
            keeper.renewals.add(self, asyncio.get_running_loop().time() + keeper.renew_interval_s)

    async def release(self) -> None:
        """Stop renewing and give the slots back; bounded by ``RELEASE_ATTEMPTS`` store calls.
        Running it again (a release cut off by a cancellation) only repeats the store call,
        which gives back nothing twice."""
        keeper = self._keeper
        if not self.stopped:
            self.stopped = True
            keeper.renewals.discard(self)
            if self._renewing is not None:
                self._renewing.cancel()
            for gauge in self._gauges:
                gauge.dec()
        try:
            await self._give_back()
        finally:
            self.done = True

    async def _give_back(self) -> None:
        keeper = self._keeper
        for attempt in range(1, RELEASE_ATTEMPTS + 1):
            try:
                await keeper.store.concurrency_release(self._plan, self._tags, self.owner)
            except StoreError as exc:
                last = attempt == RELEASE_ATTEMPTS
                _log.warning("concurrency slots not given back; %s", "they return when their lease ends"
                             if last else "retrying", extra={
                                 "event": "concurrency.release_failed", "attempt": attempt,
                                 "error": str(exc), "request_id": current_request_id()})
                if not last:
                    await asyncio.sleep(_RELEASE_BACKOFF_S * attempt)
            else:
                return


class SlotKeeper:
    """One layer's slots: the store, one renewal timer, and the releases still under way."""

    def __init__(self, store: Store, *, shortest_lease_ms: int) -> None:
        self.store = store
        self.renew_interval_s = shortest_lease_ms / 3000  # one interval for every holding: one timer
        self.renewals = Renewals()
        self._releasing: set[asyncio.Task[None]] = set()

    def hold(self, plan: SlotPlan, tags: list[str], owner: bytes, *, count: int,
             gauges: Sequence[Gauge] = (), names: Sequence[str] = ()) -> SlotHolding:
        """The slots the store granted, renewed from now on until they are given back."""
        holding = SlotHolding(self, plan, tags, owner, count=count, gauges=gauges, names=names)
        self.renewals.add(holding, asyncio.get_running_loop().time() + self.renew_interval_s)
        return holding

    async def run(
        self, app: ASGIApp, scope: Scope, receive: Receive, send: Send, holding: SlotHolding
    ) -> None:
        """Call ``app`` with ``holding``'s slots, and give them back however it ends."""

        async def send_then_release(message: Message) -> None:
            # the slots are back before the client has the whole response
            if message["type"] == "http.response.body" and not message.get("more_body", False) \
                    and not holding.stopped:
                try:
                    await holding.release()  # inline: no task for the common ending
                except asyncio.CancelledError:
                    self.give_back(holding)  # cut off: finished in a task of its own
                    raise
            await send(message)

        try:
            await app(scope, receive, send_then_release)
        except asyncio.CancelledError:
            if not holding.done:
                self.give_back(holding)  # goes on in its own task
            raise
        except BaseException:
            # before the server answers 500: a retry must not find this request's slot held
            if not holding.done:
                await asyncio.shield(self.give_back(holding))
            raise
        if not holding.done:  # no whole response: the client went away
            await asyncio.shield(self.give_back(holding))

    def give_back(self, holding: SlotHolding) -> asyncio.Task[None]:
        """The release, started once, in a task of its own: a cancelled request still gives
        its slots back."""
        task = holding.releasing
        if task is None:
            task = holding.releasing = asyncio.get_running_loop().create_task(holding.release())
            self._track(task)
        return task

    def release_unheard(self, plan: SlotPlan, tags: list[str], owner: bytes) -> None:
        """An acquire that failed may still have run (its reply was lost): give back whatever
        it took, once, in the background (giving back a slot never taken changes nothing)."""

        async def release() -> None:
            with contextlib.suppress(StoreError):  # then the lease ends it
                await self.store.concurrency_release(plan, tags, owner)

        self._track(asyncio.get_running_loop().create_task(release()))

    def _track(self, task: asyncio.Task[None]) -> None:
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    @property
    def releasing(self) -> bool:
        """Whether a release is still under way."""
        return bool(self._releasing)

    async def drain(self, within_s: float = 10.0) -> None:
        """Wait (at most ``within_s``) for the releases still under way: at shutdown, before
        the store closes."""
        if self._releasing:
            await asyncio.wait(set(self._releasing), timeout=within_s)
