"""Auto-pipelining: every command sent in one event-loop turn leaves in one write on one
connection, and the replies, read as they come, are handed to their callers in order.

Why: an awaited round trip of its own costs a Python server more CPU per request than the
decision it carries (a write, a read, and the wake-ups between them). Concurrent requests
share those here, while each still gets its own reply or its own error: Redis answers the
commands of one connection in the order they were sent, so the n-th reply is the n-th
caller's, and an error reply (a script error) fails that caller alone. A call sent with its
script's ``SCRIPT LOAD`` that is answered NOSCRIPT (a restarted Redis, ``SCRIPT FLUSH``, a
failover) is sent once more, after that load, on the same connection, from the reader itself:
the caller just gets the second reply, still within its write's bound.

Each call is bounded by ``store.timeout`` here, with one timer per write rather than a timeout
context per call. A broken connection fails every caller still waiting on it (nothing is
resent: any of those commands may have run) and the next call opens a new one; so does a call
that finds its idle connection closed by the server, before the reader has seen that. A connection
that stays silent for a whole timeout while commands wait on it is given up the same way, so a
black-holed Redis never holds the callers behind the first past their own bound. ``READONLY``
(the server was demoted) gives the connection up too: a new one finds the master (through
Sentinel, when configured).
"""

from __future__ import annotations

import asyncio
import select
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any
from weakref import ref

import hiredis
from redis._parsers.base import BaseParser
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ReadOnlyError

__all__ = ["Joint", "Pipeline", "ReplyLost"]

_READ_SIZE = 1 << 16
# a write's timer this late means the loop itself was stalled; the reader gets this long first
_LATE_S = 0.010
_GRACE_S = 0.005


class ReplyLost(RedisConnectionError):
    """The connection broke after this command was written: it may have run."""


class _Connection:
    """One connected Redis connection and the callers waiting on it, oldest first.

    Each turn's write arms one timer: the callers of that write still waiting ``timeout_s``
    later get ``TimeoutError`` (one timer per write, not per call, keeps the bound cheap)."""

    __slots__ = ("_batch", "_conn", "_loads", "_loop", "_out", "_poll", "_reader_task", "_timeout_s",
                 "_waiting", "_writer", "answered", "broken")

    def __init__(self, conn: AbstractConnection, timeout_s: float) -> None:
        self._conn = conn
        self._timeout_s = timeout_s
        self._loop = asyncio.get_running_loop()
        # redis-py made the connection (URL, AUTH, SELECT, TLS, Sentinel); its streams carry it
        self._writer: asyncio.StreamWriter = conn._writer  # type: ignore[assignment]
        reader: asyncio.StreamReader = conn._reader  # type: ignore[assignment]
        # per command written, oldest first: its caller (None: a reply nobody waits for) and,
        # for a script call, the SCRIPT LOAD and the command to send again after NOSCRIPT
        self._waiting: deque[asyncio.Future[Any] | None] = deque()
        self._loads: deque[tuple[bytes, bytes] | None] = deque()
        self._out: list[bytes] = []  # this turn's commands, not written yet
        self._batch: list[asyncio.Future[Any]] = []  # and their callers
        self.answered = 0  # replies read so far
        self.broken: BaseException | None = None
        self._poll = _poller(self._writer.transport)
        self._reader_task = self._loop.create_task(self._read(reader))

    def closed_while_idle(self) -> bool:
        """True (and the connection given up) when nothing is in flight on it and its socket is
        readable: with no reply owed, that can only be the server's close (or an error before
        it), which the reader has not seen yet because the loop has not polled since.

        Why: a command written to it would fail as ``ReplyLost`` (its caller told "it may have
        run") although the server had closed before it could read it; a Sentinel switchover
        (the old master's clients killed), a Redis restart or an idle timeout then cost the next
        request an error. Checked here, before anything is written, that caller goes to a new
        connection instead. One ``poll(0)``, and only when the connection is idle; without
        ``select.poll`` (Windows) the reader alone notices the close."""
        if self._waiting or self._poll is None or not self._poll.poll(0):
            return False
        self.fail(RedisConnectionError("the store closed the connection while it was idle"))
        return True

    def send(self, packed: bytes, load: bytes | None = None) -> asyncio.Future[Any]:
        """Queue one framed command for this turn's write; the future gets its reply. With
        ``load`` (its script's ``SCRIPT LOAD``), a NOSCRIPT reply sends both once more."""
        if self.broken is not None:
            raise RedisConnectionError(str(self.broken))
        future = self._loop.create_future()
        self._queue(packed, future, (load, packed) if load is not None else None)
        return future

    def send_part(self, packed: bytes, part: _Part) -> None:
        """Queue one framed command whose reply (or error) goes to ``part`` of a ``Joint``."""
        self._queue(packed, part, None)  # type: ignore[arg-type]  # a part settles like a future

    def _queue(self, packed: bytes, future: asyncio.Future[Any] | None,
               load: tuple[bytes, bytes] | None) -> None:
        if not self._out:
            self._loop.call_soon(self._flush)
        self._out.append(packed)
        if future is not None:
            self._batch.append(future)
        self._waiting.append(future)
        self._loads.append(load)

    def _flush(self) -> None:
        out, self._out = self._out, []
        batch, self._batch = self._batch, []
        if self.broken is not None or not out:
            return
        try:
            self._writer.write(out[0] if len(out) == 1 else b"".join(out))
        except Exception as exc:  # the transport is gone
            self.fail(exc)
            return
        due = self._loop.time() + self._timeout_s
        # weakly: a caller still waiting keeps its future alive (this connection's deque and its
        # task hold it); one answered long ago must not stay reachable from the timer, with its
        # reply, for a whole timeout, or at 1 s and 10k calls a second the young generations
        # fill with them and each collection takes tens of milliseconds (RESULTS.md, run 9)
        self._loop.call_at(due, self._expire, [ref(f) for f in batch], self.answered, due)

    def _expire(self, batch: list[ref[asyncio.Future[Any]]], answered_then: int, due: float | None) -> None:
        """A write's timeout is up: its callers still waiting get ``TimeoutError``. When not a
        single reply came in all that time, the connection is dead or black-holed: give it up,
        so the callers behind them do not each wait out their own timeout.

        A timer that fires ``_LATE_S`` past its time found a loop that was not running (the
        process descheduled on a busy machine, a callback that blocked): the replies may be in
        the socket, unread, since due timers run before the reader gets its turn. The verdict
        then waits ``_GRACE_S`` more, once, so the reader takes them first."""
        late = [f for r in batch if (f := r()) is not None and not f.done()]
        if not late:
            return
        if due is not None and self._loop.time() - due > _LATE_S:
            self._loop.call_later(_GRACE_S, self._expire, batch, answered_then, None)
            return
        error = f"the store did not answer within {self._timeout_s:g}s"
        for future in late:
            future.set_exception(TimeoutError(error))
        if self.answered == answered_then:
            self.fail(RedisConnectionError("the store did not answer on this connection"))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        parser = hiredis.Reader()
        waiting, loads = self._waiting, self._loads
        try:
            while data := await reader.read(_READ_SIZE):
                parser.feed(data)
                reply = parser.gets()
                while reply is not False:
                    self.answered += 1
                    future = waiting.popleft()  # a reply nobody waits for: out of step, IndexError
                    load = loads.popleft()
                    if future is None:  # a SCRIPT LOAD sent after NOSCRIPT: the resend tells
                        reply = parser.gets()
                        continue
                    if isinstance(reply, hiredis.ReplyError):
                        error: Exception = BaseParser.parse_error(str(reply))  # type: ignore[no-untyped-call]
                        if load is not None and isinstance(error, NoScriptError) and not future.done():
                            # the script is gone from this server: load it, then the call once
                            # more (without a load of its own: a second NOSCRIPT is its answer)
                            self._queue(load[0], None, None)
                            self._queue(load[1], future, None)
                            reply = parser.gets()
                            continue
                        if not future.done():
                            future.set_exception(error)
                        if isinstance(error, ReadOnlyError):
                            # a demoted master: its other callers get READONLY too; a new
                            # connection finds the master
                            self.fail(error)
                            return
                    elif not future.done():  # done = its caller gave up (timed out, cancelled)
                        future.set_result(reply)
                    reply = parser.gets()
            self.fail(RedisConnectionError("the store closed the connection"))
        except asyncio.CancelledError:
            self.fail(RedisConnectionError("the store connection was closed"))
            raise
        except Exception as exc:  # any failure of the stream ends this connection
            self.fail(exc)

    def fail(self, exc: BaseException) -> None:
        """Give this connection up: every caller still waiting gets a connection error, one
        whose command was written ``ReplyLost`` (it may have run)."""
        if self.broken is not None:
            return
        self.broken = exc
        unsent = len(self._out)  # the newest callers' commands, not written yet
        self._out.clear()
        self._batch = []
        self._writer.transport.abort()
        self._conn._writer = self._conn._reader = None  # closed here, not (later) by redis-py
        if not self._reader_task.done() and asyncio.current_task() is not self._reader_task:
            self._reader_task.cancel()
        waiting, self._waiting = self._waiting, deque()
        self._loads = deque()
        message = f"the store connection was lost: {exc or type(exc).__name__}"
        written = len(waiting) - unsent
        for i, future in enumerate(waiting):
            if future is not None and not future.done():
                future.set_exception(ReplyLost(message) if i < written else RedisConnectionError(message))

    def close(self) -> None:
        self.fail(RedisConnectionError("the store was closed"))


class Joint:
    """The replies of several commands, on one pipeline or several, as one future: its caller
    wakes once, when the last is in, rather than once per reply that came in a turn of its own.

    ``future`` gets the list of replies in the order the parts were made, each the reply or
    the exception its command met (an error reply, a timeout, a lost connection)."""

    __slots__ = ("_left", "future", "replies")

    def __init__(self, count: int) -> None:
        self.future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self.replies: list[Any] = [None] * count
        self._left = count

    def part(self, index: int) -> _Part:
        return _Part(self, index)


class _Part:
    """One command's place in a ``Joint``: settled as the pipeline settles a future (``done``,
    ``set_result``, ``set_exception``), and done once the joint's caller gave up."""

    __slots__ = ("__weakref__", "_index", "_joint", "_settled")

    def __init__(self, joint: Joint, index: int) -> None:
        self._joint = joint
        self._index = index
        self._settled = False

    def done(self) -> bool:
        return self._settled or self._joint.future.done()

    def set_result(self, reply: Any) -> None:
        self._settled = True
        joint = self._joint
        joint.replies[self._index] = reply
        joint._left -= 1
        if not joint._left and not joint.future.done():
            joint.future.set_result(joint.replies)

    set_exception = set_result  # the exception is the reply the joint's caller looks at


def _poller(transport: asyncio.BaseTransport) -> Any:
    """A ``select.poll`` on the transport's socket (None where there is none: Windows)."""
    sock = transport.get_extra_info("socket")
    if sock is None or not hasattr(select, "poll"):
        return None
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return poller


def _retrieve(task: asyncio.Task[_Connection]) -> None:
    if not task.cancelled():
        task.exception()


class Pipeline:
    """Commands of concurrent callers over one shared connection, opened when first needed.

    Every call is bounded by ``timeout_s``, here rather than by a timeout context per call:
    on a live connection by its write's timer, otherwise (the connection is being opened) by a
    deadline around opening it and the reply.

    Args:
        make: builds a redis-py connection (not yet connected).
        timeout_s: ``store.timeout``.
    """

    __slots__ = ("_current", "_make", "_opening", "_timeout_s")

    def __init__(self, make: Callable[[], AbstractConnection], *, timeout_s: float) -> None:
        self._make = make
        self._timeout_s = timeout_s
        self._current: _Connection | None = None
        self._opening: asyncio.Task[_Connection] | None = None

    def call(self, packed: bytes, load: bytes | None = None) -> Awaitable[Any]:
        """Send one framed command (with this turn's others); awaiting it gives its reply, or
        raises: redis-py's exception for an error reply, ``TimeoutError``, a connection error.
        ``load``: the script's ``SCRIPT LOAD``, sent with the command again after NOSCRIPT."""
        conn = self._current  # ``live()``, inline: every store call passes here
        if conn is None or conn.broken is not None or conn.closed_while_idle():
            return self._call_opening(packed, load)
        return conn.send(packed, load)

    def live(self) -> _Connection | None:
        """The connection commands can be queued on now, without opening one; None when there
        is none (not opened yet, broken, or closed by the server while idle)."""
        conn = self._current
        if conn is None or conn.broken is not None or conn.closed_while_idle():
            return None
        return conn

    async def call_adjacent(self, *packed: bytes) -> list[Any]:
        """Send commands side by side on one connection in one write, nothing of another caller
        between them (``ASKING`` holds for the next command only); their replies in order, an
        error reply or a connection error as the exception itself, not raised."""
        conn = self.live()
        if conn is None:
            async with asyncio.timeout(self._timeout_s):
                conn = await self._connection()
        return await asyncio.gather(*(conn.send(p) for p in packed), return_exceptions=True)

    async def _call_opening(self, packed: bytes, load: bytes | None) -> Any:
        async with asyncio.timeout(self._timeout_s):
            conn = await self._connection()
            return await conn.send(packed, load)

    async def _connection(self) -> _Connection:
        """The live connection; callers arriving while one is being opened share that attempt."""
        if self._opening is None:
            self._opening = asyncio.get_running_loop().create_task(self._open())
            # its callers may all have given up (timed out) before it fails: not an orphan error
            self._opening.add_done_callback(_retrieve)
        return await asyncio.shield(self._opening)

    async def _open(self) -> _Connection:
        try:
            conn = self._make()
            try:
                # by connect() itself: only that makes a Sentinel-managed connection ask the
                # sentinels where the master is; bounded, as a paused server may never answer
                async with asyncio.timeout(self._timeout_s):
                    await conn.connect()  # type: ignore[no-untyped-call]
            except BaseException:
                await conn.disconnect(nowait=True)
                raise
            self._current = _Connection(conn, self._timeout_s)
            return self._current
        finally:
            self._opening = None

    async def close(self) -> None:
        if self._opening is not None:
            self._opening.cancel()
        current, self._current = self._current, None
        if current is not None:
            current.close()
