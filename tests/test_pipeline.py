"""Auto-pipelining on one Redis: concurrent calls share one write and one connection, and each
still gets its own reply or its own error (real redis-server: fakeredis has no sockets)."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis
import redis.asyncio
import redis.exceptions

from gateway.config import IdempotencyConfig
from gateway.errors import StoreScriptError, StoreTimeout, StoreUnanswered, StoreUnavailable
from gateway.store import BucketSpec, LeaseTerms, TakePlan
from gateway.store.guard import new_breaker
from gateway.store.pipeline import Joint, Pipeline, ReplyLost
from gateway.store.redis import RedisStore
from gateway.store.resp import command
from tests.conftest import unique_prefix
from tests.redis_process import RedisProcess

PLAN = TakePlan.of([BucketSpec("p", unit=60_000, refill=1, burst=1000, cost=1)])  # 1 token a minute


class CountingWriter:
    """Wraps a connection's StreamWriter: counts the writes and the bytes."""

    def __init__(self, inner: asyncio.StreamWriter) -> None:
        self.inner = inner
        self.writes = 0

    @property
    def transport(self) -> asyncio.BaseTransport:
        return self.inner.transport

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.inner.write(data)


@pytest.fixture
async def store(redis_server: RedisProcess) -> AsyncIterator[RedisStore]:
    # a breaker that does not open over the few failures these tests cause on purpose
    s = RedisStore.from_url(redis_server.url, key_prefix=unique_prefix(), timeout_s=2.0,
                            breaker=new_breaker(100, 1.0, None))
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def counting_writer(store: RedisStore) -> CountingWriter:
    conn: Any = store._lane._current  # type: ignore[union-attr]
    writer = conn._writer = CountingWriter(conn._writer)
    return writer


async def test_concurrent_calls_leave_in_one_write_and_get_their_own_replies(store: RedisStore) -> None:
    """200 calls made in one event-loop turn go out in one write, and call i gets the reply for
    its own key: key i was charged i % 7 times before, so its remaining count says whose it is."""
    await asyncio.gather(*(store.ratelimit_take(PLAN, [f"k{i}"]) for i in range(200) for _ in range(i % 7)))
    writer = counting_writer(store)
    decisions = await asyncio.gather(*(store.ratelimit_take(PLAN, [f"k{i}"]) for i in range(200)))
    assert writer.writes == 1
    assert [d.buckets[0].remaining for d in decisions] == [999 - i % 7 for i in range(200)]


async def test_an_error_reply_fails_its_own_caller_only(store: RedisStore) -> None:
    """One key of the wrong type among 50 concurrent calls: that call gets StoreScriptError
    (WRONGTYPE), the 49 others their decisions, all in one write; the connection stays usable."""
    await store.client.set(store.key("bad", "p"), "not a hash", ex=60)
    writer = counting_writer(store)
    tags = [f"ok{i}" if i != 17 else "bad" for i in range(50)]
    try:
        results = await asyncio.gather(*(store.ratelimit_take(PLAN, [t]) for t in tags),
                                       return_exceptions=True)
    finally:  # the session's Redis is shared: other tests read every key as a hash
        await store.client.delete(store.key("bad", "p"))
    assert writer.writes == 1
    assert isinstance(results[17], StoreScriptError)
    assert "WRONGTYPE" in str(results[17])
    assert all(not isinstance(r, BaseException) and r.allowed for i, r in enumerate(results) if i != 17)
    assert (await store.ratelimit_take(PLAN, ["after"])).allowed


async def test_a_broken_connection_fails_written_calls_as_unanswered_and_reconnects(
    store: RedisStore,
) -> None:
    """When the connection breaks, calls already written may have run (StoreUnanswered, so a
    claim is withdrawn); calls not yet written certainly did not (plain StoreUnavailable); the
    next call opens a new connection."""
    await store.ping()
    conn: Any = store._lane._current  # type: ignore[union-attr]
    written = [asyncio.ensure_future(store.ratelimit_take(PLAN, [f"w{i}"])) for i in range(5)]
    for _ in range(50):  # until they are written (the flush runs one loop turn later)
        await asyncio.sleep(0)
        if not conn._out and len(conn._waiting) == 5:
            break
    assert not conn._out
    assert len(conn._waiting) == 5
    unsent = [conn.send(b"*1\r\n$4\r\nPING\r\n") for _ in range(3)]  # queued for this turn's write
    conn.fail(ConnectionResetError("reset by test"))
    results = await asyncio.gather(*written, return_exceptions=True)
    assert all(isinstance(r, StoreUnanswered) for r in results), results
    for future in unsent:
        with pytest.raises(redis.exceptions.ConnectionError) as err:
            await future
        assert not isinstance(err.value, ReplyLost)
    assert (await store.ratelimit_take(PLAN, ["next"])).allowed
    assert store._lane._current is not conn  # type: ignore[union-attr]


async def test_a_killed_connection_is_replaced_without_a_failed_call(store: RedisStore,
                                                                      redis_server: RedisProcess) -> None:
    """CLIENT KILL of the pipeline's connection while idle: the reader sees the close, and the
    next call goes out on a new connection and succeeds."""
    await store.ping()
    conn: Any = store._lane._current  # type: ignore[union-attr]
    admin = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        killed = await admin.client_kill_filter(_type="normal", skipme=True)
        assert killed >= 1
        for _ in range(200):  # bounded: the reader sees EOF within a few loop turns
            if conn.broken is not None:
                break
            await asyncio.sleep(0.005)
        assert conn.broken is not None
        assert (await store.ratelimit_take(PLAN, ["after-kill"])).allowed
    finally:
        await admin.aclose()


async def test_a_connection_closed_before_the_loop_noticed_is_replaced_without_a_failed_call(
        store: RedisStore, redis_server: RedisProcess) -> None:
    """CLIENT KILL of the idle connection by a blocking client, so the loop has not run since
    and the reader has not seen the close: the next call still goes out on a new connection and
    succeeds, instead of being written to the closed one and lost (StoreUnanswered)."""
    await store.ping()
    conn: Any = store._lane._current  # type: ignore[union-attr]
    with redis.Redis.from_url(redis_server.url) as admin:  # blocking: no loop turn until the call
        assert admin.client_kill_filter(_type="normal", skipme=True) >= 1
    assert conn.broken is None  # the close is in the socket, unread
    assert (await store.ratelimit_take(PLAN, ["after-unseen-kill"])).allowed
    assert conn.broken is not None
    assert store._lane._current is not conn  # type: ignore[union-attr]


async def test_a_silent_connection_is_given_up_after_a_timeout(dedicated_redis: RedisProcess) -> None:
    """Redis paused: the calls waiting on the connection time out (StoreTimeout) and the
    connection is given up, so after the pause a new one serves without waiting for the backlog."""
    store = RedisStore.from_url(dedicated_redis.url, key_prefix=unique_prefix(), timeout_s=0.2)
    try:
        await store.ping()
        conn: Any = store._lane._current  # type: ignore[union-attr]
        with dedicated_redis.paused():
            results = await asyncio.gather(*(store.ratelimit_take(PLAN, [f"s{i}"]) for i in range(10)),
                                           return_exceptions=True)
            assert conn.broken is not None
        assert all(isinstance(r, StoreUnavailable) for r in results), results
        assert any(isinstance(r, StoreTimeout) for r in results)
        for _ in range(100):  # the breaker may be cooling (5 failures): bounded retries
            try:
                assert (await store.ratelimit_take(PLAN, ["after"])).allowed
                break
            except StoreUnavailable:
                await asyncio.sleep(0.05)
        else:
            pytest.fail("the store never answered again after the pause")
    finally:
        await store.close()


async def test_replies_waiting_in_the_socket_when_a_stalled_loop_resumes_are_not_timeouts(
        redis_server: RedisProcess) -> None:
    """The process stalls (descheduled, or a callback blocks the loop) past store.timeout while
    the replies are already in the socket. When the loop resumes, the write's timer is due
    before the reader has run: the calls still get their replies, and the connection is kept."""
    import time

    s = RedisStore.from_url(redis_server.url, key_prefix=unique_prefix(), timeout_s=0.1,
                            breaker=new_breaker(100, 1.0, None))
    await s.open()
    try:
        await s.ratelimit_take(PLAN, ["warm"])
        conn = s._lane._current  # type: ignore[union-attr]
        calls = [asyncio.ensure_future(s.ratelimit_take(PLAN, [f"c{i}"])) for i in range(20)]
        await asyncio.sleep(0)  # the calls are made and written in this turn's flush
        await asyncio.sleep(0)
        time.sleep(0.3)  # noqa: ASYNC251 - the point: the loop is stalled; Redis answers meanwhile
        decisions = await asyncio.gather(*calls)
        assert all(d.allowed for d in decisions)
        assert s._lane._current is conn  # type: ignore[union-attr]
    finally:
        await s.close()


async def test_remembered_take_commands_reach_their_own_buckets_and_stay_bounded(store: RedisStore) -> None:
    """A client's take is framed once and then reused: each reused command still charges its own
    client's bucket, and no more than TAKE_FRAMES_KEPT commands are kept, however many clients."""
    store._take_frames.limit = 3
    for round_ in range(3):
        decisions = [await store.ratelimit_take(PLAN, [f"c{i}"]) for i in range(8)]
        assert [d.buckets[0].remaining for d in decisions] == [999 - round_] * 8
        assert len(store._take_frames) <= 3


async def test_calls_answered_noscript_are_sent_again_after_a_load_on_the_same_connection(
        store: RedisStore) -> None:
    """After SCRIPT FLUSH, concurrent takes all get their own decision: the reader loads the
    script and sends each call once more itself, in order, with no failed call and no new
    connection."""
    await asyncio.gather(*(store.ratelimit_take(PLAN, [f"n{i}"]) for i in range(20) for _ in range(i % 3)))
    conn = store._lane._current  # type: ignore[union-attr]
    await store.client.script_flush()
    decisions = await asyncio.gather(*(store.ratelimit_take(PLAN, [f"n{i}"]) for i in range(20)))
    assert [d.buckets[0].remaining for d in decisions] == [999 - i % 3 for i in range(20)]
    assert store._lane._current is conn  # type: ignore[union-attr]
    assert conn is not None
    assert conn.broken is None


async def test_remembered_admission_parts_frame_each_request_whole_and_stay_bounded(
        store: RedisStore) -> None:
    """A client's take+claim reuses its framed buckets and arguments around a new record,
    fingerprint and owner each time: every call charges its own client and claims its own
    record, and no more than TAKE_FRAMES_KEPT of them are kept."""
    store._take_claim_frames.limit = 3
    terms = LeaseTerms.from_config(IdempotencyConfig())
    for round_ in range(2):
        for i in range(6):
            decision, claim = await store.ratelimit_take_claim(
                PLAN, [f"a{i}"], f"rec-{round_}-{i}", b"fp-%d" % i, b"owner-%d" % i, terms=terms)
            assert decision.buckets[0].remaining == 999 - round_
            assert claim is not None
            assert claim.outcome == "new"
            assert len(store._take_claim_frames) <= 3
        again = await store.ratelimit_take_claim(PLAN, ["other"], f"rec-{round_}-5", b"fp-5", b"owner-x",
                                                 terms=terms)
        assert again[1] is not None
        assert again[1].outcome == "in_flight"  # the record named by this call, claimed above


def _pipeline_to(server: RedisProcess, timeout_s: float = 2.0) -> Pipeline:
    return Pipeline(lambda: redis.asyncio.Connection(host="127.0.0.1", port=server.port), timeout_s=timeout_s)


async def _live(pipeline: Pipeline) -> Any:
    assert await pipeline.call(command("PING")) == b"PONG"  # opened
    conn = pipeline.live()
    assert conn is not None
    return conn


async def test_a_joint_gathers_replies_from_two_connections_each_in_its_place(
        redis_server: RedisProcess, dedicated_redis: RedisProcess) -> None:
    """A joint over two servers' pipelines (as a cluster take spans two primaries): its future
    is settled only once the last reply is in, with each reply, an error reply as its
    exception, in the order the parts were made; the connections stay usable."""
    one, two = _pipeline_to(redis_server), _pipeline_to(dedicated_redis)
    try:
        a, b = await _live(one), await _live(two)
        joint = Joint(3)
        b.send_part(command("ECHO", "second"), joint.part(1))
        a.send_part(command("NOSUCHCOMMAND"), joint.part(2))
        with dedicated_redis.paused():  # server two cannot answer yet: the joint must wait
            a.send_part(command("ECHO", "first"), joint.part(0))
            await asyncio.sleep(0.2)
            assert not joint.future.done()
        replies = await asyncio.wait_for(joint.future, 2.0)
        assert replies[:2] == [b"first", b"second"]
        assert isinstance(replies[2], redis.exceptions.ResponseError)
        assert await one.call(command("PING")) == b"PONG"
        assert await two.call(command("PING")) == b"PONG"
    finally:
        await one.close()
        await two.close()


async def test_a_joint_part_on_a_silent_server_times_out_while_the_others_answer(
        redis_server: RedisProcess, dedicated_redis: RedisProcess) -> None:
    """One part's server is paused past the timeout: the joint still settles, within the bound,
    with that part's TimeoutError beside the other part's reply."""
    one, two = _pipeline_to(redis_server, 0.2), _pipeline_to(dedicated_redis, 0.2)
    try:
        a, b = await _live(one), await _live(two)
        with dedicated_redis.paused():
            joint = Joint(2)
            a.send_part(command("ECHO", "here"), joint.part(0))
            b.send_part(command("ECHO", "lost"), joint.part(1))
            replies = await asyncio.wait_for(joint.future, 1.0)
        assert replies[0] == b"here"
        assert isinstance(replies[1], TimeoutError)
    finally:
        await one.close()
        await two.close()


async def test_a_joint_whose_caller_gave_up_takes_no_reply_and_breaks_nothing(
        redis_server: RedisProcess) -> None:
    """The caller awaiting a joint is cancelled before the replies come: they are read and
    dropped (no error for a future nobody waits on), and the next call on that connection
    gets its own reply, not a stale one."""
    pipeline = _pipeline_to(redis_server)
    try:
        conn = await _live(pipeline)
        joint = Joint(2)
        conn.send_part(command("ECHO", "a"), joint.part(0))
        conn.send_part(command("ECHO", "b"), joint.part(1))
        waiter = asyncio.ensure_future(joint.future)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert await pipeline.call(command("ECHO", "next")) == b"next"
        assert pipeline.live() is conn
    finally:
        await pipeline.close()


async def test_an_answered_call_is_not_kept_alive_until_its_write_times_out(
        redis_server: RedisProcess) -> None:
    """A write's timer must not hold its callers once they are answered: at a long timeout and a
    high rate, futures and joints kept for the whole timeout filled the young generations, and
    each garbage collection stalled the loop for tens of milliseconds (RESULTS.md, run 9)."""
    pipeline = _pipeline_to(redis_server, 30.0)  # the timer stays armed for the whole test
    try:
        connection = await _live(pipeline)
        future = connection.send(command("ECHO", "kept?"))
        joint = Joint(1)
        part = joint.part(0)
        connection.send_part(command("ECHO", "part"), part)
        assert await asyncio.wait_for(future, 2.0) == b"kept?"
        assert await asyncio.wait_for(joint.future, 2.0) == [b"part"]
        gone = [weakref.ref(future), weakref.ref(joint.future)]  # a part holds its joint
        del future, joint, part
        assert await connection.send(command("PING")) == b"PONG"  # the reader's last reply: not theirs
        gc.collect()
        assert [ref() for ref in gone] == [None, None]
    finally:
        await pipeline.close()
