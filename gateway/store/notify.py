"""Notices of completed or released idempotency records, over Redis pub/sub (one Redis, Sentinel,
and ``memory://``'s fakeredis alike), for duplicates waiting for a first answer
(``idempotency.on_in_flight = "wait"``).

``lua/idempotency_complete.lua`` and ``lua/idempotency_release.lua`` PUBLISH on the channel named
like the record's key when the holder asks them to. A process subscribes to a record's channel
while at least one of its requests waits on that record: one subscription per record per
process however many duplicates wait (each waiter holds an ``_Channel`` reference, not a copy),
one connection for all of them, one reader task. A waiter is only woken: it then reads the
record itself (one claim call), so a notice carries nothing and a lost one costs only time.

Nothing here may fail a request: a subscription that cannot be made or confirmed within the
store timeout yields None (the waiter polls), and a broken connection wakes every waiter
(``broken``) and is replaced on the next watch. Pub/sub delivers a notice only to subscriptions
the server already had, so a watch is entered only once the server confirmed it; the waiter
reads the record after that, never before.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import AsyncIterator
from typing import Any

__all__ = ["RecordNotices"]

_log = logging.getLogger("gateway.store")
_READ_TIMEOUT_S = 1.0  # how long one read waits for a message before looking again


class _Channel:
    """One record's subscription in this process, shared by the requests waiting on it."""

    __slots__ = ("_event", "broken", "confirmed", "generation", "users")

    def __init__(self) -> None:
        self.users = 0
        self.generation = 0
        self.broken = False
        self.confirmed = asyncio.Event()
        self._event = asyncio.Event()

    def notify(self) -> None:
        self.generation += 1
        self._event.set()
        self._event = asyncio.Event()  # the next wait waits for the next notice

    def fail(self) -> None:
        self.broken = True
        self.confirmed.set()
        self.notify()

    async def changed(self, seen: int, timeout_s: float) -> bool:
        if self.generation != seen or self.broken:
            return not self.broken
        event = self._event
        try:
            async with asyncio.timeout(timeout_s):
                await event.wait()
        except TimeoutError:
            return False
        return not self.broken


class RecordNotices:
    """The subscriptions of one store: ``watch(channel)`` while a request waits on a record.

    Args:
        client: the store's redis-py (or fakeredis) asyncio client; its ``pubsub()`` makes the
            one connection this uses.
        timeout_s: ``store.timeout``: the bound on subscribing (until the server confirms).
    """

    def __init__(self, client: Any, timeout_s: float) -> None:
        self._client = client
        self._timeout_s = timeout_s
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._channels: dict[bytes, _Channel] = {}
        self._closing: set[asyncio.Task[None]] = set()

    @contextlib.asynccontextmanager
    async def watch(self, channel: bytes) -> AsyncIterator[_Channel | None]:
        """A subscription to ``channel`` confirmed by the server, or None when it could not be
        made in time (the caller then polls)."""
        entry = self._channels.get(channel)
        if entry is None or entry.broken:
            entry = self._channels[channel] = _Channel()
            try:
                await self._subscribe(channel)
            except Exception as exc:
                self._failed(exc)
        entry.users += 1
        try:
            try:
                async with asyncio.timeout(self._timeout_s):
                    await entry.confirmed.wait()
            except TimeoutError:
                yield None
                return
            yield None if entry.broken else entry
        finally:
            entry.users -= 1
            if entry.users == 0 and self._channels.get(channel) is entry:
                del self._channels[channel]
                if not entry.broken:
                    await self._unsubscribe(channel)

    async def _subscribe(self, channel: bytes) -> None:
        if self._pubsub is None:
            self._pubsub = self._client.pubsub()
        async with asyncio.timeout(self._timeout_s):
            await self._pubsub.subscribe(channel)
        if self._reader is None or self._reader.done():
            # in a context of its own: it outlives the request that started it
            self._reader = asyncio.get_running_loop().create_task(
                self._read(self._pubsub), context=contextvars.Context())

    async def _unsubscribe(self, channel: bytes) -> None:
        pubsub = self._pubsub
        if pubsub is None:
            return
        try:
            async with asyncio.timeout(self._timeout_s):
                await pubsub.unsubscribe(channel)
        except Exception as exc:
            self._failed(exc)

    async def _read(self, pubsub: Any) -> None:
        """Dispatch the server's messages until the connection fails or is closed."""
        try:
            while pubsub is self._pubsub:  # runs while the store is open; ends when the connection fails
                message = await pubsub.get_message(timeout=_READ_TIMEOUT_S)
                if message is None:
                    continue  # idle: the connection stays open for the next watch
                entry = self._channels.get(bytes(message["channel"]))
                if entry is None:
                    continue
                if message["type"] == "subscribe":
                    entry.confirmed.set()
                elif message["type"] == "message":
                    entry.notify()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if pubsub is self._pubsub:
                self._failed(exc)

    def _failed(self, exc: BaseException) -> None:
        """The subscription connection is unusable: wake every waiter (they poll from now on)
        and drop it; the next watch opens a new one."""
        _log.warning("idempotency notices unavailable; waiting requests poll", extra={
            "event": "idempotency.notices_failed", "error": f"{type(exc).__name__}: {exc}"})
        for entry in self._channels.values():
            entry.fail()
        self._channels.clear()
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            task = asyncio.get_running_loop().create_task(_close_quietly(pubsub))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """At the store's close: stop reading, close the connection."""
        reader, self._reader = self._reader, None
        for entry in self._channels.values():
            entry.fail()
        self._channels.clear()
        pubsub, self._pubsub = self._pubsub, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
        if pubsub is not None:
            await _close_quietly(pubsub)


async def _close_quietly(pubsub: Any) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(1.0):
            await pubsub.aclose()
