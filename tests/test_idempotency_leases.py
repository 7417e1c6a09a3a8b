"""Idempotency leases under fire: contention, renewal, dead holders, store faults, disconnects
and cancellation never let a keyed request run twice, and never lose a stored outcome."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
import pytest
import redis.asyncio
import uvicorn

from gateway._asgi import Message
from gateway.config import IdentityConfig, load_config
from gateway.errors import StoreError, StoreUnavailable
from gateway.idempotency import IdempotencyMiddleware
from gateway.idempotency.request import fingerprint, record_name
from gateway.identity import IdentityResolver
from gateway.store import LeaseTerms, StoredResponse
from gateway.store.redis import RedisStore
from tests.asgi_helpers import CountingApp, client_for, run_in_threads
from tests.conftest import TEST_STORE_TIMEOUT_S, unique_prefix
from tests.redis_process import RedisProcess

T = TypeVar("T")

LOCK_TTL_S = 0.3
SETTINGS: dict[str, Any] = {"lock_ttl": "300ms", "ttl": "1h", "on_lost_claim": "unknown"}
RETRY_SETTINGS: dict[str, Any] = {**SETTINGS, "on_lost_claim": "retry"}
OUTCOME_UNKNOWN = "urn:gateway:problem:outcome-unknown"
KEY_IN_USE = "urn:gateway:problem:idempotency-key-in-use"
KEY = "charge-7f3a"
PATH = "/charges"
BODY = b'{"amount": 1250, "currency": "EUR"}'
HEADERS = {"Idempotency-Key": KEY, "Content-Type": "application/json"}
DEAD_OWNER = b"d" * 32  # a holder token no live attempt uses
DEADLINE_S = 15.0  # generous: 2 noisy cores
POLL_S = 0.02


# ---- helpers -------------------------------------------------------------------------------


async def post(c: httpx.AsyncClient) -> httpx.Response:
    return await c.post(PATH, content=BODY, headers=HEADERS)


async def eventually(probe: Callable[[], Awaitable[T | None]], what: str) -> T:
    """Poll ``probe`` until it returns something other than None; fail after ``DEADLINE_S``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while True:
        found = await probe()
        if found is not None:
            return found
        if loop.time() > deadline:
            pytest.fail(f"not within {DEADLINE_S}s: {what}")
        await asyncio.sleep(POLL_S)


async def until(condition: Callable[[], bool], what: str) -> None:
    """Poll a plain condition the same way."""

    async def probe() -> bool | None:
        return True if condition() else None

    await eventually(probe, what)


async def wait_for(event: asyncio.Event) -> None:
    async with asyncio.timeout(DEADLINE_S):
        await event.wait()


async def keyed_scope() -> dict[str, Any]:
    """The scope the middleware sees for ``post`` through ``client_for`` (recorded, not guessed)."""
    app = CountingApp()
    async with client_for(app) as c:
        await post(c)
    return dict(app.scopes[-1])


def record_of(scope: dict[str, Any]) -> str:
    """The record name the middleware computes for this scope (default identity sources)."""
    identity = IdentityResolver(IdentityConfig(), ("identity",)).tags(scope)["identity"]
    return record_name(identity, KEY.encode())


def lease_terms(settings: dict[str, Any]) -> LeaseTerms:
    return LeaseTerms.from_config(load_config({"idempotency": settings}).idempotency)


async def raw_record(store: RedisStore, record: str) -> dict[bytes, bytes]:
    rec: dict[bytes, bytes] = await store.client.hgetall(store.record_key(record))  # type: ignore[assignment]
    return rec


async def store_now_ms(store: RedisStore) -> int:
    seconds, micros = await store.client.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def first_answer_past_the_lease(c: httpx.AsyncClient) -> httpx.Response:
    """Retry while the answer is 409 (the claim still looks live); return the first other one."""

    async def probe() -> httpx.Response | None:
        r = await post(c)
        return None if r.status_code == 409 else r

    return await eventually(probe, "a retry answered other than 409")


def assert_outcome_unknown(r: httpx.Response, *, replayed: bool) -> None:
    assert r.status_code == 502
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["type"] == OUTCOME_UNKNOWN
    assert r.headers.get("idempotent-replayed") == ("true" if replayed else None)


def assert_in_flight(r: httpx.Response) -> None:
    assert r.status_code == 409
    assert r.headers["retry-after"].isdigit()
    assert r.json()["type"] == KEY_IN_USE


class SlowApp:
    """Counts its runs; each run reads the body, sets ``started``, waits for ``release`` (or
    for ``gate`` to return), then answers 201 in two body chunks naming the run."""

    def __init__(self, *, gate: Callable[[], Awaitable[None]] | None = None,
                 listen_for_disconnect: bool = False) -> None:
        self.calls = 0
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.finished = asyncio.Event()
        self.bodies: list[bytes] = []
        self.later_messages: list[str] = []
        self._gate = gate
        self._listen = listen_for_disconnect

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.calls += 1
        run = self.calls
        self.bodies.append((await receive())["body"])
        if self._listen:
            self.later_messages.append((await receive())["type"])
        self.started.set()
        if self._gate is not None:
            await self._gate()
        else:
            await self.release.wait()
        await send({"type": "http.response.start", "status": 201,
                    "headers": [(b"content-type", b"text/plain"), (b"x-run", b"%d" % run)]})
        await send({"type": "http.response.body", "body": b"run-%d " % run, "more_body": True})
        await send({"type": "http.response.body", "body": b"done"})
        self.finished.set()


class DelegatingStore:
    """A test double in front of a real store: everything is delegated unless overridden."""

    def __init__(self, inner: RedisStore) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class FlakyCompleteStore(DelegatingStore):
    """``idempotency_complete`` raises StoreUnavailable for its first ``failures`` calls (all of
    them when None), then delegates."""

    def __init__(self, inner: RedisStore, failures: int | None) -> None:
        super().__init__(inner)
        self.failures = failures
        self.complete_calls = 0

    async def idempotency_complete(self, *args: Any) -> bool:
        self.complete_calls += 1
        if self.failures is None or self.complete_calls <= self.failures:
            raise StoreUnavailable("injected: connection reset")
        return await self.inner.idempotency_complete(*args)


class CountingCompleteStore(DelegatingStore):
    """Counts how ``idempotency_complete`` calls end: stored, refused, or a store error."""

    def __init__(self, inner: RedisStore) -> None:
        super().__init__(inner)
        self.results: list[bool | str] = []

    async def idempotency_complete(self, *args: Any) -> bool:
        try:
            done = await self.inner.idempotency_complete(*args)
        except StoreError as exc:
            self.results.append(type(exc).__name__)
            raise
        self.results.append(done)
        return done


class GatedCompleteStore(DelegatingStore):
    """``idempotency_complete`` sets ``entered`` and waits for ``gate`` before delegating."""

    def __init__(self, inner: RedisStore) -> None:
        super().__init__(inner)
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def idempotency_complete(self, *args: Any) -> bool:
        self.entered.set()
        await self.gate.wait()
        return await self.inner.idempotency_complete(*args)


def body_then(after: Callable[[], Awaitable[dict[str, Any]]]) -> Callable[[], Awaitable[dict[str, Any]]]:
    """A hand-written ASGI ``receive``: the whole body once, then whatever ``after`` gives."""
    messages = [{"type": "http.request", "body": BODY, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else await after()

    return receive


async def disconnected() -> dict[str, Any]:
    return {"type": "http.disconnect"}


async def never() -> dict[str, Any]:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


# ---- 1. contention ---------------------------------------------------------------------------


async def test_fifty_concurrent_identical_requests_run_the_app_once(store: RedisStore) -> None:
    """50 identical keyed requests at once while the app is slow: it runs once, the 49 others get
    409 with Retry-After, and every later request gets the first one's response replayed."""
    n = 50
    app = SlowApp()
    mw = IdempotencyMiddleware(app, idempotency=SETTINGS, store=store)
    answered = 0
    async with client_for(mw) as c:

        async def one() -> httpx.Response:
            nonlocal answered
            r = await post(c)
            answered += 1
            if answered == n - 1:
                app.release.set()  # every other request has its answer: let the first finish
            return r

        async with asyncio.timeout(DEADLINE_S):
            first_wave = await asyncio.gather(*(one() for _ in range(n)))
            second_wave = await asyncio.gather(*(post(c) for _ in range(n)))
    assert app.calls == 1
    executed = [r for r in first_wave if r.status_code == 201]
    assert len(executed) == 1
    assert executed[0].content == b"run-1 done"
    assert "idempotent-replayed" not in executed[0].headers
    for r in first_wave:
        if r is not executed[0]:
            assert_in_flight(r)
    for r in second_wave:
        assert r.status_code == 201
        assert r.content == b"run-1 done"
        assert r.headers["x-run"] == "1"
        assert r.headers["idempotent-replayed"] == "true"


def test_two_instances_in_two_threads_run_the_app_once(redis_server: RedisProcess) -> None:
    """2 x 25 identical keyed requests through two middleware instances (own event loops, own
    pools) on one real Redis: one execution in total, 49 conflicts, then replays on both."""
    per_thread, total = 25, 50
    prefix = unique_prefix()
    lock = threading.Lock()
    answered = [0]
    others_answered = threading.Event()
    start = threading.Barrier(2)
    all_answered = threading.Barrier(2)

    async def gate() -> None:
        assert await asyncio.to_thread(others_answered.wait, DEADLINE_S)

    apps = [SlowApp(gate=gate), SlowApp(gate=gate)]
    waves: list[list[httpx.Response]] = [[], []]
    replays: list[httpx.Response | None] = [None, None]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        async def one(c: httpx.AsyncClient) -> httpx.Response:
            r = await post(c)
            with lock:
                answered[0] += 1
                if answered[0] == total - 1:
                    others_answered.set()
            return r

        async def main() -> None:
            st = RedisStore.from_url(redis_server.url, key_prefix=prefix, timeout_s=TEST_STORE_TIMEOUT_S)
            await st.open()
            try:
                mw = IdempotencyMiddleware(apps[i], idempotency=SETTINGS, store=st)
                async with client_for(mw) as c:
                    start.wait(timeout=DEADLINE_S)
                    async with asyncio.timeout(DEADLINE_S):
                        waves[i] = await asyncio.gather(*(one(c) for _ in range(per_thread)))
                    all_answered.wait(timeout=DEADLINE_S)
                    replays[i] = await post(c)
            finally:
                await st.close()

        try:
            asyncio.run(main())
        except BaseException as exc:
            errors.append(exc)
            start.abort()
            all_answered.abort()

    run_in_threads(run, 2)
    assert errors == []
    assert apps[0].calls + apps[1].calls == 1
    answers = waves[0] + waves[1]
    assert len(answers) == total
    assert [r.status_code for r in answers].count(201) == 1
    for r in answers:
        if r.status_code != 201:
            assert_in_flight(r)
    for replay in replays:
        assert replay is not None
        assert replay.status_code == 201
        assert replay.content == b"run-1 done"
        assert replay.headers["idempotent-replayed"] == "true"


# ---- 2. renewal ------------------------------------------------------------------------------


async def test_a_request_longer_than_lock_ttl_keeps_its_claim(store: RedisStore) -> None:
    """A request running four lock_ttls keeps renewing its claim: every concurrent retry over
    the whole run gets 409, the lease end moves forward, and afterwards the retry is a replay."""
    app = SlowApp()
    mw = IdempotencyMiddleware(app, idempotency=SETTINGS, store=store)
    record = record_of(await keyed_scope())
    loop = asyncio.get_running_loop()
    during: list[httpx.Response] = []
    async with client_for(mw) as c:
        first = asyncio.ensure_future(post(c))
        await wait_for(app.started)
        lease_end_at_start = int((await raw_record(store, record))[b"lx"])
        run_until = loop.time() + 4 * LOCK_TTL_S
        while loop.time() < run_until:
            during.extend(await asyncio.gather(post(c), post(c), post(c)))
            await asyncio.sleep(LOCK_TTL_S / 6)  # pacing only: the loop runs on the deadline
        rec = await raw_record(store, record)
        now_ms = await store_now_ms(store)
        app.release.set()
        async with asyncio.timeout(DEADLINE_S):
            answer = await first
        replay = await post(c)
    assert rec[b"st"] == b"p"
    lease_end = int(rec[b"lx"])
    assert lease_end > now_ms  # still live after four lock_ttls
    assert lease_end - lease_end_at_start >= 2 * LOCK_TTL_S * 1000  # renewed, more than once
    assert len(during) >= 6
    for r in during:
        assert_in_flight(r)
    assert answer.status_code == 201
    assert answer.content == b"run-1 done"
    assert replay.status_code == 201
    assert replay.content == b"run-1 done"
    assert replay.headers["idempotent-replayed"] == "true"
    assert app.calls == 1


# ---- 3./4. a holder that died --------------------------------------------------------------


async def test_a_dead_holders_claim_becomes_outcome_unknown(store: RedisStore) -> None:
    """A claim whose holder never renews is, after lock_ttl, an outcome-unknown record: retries
    get a replayed 502, the app never runs, and nobody but the holder can complete it."""
    scope = await keyed_scope()
    record, terms = record_of(scope), lease_terms(SETTINGS)
    claim = await store.idempotency_claim(record, fingerprint(scope, BODY), DEAD_OWNER, terms)
    assert claim.outcome == "new"
    app = CountingApp()
    mw = IdempotencyMiddleware(app, idempotency=SETTINGS, store=store)
    async with client_for(mw) as c:
        assert_in_flight(await post(c))  # the dead holder's claim still looks live at first
        lapsed = await first_answer_past_the_lease(c)
        late = await store.idempotency_complete(record, b"e" * 32, StoredResponse(200, b"", b"late"), terms)
        again = await post(c)
    assert_outcome_unknown(lapsed, replayed=True)
    assert late is False
    assert_outcome_unknown(again, replayed=True)
    assert (await raw_record(store, record))[b"st"] == b"u"
    assert app.calls == 0


async def test_a_dead_holders_claim_is_run_again_in_retry_mode(store: RedisStore) -> None:
    """With on_lost_claim = "retry", a retry after lock_ttl runs the app exactly once, and the
    stale holder's late completion is refused and does not replace the new execution's response."""
    scope = await keyed_scope()
    record, terms = record_of(scope), lease_terms(RETRY_SETTINGS)
    claim = await store.idempotency_claim(record, fingerprint(scope, BODY), DEAD_OWNER, terms)
    assert claim.outcome == "new"
    app = CountingApp()
    mw = IdempotencyMiddleware(app, idempotency=RETRY_SETTINGS, store=store)
    async with client_for(mw) as c:
        assert_in_flight(await post(c))
        rerun = await first_answer_past_the_lease(c)
        stale = StoredResponse(299, b"", b"stale holder")
        late = await store.idempotency_complete(record, DEAD_OWNER, stale, terms)
        replay = await post(c)
    assert rerun.status_code == 200
    assert rerun.content == b"ok"
    assert "idempotent-replayed" not in rerun.headers
    assert late is False
    assert replay.status_code == 200
    assert replay.content == b"ok"
    assert replay.headers["idempotent-replayed"] == "true"
    rec = await raw_record(store, record)
    assert rec[b"st"] == b"d"
    assert rec[b"o"] != DEAD_OWNER
    assert app.calls == 1


# ---- 5. store faults at completion ----------------------------------------------------------


async def test_transient_completion_errors_are_retried_and_the_response_stored(store: RedisStore) -> None:
    """Completion failing twice with StoreUnavailable is retried: the third call stores the
    response, so a retry gets the replay and the app ran once."""
    flaky = FlakyCompleteStore(store, failures=2)
    app = CountingApp()
    mw = IdempotencyMiddleware(app, idempotency=SETTINGS, store=flaky)
    async with client_for(mw) as c:
        first = await post(c)
        replay = await post(c)
    assert first.status_code == 200
    assert flaky.complete_calls == 3
    assert replay.status_code == 200
    assert replay.content == b"ok"
    assert replay.headers["idempotent-replayed"] == "true"
    assert app.calls == 1


async def test_a_completion_not_stored_in_time_cuts_the_response_off(store: RedisStore) -> None:
    """Completion failing past completion_timeout: the client's response is cut off (never a
    whole 200 its retries would contradict); the holder keeps trying in the background, still
    renewing its claim, so retries meanwhile get 409; when the store takes its outcome, every
    retry replays the real response. The app ran once."""
    flaky = FlakyCompleteStore(store, failures=None)
    app = CountingApp()
    settings = {**SETTINGS, "completion_timeout": "500ms"}
    mw = IdempotencyMiddleware(app, idempotency=settings, store=flaky)
    async with client_for(mw) as c:
        first = asyncio.ensure_future(post(c))
        await until(lambda: flaky.complete_calls >= 2, "the completion to be retried")
        while_retrying = await post(c)
        async with asyncio.timeout(DEADLINE_S):
            answer = (await asyncio.gather(first, return_exceptions=True))[0]
        calls_at_cut_off = flaky.complete_calls
        await asyncio.sleep(3 * LOCK_TTL_S)
        after_the_lease = await post(c)
        await until(lambda: flaky.complete_calls > calls_at_cut_off + 1, "the holder to keep trying")
        flaky.failures = 0  # the store is back
        await until(lambda: not mw._settling, "the late completion to land")
        replay = await post(c)
    assert_in_flight(while_retrying)
    assert isinstance(answer, httpx.RemoteProtocolError)
    assert_in_flight(after_the_lease)  # the holder lives and renews: not lost, not unknown
    assert (replay.status_code, replay.content) == (200, b"ok")
    assert replay.headers["idempotent-replayed"] == "true"
    assert app.calls == 1


async def test_a_renewal_the_store_does_not_answer_keeps_the_claim(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Renewals failing (an outage) do not give the claim up: once they succeed again the lease
    runs on, the request completes, and its client and its retries get the same response."""
    failing = {"on": True}
    inner_renew = store.idempotency_renew
    renew_calls: list[str] = []

    async def flaky_renew(*args: Any) -> bool:
        if failing["on"]:
            renew_calls.append("error")
            raise StoreUnavailable("injected: connection reset")
        renew_calls.append("ok")
        return await inner_renew(*args)

    monkeypatch.setattr(store, "idempotency_renew", flaky_renew)
    app = SlowApp()
    mw = IdempotencyMiddleware(app, idempotency=SETTINGS, store=store)
    async with client_for(mw) as c:
        first = asyncio.ensure_future(post(c))
        await wait_for(app.started)
        await until(lambda: renew_calls.count("error") >= 3, "renewals to fail three times")
        failing["on"] = False
        await until(lambda: "ok" in renew_calls, "a renewal to succeed")
        assert_in_flight(await post(c))  # still the holder's: the failures gave nothing up
        app.release.set()
        async with asyncio.timeout(DEADLINE_S):
            answer = await first
        replay = await post(c)
    assert (answer.status_code, answer.content) == (201, b"run-1 done")
    assert (replay.status_code, replay.content) == (201, b"run-1 done")
    assert replay.headers["idempotent-replayed"] == "true"
    assert app.calls == 1


async def test_a_paused_redis_across_completion_still_stores_the_outcome(
    dedicated_redis: RedisProcess,
) -> None:
    """A real Redis paused (CLIENT PAUSE WRITE, longer than the store timeout) while the response
    completes: completion times out, is retried after the pause, and the outcome is stored."""
    inner = RedisStore.from_url(dedicated_redis.url, key_prefix=unique_prefix(), timeout_s=0.15)
    counting = CountingCompleteStore(inner)
    # the lease outlives the pause: renewals time out too while the server is paused
    settings = {**SETTINGS, "lock_ttl": "3s"}
    app = SlowApp()
    mw = IdempotencyMiddleware(app, idempotency=settings, store=counting)
    admin = redis.asyncio.Redis.from_url(dedicated_redis.url)
    try:
        await inner.open()
        async with client_for(mw) as c:
            first = asyncio.ensure_future(post(c))
            await wait_for(app.started)
            await admin.execute_command("CLIENT", "PAUSE", "600", "WRITE")  # type: ignore[no-untyped-call]
            app.release.set()
            async with asyncio.timeout(DEADLINE_S):
                answer = await first
            replay = await post(c)
    finally:
        await admin.aclose()
        await inner.close()
    assert answer.status_code == 201
    assert "StoreTimeout" in counting.results  # the pause did hit the completion
    assert counting.results[-1] is True
    assert replay.status_code == 201
    assert replay.content == b"run-1 done"
    assert replay.headers["idempotent-replayed"] == "true"
    assert app.calls == 1


# ---- 6. the app raises ------------------------------------------------------------------------


@pytest.mark.parametrize("when", ["before_response", "empty_head", "mid_response"])
async def test_an_app_that_raises_after_acting_never_runs_again(store: RedisStore, when: str) -> None:
    """An app that acts then raises (before its response, after a head that declares an empty
    body, or mid-body) is settled as outcome unknown: 20 retries, half of them concurrent, all
    get the replayed 502 and the side effect stays single. A head that alone would be a whole
    response is held back, so that client, too, gets the 502 rather than a whole empty 201."""
    effects = 0

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal effects
        await receive()
        effects += 1
        if when != "before_response":
            length = b"0" if when == "empty_head" else b"100"
            await send({"type": "http.response.start", "status": 201,
                        "headers": [(b"content-length", length)]})
        if when == "mid_response":
            await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise RuntimeError("the upstream connection broke after the charge")

    mw = IdempotencyMiddleware(app, idempotency=SETTINGS, store=store)
    transport = httpx.ASGITransport(app=mw, raise_app_exceptions=False, client=("203.0.113.7", 4321))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as c:
        first = await post(c)
        concurrent = await asyncio.gather(*(post(c) for _ in range(10)))
        sequential = [await post(c) for _ in range(10)]
    if when != "mid_response":
        assert_outcome_unknown(first, replayed=False)
    else:
        assert first.status_code == 201  # its head went out before the app broke
    for r in [*concurrent, *sequential]:
        assert_outcome_unknown(r, replayed=True)
    assert effects == 1


# ---- 7. the client goes away ------------------------------------------------------------------


async def test_a_client_that_goes_away_does_not_free_the_key(store: RedisStore) -> None:
    """A client that disconnects after its body, and whose send raises OSError, does not release
    the claim: the app finishes, the response is stored, and a retry gets the whole body."""
    app = SlowApp(listen_for_disconnect=True)
    mw = IdempotencyMiddleware(app, idempotency=SETTINGS, store=store)
    scope = await keyed_scope()
    tried: list[str] = []

    async def send(message: Message) -> None:
        tried.append(message["type"])
        raise ConnectionResetError("the client is gone")

    gone = asyncio.ensure_future(mw(dict(scope), body_then(disconnected), send))
    async with client_for(mw) as c:
        await wait_for(app.started)
        during = await post(c)
        app.release.set()
        async with asyncio.timeout(DEADLINE_S):
            await gone  # returns normally: the dropped response is not the app's failure
        replay = await post(c)
    assert app.later_messages == ["http.disconnect"]
    assert tried == ["http.response.start"]  # the rest was dropped, not sent to a dead socket
    assert_in_flight(during)
    assert replay.status_code == 201
    assert replay.content == b"run-1 done"
    assert replay.headers["x-run"] == "1"
    assert replay.headers["idempotent-replayed"] == "true"
    assert app.calls == 1


async def test_a_real_server_client_that_hangs_up_gets_the_replay_later(store: RedisStore) -> None:
    """Under uvicorn, a client that sends a keyed POST and closes its socket before the slow app
    answers leaves the request running: a later retry over HTTP gets the replay."""
    app = SlowApp()
    mw = IdempotencyMiddleware(app, idempotency=SETTINGS, store=store)
    config = uvicorn.Config(mw, host="127.0.0.1", port=0, lifespan="off", ws="none", http="h11",
                            log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    serving = asyncio.ensure_future(server.serve())
    try:
        await until(lambda: server.started, "uvicorn to start")
        port = server.servers[0].sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = (f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nIdempotency-Key: {KEY}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n")
        writer.write(head.encode() + BODY)
        await writer.drain()
        await wait_for(app.started)
        writer.close()
        await writer.wait_closed()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
            during = await post(c)
            app.release.set()
            await wait_for(app.finished)
            replay = await post(c)
        assert await reader.read() == b""  # the hung-up client never got an answer
    finally:
        server.should_exit = True
        async with asyncio.timeout(DEADLINE_S):
            await serving
    assert_in_flight(during)
    assert replay.status_code == 201
    assert replay.content == b"run-1 done"
    assert replay.headers["idempotent-replayed"] == "true"
    assert app.calls == 1


# ---- 8. cancellation -------------------------------------------------------------------------


async def start_request(mw: IdempotencyMiddleware) -> tuple[asyncio.Future[None], str]:
    """A keyed request through ``mw`` as its own task (its client never disconnects and its
    answer is dropped), and the name of the record it claims."""
    scope = await keyed_scope()

    async def send(message: Message) -> None:
        pass

    return asyncio.ensure_future(mw(dict(scope), body_then(never), send)), record_of(scope)


async def test_a_cancelled_request_is_settled_as_outcome_unknown(store: RedisStore) -> None:
    """A request task cancelled while the app runs settles its record as outcome unknown
    (state d, status 502) instead of leaving it in flight; a retry gets the replayed 502."""
    app = SlowApp()  # never released
    mw = IdempotencyMiddleware(app, idempotency=SETTINGS, store=store)
    task, record = await start_request(mw)
    await wait_for(app.started)
    assert (await raw_record(store, record))[b"st"] == b"p"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    async def settled() -> dict[bytes, bytes] | None:
        rec = await raw_record(store, record)
        return rec if rec.get(b"st") == b"d" else None

    rec = await eventually(settled, "the cancelled request's record to be settled")
    assert rec[b"s"] == b"502"
    assert json.loads(rec[b"b"])["type"] == OUTCOME_UNKNOWN
    async with client_for(mw) as c:
        retry = await post(c)
    assert_outcome_unknown(retry, replayed=True)
    assert app.calls == 1


async def test_a_settle_outlives_a_second_cancellation(store: RedisStore) -> None:
    """Cancelled again while its outcome-unknown settle is in progress, the request task ends,
    but the shielded settle runs on and still writes the 502 record."""
    gated = GatedCompleteStore(store)
    app = SlowApp()
    mw = IdempotencyMiddleware(app, idempotency=SETTINGS, store=gated)
    task, record = await start_request(mw)
    await wait_for(app.started)
    task.cancel()
    await wait_for(gated.entered)  # the settle is waiting on the store
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(DEADLINE_S):
            await task
    assert (await raw_record(store, record))[b"st"] == b"p"
    gated.gate.set()

    async def settled() -> dict[bytes, bytes] | None:
        rec = await raw_record(store, record)
        return rec if rec.get(b"st") == b"d" else None

    rec = await eventually(settled, "the shielded settle to write the record")
    assert rec[b"s"] == b"502"
    assert json.loads(rec[b"b"])["type"] == OUTCOME_UNKNOWN
    assert app.calls == 1


async def test_a_request_cancelled_during_its_completion_retry_is_still_settled(store: RedisStore) -> None:
    """A request task cancelled while its completion waits to be retried (the first attempt hit a
    store error) still settles its record, instead of leaving it in flight to lapse."""
    flaky = FlakyCompleteStore(store, failures=1)
    app = SlowApp()
    app.release.set()
    mw = IdempotencyMiddleware(app, idempotency=SETTINGS, store=flaky)
    task, record = await start_request(mw)
    await until(lambda: flaky.complete_calls == 1, "the first completion attempt to fail")
    task.cancel()  # during the settle's backoff: the response is whole, the record not yet written
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(DEADLINE_S):
            await task

    async def settled_or_lapsed() -> dict[bytes, bytes] | None:
        rec = await raw_record(store, record)
        if rec[b"st"] != b"p" or int(rec[b"lx"]) < await store_now_ms(store):
            return rec
        return None

    rec = await eventually(settled_or_lapsed, "the record to be settled, or its lease to lapse")
    assert rec[b"st"] == b"d"  # settled (as the response, or as outcome unknown), not left to lapse
    async with client_for(mw) as c:
        retry = await post(c)
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.status_code in (201, 502)
    assert app.calls == 1


async def test_one_renewal_timer_serves_every_lease_in_order() -> None:
    """Renewals fires each lease when due, oldest first, skips a lease settled before it is
    due, and fires a lease again after it is re-added (one timer for all of them)."""
    from gateway.idempotency.lease import Renewals

    fired: list[str] = []
    two, three = asyncio.Event(), asyncio.Event()

    class Due:
        def __init__(self, name: str) -> None:
            self.name = name

        def renew_now(self) -> None:
            fired.append(self.name)
            if len(fired) == 2:
                two.set()
            elif len(fired) == 3:
                three.set()

    renewals = Renewals()
    loop = asyncio.get_running_loop()
    now = loop.time()
    a, b, c = Due("a"), Due("b"), Due("c")
    renewals.add(a, now + 0.03)  # type: ignore[arg-type]
    renewals.add(b, now + 0.06)  # type: ignore[arg-type]
    renewals.add(c, now + 0.09)  # type: ignore[arg-type]
    renewals.discard(b)  # settled before it was due
    async with asyncio.timeout(DEADLINE_S):
        await two.wait()
        renewals.add(a, loop.time() + 0.03)  # type: ignore[arg-type]
        await three.wait()
    assert fired == ["a", "c", "a"]
