"""What a retry gets, phase by phase: a real, durable redis-server (AOF, ``appendfsync always``)
killed, SIGSTOPped or write-paused at one moment of a keyed request, and what the client was
told checked against what every retry is told afterwards (README, "What a retry gets").

The moments: before the claim, while the request is upstream, during the completion (the store
back within ``completion_timeout``, or not), right after the completion. Whatever the moment,
the app runs once and a client never holds a whole answer that a retry contradicts: either it
got the response that every retry replays, or its response was cut off and the retry resolves it.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio

from gateway import GatewayMiddleware
from gateway._asgi import Receive, Scope, Send
from gateway.config import load_config
from gateway.store import Store, StoredResponse, store_from_config
from tests.asgi_helpers import PROBLEM, assert_problem, client_for
from tests.conftest import running_redis, unique_prefix
from tests.redis_process import RedisProcess
from tests.serve_process import GatewayServe, Upstream, serve_config, wait_for

AOF = ("--appendonly", "yes", "--appendfsync", "always")
BODY = b'{"amount": 1250}'
COMPLETION_TIMEOUT_S = 1.0
SETTLE_DEADLINE_S = 20.0  # generous: 2 noisy cores, a restarted server, breaker cool-downs
Fault = Callable[[], Awaitable[None]]


@pytest.fixture
def durable_redis() -> Iterator[RedisProcess]:
    """A redis-server of this test's own with AOF fsynced on every write."""
    yield from running_redis(AOF)


class ChargeApp:
    """Answers each POST with a charge of its own (``charge-<n>-<random>``), after running
    ``fault`` if one is set (the store breaks while the request is upstream)."""

    def __init__(self, fault: Fault | None = None) -> None:
        self.fault = fault
        self.answered: list[bytes] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        while (await receive()).get("more_body", False):
            pass
        if self.fault is not None:
            await self.fault()
        body = b"charge-%d-%s" % (len(self.answered) + 1, uuid.uuid4().hex.encode())
        self.answered.append(body)
        await send({"type": "http.response.start", "status": 201,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": body[:10], "more_body": True})
        await send({"type": "http.response.body", "body": body[10:]})


class HookedStore:
    """The real store, with a fault run once before or after the first ``idempotency_complete``."""

    def __init__(self, inner: Store, *, before: Fault | None = None, after: Fault | None = None) -> None:
        self.inner = inner
        self._before, self._after = before, after

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def idempotency_complete(self, record: str, owner: bytes, response: StoredResponse,
                                   terms: Any) -> bool:
        before, self._before = self._before, None
        if before is not None:
            await before()
        done = await self.inner.idempotency_complete(record, owner, response, terms)
        after, self._after = self._after, None
        if after is not None:
            await after()
        return done


def gateway(server: RedisProcess, app: ChargeApp, *, before: Fault | None = None,
            after: Fault | None = None, **idempotency: Any) -> tuple[GatewayMiddleware, Store]:
    """The whole stack on ``server`` (short timeouts, so each phase takes a second or two) and
    the real store under it, for the test to open and close."""
    config = {
        "store": {"url": server.url, "key_prefix": unique_prefix(), "timeout": "200ms",
                  "breaker_failures": 3, "breaker_cooldown": "100ms"},
        "idempotency": {"lock_ttl": "2s", "completion_timeout": f"{COMPLETION_TIMEOUT_S:g}s",
                        **idempotency},
    }
    real = store_from_config(load_config(config).store)
    hooked: Any = HookedStore(real, before=before, after=after)
    return GatewayMiddleware(app, config, store=hooked), real


async def pay(c: httpx.AsyncClient, key: str) -> httpx.Response:
    return await c.post("/pay", content=BODY, headers={"Idempotency-Key": key})


async def retry_until_answered(c: httpx.AsyncClient, key: str) -> tuple[httpx.Response, list[str]]:
    """Retry ``key`` as a client would (bounded): on a transport error, 409, 503, or a replayed
    502 outcome-unknown (the holder may still store its real outcome); the first other answer,
    and what each try saw."""
    seen: list[str] = []
    end = time.monotonic() + SETTLE_DEADLINE_S
    while time.monotonic() < end:
        try:
            r = await pay(c, key)
        except httpx.TransportError as exc:
            seen.append(type(exc).__name__)
        else:
            unknown = r.status_code == 502 and r.json().get("type") == PROBLEM + "outcome-unknown"
            seen.append(f"{r.status_code}{' replayed' if 'idempotent-replayed' in r.headers else ''}")
            if r.status_code not in (409, 503) and not unknown:
                return r, seen
        await asyncio.sleep(0.1)
    raise AssertionError(f"no settled answer within {SETTLE_DEADLINE_S}s: {seen}")


async def first_try(c: httpx.AsyncClient, key: str) -> httpx.Response | httpx.TransportError:
    """The client's first try of ``key``: its response, or the transport error that cut it off."""
    try:
        return await pay(c, key)
    except httpx.TransportError as exc:
        return exc


def assert_replays(r: httpx.Response, body: bytes) -> None:
    assert (r.status_code, r.content) == (201, body)
    assert r.headers["idempotent-replayed"] == "true"


def assert_first_then_replays(first: httpx.Response | httpx.TransportError, answered: httpx.Response,
                              seen: list[str], body: bytes, *, whole: bool) -> None:
    """The first try got the whole 201 ``body`` (``whole``), or was cut off, never a whole 201;
    the settled retry replays ``body``, and no retry before it was run again."""
    if whole:
        assert isinstance(first, httpx.Response)
        assert (first.status_code, first.content) == (201, body)
    else:
        assert isinstance(first, httpx.RemoteProtocolError), first  # cut off, not a whole 201
    assert_replays(answered, body)
    assert "201" not in seen  # no retry was ever run again


async def restart(server: RedisProcess, after_s: float = 0.0) -> None:
    """Start ``server`` again on its port (it reloads its AOF), off the event loop."""
    await asyncio.sleep(after_s)
    await asyncio.to_thread(server.start)


async def test_store_gone_before_the_claim(durable_redis: RedisProcess) -> None:
    """Redis down when the request arrives: 503, nothing ran; once it is back, the retry is a
    normal first run, and its retry the replay."""
    app = ChargeApp()
    gw, store = gateway(durable_redis, app)
    async with client_for(gw) as c:
        await store.open()
        try:
            durable_redis.kill()
            first = await pay(c, "before-claim")
            await restart(durable_redis)
            answered, seen = await retry_until_answered(c, "before-claim")
            again = await pay(c, "before-claim")
        finally:
            await store.close()
    assert_problem(first, 503, PROBLEM + "store-unavailable")
    assert (answered.status_code, answered.content) == (201, app.answered[0])
    assert "idempotent-replayed" not in answered.headers
    assert_replays(again, app.answered[0])
    assert len(app.answered) == 1, seen


@pytest.mark.parametrize("back_within_bound", [True, False], ids=["back-in-time", "out-too-long"])
async def test_store_killed_while_the_request_is_upstream(
    durable_redis: RedisProcess, back_within_bound: bool,
) -> None:
    """Redis SIGKILLed while the request is upstream (its claim already on disk). Back within
    completion_timeout: the client gets the whole response and every retry replays it. Out
    longer: the client's response is cut off (never a whole 201), and once Redis is back the
    retry replays the real response. The app ran once either way."""
    restarting: list[asyncio.Task[None]] = []

    async def crash() -> None:
        durable_redis.kill()
        if back_within_bound:
            restarting.append(asyncio.ensure_future(restart(durable_redis, 0.2)))

    app = ChargeApp(crash)
    gw, store = gateway(durable_redis, app, **({"completion_timeout": "5s"} if back_within_bound else {}))
    async with client_for(gw) as c:
        await store.open()
        try:
            first = await first_try(c, "while-upstream")
            if not back_within_bound:
                await restart(durable_redis)
            for task in restarting:
                await task
            answered, seen = await retry_until_answered(c, "while-upstream")
        finally:
            await store.close()
    assert len(app.answered) == 1
    assert_first_then_replays(first, answered, seen, app.answered[0], whole=back_within_bound)


@pytest.mark.parametrize("how", ["sigstop", "client-pause"])
@pytest.mark.parametrize("pause_s", [0.5, 2.0], ids=["back-in-time", "out-too-long"])
async def test_store_paused_during_the_completion(
    durable_redis: RedisProcess, how: str, pause_s: float,
) -> None:
    """Redis stops answering just as the completion is sent (SIGSTOP, or CLIENT PAUSE WRITE):
    the completion times out and is resent. Resumed within completion_timeout, the client gets
    the whole response; paused longer, its response is cut off, and the completions Redis had
    buffered run on resume. Either way every retry replays the response the app gave."""
    admin = redis.asyncio.Redis.from_url(durable_redis.url)
    resuming: list[asyncio.Task[None]] = []

    async def pause() -> None:
        if how == "sigstop":
            durable_redis.pause()

            async def resume() -> None:
                await asyncio.sleep(pause_s)
                durable_redis.resume()

            resuming.append(asyncio.ensure_future(resume()))
        else:
            await admin.execute_command("CLIENT", "PAUSE", str(int(pause_s * 1000)), "WRITE")  # type: ignore[no-untyped-call]

    app = ChargeApp()
    gw, store = gateway(durable_redis, app, before=pause)
    try:
        async with client_for(gw) as c:
            await store.open()
            try:
                first = await first_try(c, "during-completion")
                for task in resuming:
                    await task
                answered, seen = await retry_until_answered(c, "during-completion")
            finally:
                await store.close()
    finally:
        durable_redis.resume()
        await admin.aclose()
    assert len(app.answered) == 1
    assert_first_then_replays(first, answered, seen, app.answered[0], whole=pause_s < COMPLETION_TIMEOUT_S)


async def test_store_killed_right_after_the_completion(durable_redis: RedisProcess) -> None:
    """Redis SIGKILLed the moment the outcome is stored (fsynced), before the response's end
    reaches the client: the client has the whole response, and once Redis is back every retry
    replays it."""

    async def crash() -> None:
        durable_redis.kill()

    app = ChargeApp()
    gw, store = gateway(durable_redis, app, after=crash)
    async with client_for(gw) as c:
        await store.open()
        try:
            first = await pay(c, "after-completion")
            await restart(durable_redis)
            answered, seen = await retry_until_answered(c, "after-completion")
        finally:
            await store.close()
    assert (first.status_code, first.content) == (201, app.answered[0])
    assert_replays(answered, app.answered[0])
    assert len(app.answered) == 1, seen


def test_gateway_serve_cuts_off_a_response_whose_outcome_cannot_be_stored(
    durable_redis: RedisProcess, tmp_path: Path,
) -> None:
    """Over real sockets: Redis SIGKILLed while a charge is upstream and kept down past
    completion_timeout. The client gets the status line and headers but never the whole body
    (the connection closes), the upstream ran the charge once, and once Redis is back a retry
    replays exactly what the upstream answered."""
    upstream = Upstream(tmp_path)
    config = serve_config(upstream.url, durable_redis.url, unique_prefix(),
                          idempotency={"lock_ttl": "2s", "completion_timeout": "1s"})
    config["store"].update(timeout="200ms", breaker_cooldown="100ms")
    gateway_process = GatewayServe(tmp_path, config)
    headers = {"Idempotency-Key": "serve-cut-off", "X-Api-Key": "client-1"}
    try:
        for process in (upstream, gateway_process):
            process.launch()
        for process in (upstream, gateway_process):
            process.wait_ready()
        with httpx.Client(base_url=gateway_process.url, timeout=15.0, trust_env=False) as c:
            outcome: list[httpx.Response | httpx.TransportError] = []

            def charge() -> None:
                try:
                    outcome.append(c.post("/charges?delay=0.8", content=BODY, headers=headers))
                except httpx.TransportError as exc:
                    outcome.append(exc)

            caller = threading.Thread(target=charge)
            caller.start()
            wait_for(lambda: upstream.executions()["started"].get("serve-cut-off") == 1,
                     "the charge to reach the upstream")
            durable_redis.kill()
            caller.join(timeout=15.0)
            assert not caller.is_alive()
            durable_redis.start()
            deadline = time.monotonic() + SETTLE_DEADLINE_S
            seen: list[int] = []
            while True:
                r = c.post("/charges?delay=0.8", content=BODY, headers=headers)
                seen.append(r.status_code)
                if r.status_code == 201:
                    break
                assert r.status_code in (409, 502, 503), r.text
                assert time.monotonic() < deadline, seen
                time.sleep(0.1)
        executions = upstream.executions()
        cut_off_logs = [line for line in gateway_process.logs()
                        if line.get("event") == "idempotency.response_cut_off"]
    finally:
        gateway_process.stop()
        upstream.stop()
    assert isinstance(outcome[0], httpx.RemoteProtocolError | httpx.ReadError), outcome
    assert r.headers["idempotent-replayed"] == "true"
    assert r.json()["key"] == "serve-cut-off"
    assert executions["started"] == {"serve-cut-off": 1}
    assert executions["finished"] == {"serve-cut-off": 1}
    assert len(cut_off_logs) == 1
