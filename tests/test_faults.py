"""Store faults on real ``redis-server`` processes the tests start, kill, pause and restart.

CONTRACT.md "Store failures": every store call is bounded by ``store.timeout`` (100 ms, the
default, here); after ``breaker_failures`` failed calls the circuit breaker fails calls fast for
``breaker_cooldown`` instead of paying the timeout on every request; rate limits follow their
``on_store_error`` and idempotency answers 503; the gateway recovers without a restart; a claim
whose completion failed is never released. Each scenario prints its latencies (p50/p95/max over
100 requests of each kind) and recovery times: run with ``-s`` to see them. The kill under load
runs in-process and again through a real ``gateway serve`` in front of a real upstream.

Two facts about Redis shape these tests. A SIGSTOPped Redis still accepts connections (the
kernel does) and keeps what clients send; after SIGCONT it runs every command that reached its
socket before the client gave up and closed, so a timed-out call may still take effect later
(a claim, say, which the gateway therefore withdraws in the background: a release that finds no
record leaves a marker that refuses the late claim, ``lua/idempotency_release.lua``). And a
Redis without persistence forgets everything when killed; the one test that needs a claim to
survive a crash writes an RDB snapshot (``SAVE``) first, which ``start()`` loads.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import math
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import pytest
import redis.asyncio

from gateway import GatewayMiddleware
from gateway.store.scripts import read_script
from tests.asgi_helpers import (
    PROBLEM,
    CountingApp,
    assert_problem,
    client_for,
    lifespan_running,
    poll,
)
from tests.conftest import unique_prefix
from tests.redis_process import RedisProcess
from tests.serve_process import GatewayServe, Metrics, Upstream, serve_config

pytestmark = pytest.mark.slow

STORE_UNAVAILABLE = PROBLEM + "store-unavailable"

LIMIT = 1_000_000  # never reached: these tests are about the store, not the limit
BREAKER_FAILURES = 5
COOLDOWN_S = 1.0
P95_BOUND_S = 0.5
KINDS = ("open", "strict", "keyed")
PATHS = {"open": "/open", "strict": "/strict", "keyed": "/keyed"}  # in-process: CountingApp
WORKERS = 8  # concurrent requests of the background stream
ROUNDS = 10  # measured: ROUNDS x PER_ROUND requests of each kind ...
PER_ROUND = 10  # ... PER_ROUND of each kind at once (3 x PER_ROUND in flight)
ROUND_PAUSE_S = 0.2  # spreads the 300 measured requests over ~2 s: two cool-downs or more
MEASURED = "x-measured"  # a header only the measured requests carry, to tell them apart at the app
BODY = b'{"amount": 100}'
RECOVERY_DEADLINE_S = 5.0
# a keyed request caught mid-completion by the kill waits completion_timeout (10 s by default)
# for its outcome to be stored, then is cut off: a short bound lets the stream end in ~1 s
STRAGGLER_LEASE = {"lock_ttl": "2s", "completion_timeout": "1s"}
#: the status ``Load`` records for a keyed response cut off (its outcome could not be stored)
CUT_OFF = 0


# ------------------------------------------------------------------------------------ helpers
def gateway_on(
    server: RedisProcess, app: CountingApp | None = None, *,
    idempotency: dict[str, Any] | None = None, **store: Any,
) -> tuple[GatewayMiddleware, CountingApp]:
    """The whole stack on ``server``: ``/open`` under an allow-on-error policy, ``/strict``
    under a deny-on-error one, keyed POSTs anywhere (idempotency on its defaults: deny)."""
    app = app or CountingApp()
    config: dict[str, Any] = {
        "store": {"url": server.url, "key_prefix": unique_prefix(), "timeout": "100ms",
                  "breaker_failures": BREAKER_FAILURES, "breaker_cooldown": f"{COOLDOWN_S:g}s",
                  **store},
        "rate_limit": [
            {"name": "open", "limit": LIMIT, "period": "1m", "paths": ["/open"],
             "on_store_error": "allow"},
            {"name": "strict", "limit": LIMIT, "period": "1m", "paths": ["/strict"],
             "on_store_error": "deny"},
        ],
        "idempotency": idempotency or {},
        "ops": {"metrics_allow": ["0.0.0.0/0"]},  # the tests' client scrapes (not from loopback)
    }
    return GatewayMiddleware(app, config), app


def new_key() -> str:
    return f"key-{uuid.uuid4().hex}"


async def request(c: httpx.AsyncClient, kind: str, *, key: str | None = None,
                  headers: dict[str, str] | None = None,
                  paths: Mapping[str, str] = PATHS) -> httpx.Response:
    """One request of ``kind``: a GET under the allow policy, a GET under the deny policy, or
    a keyed POST (a new key unless ``key`` is given)."""
    if kind == "keyed":
        return await c.post(paths[kind], content=BODY,
                            headers={"Idempotency-Key": key or new_key(), **(headers or {})})
    return await c.get(paths[kind], headers=headers)


async def timed(c: httpx.AsyncClient, kind: str, paths: Mapping[str, str]) -> tuple[httpx.Response, float]:
    start = time.perf_counter()
    r = await request(c, kind, headers={MEASURED: "1"}, paths=paths)
    return r, time.perf_counter() - start


async def measure(
    c: httpx.AsyncClient, paths: Mapping[str, str] = PATHS, *,
    rounds: int = ROUNDS, per_round: int = PER_ROUND, pause_s: float = ROUND_PAUSE_S,
) -> dict[str, list[tuple[httpx.Response, float]]]:
    """``rounds`` rounds of ``per_round`` requests of every kind at once, a pause between
    rounds; each request timed on its own."""
    out: dict[str, list[tuple[httpx.Response, float]]] = {kind: [] for kind in KINDS}
    for _ in range(rounds):
        batch = [(kind, timed(c, kind, paths)) for kind in KINDS for _ in range(per_round)]
        results = await asyncio.gather(*(coro for _, coro in batch))
        for (kind, _), result in zip(batch, results, strict=True):
            out[kind].append(result)
        await asyncio.sleep(pause_s)
    return out


async def warm_up(c: httpx.AsyncClient, tries: int = 5) -> None:
    """One round of every kind at once, all answered 200, so a connection is pooled for each
    (a round again if a cold connection missed the 100 ms bound on a busy machine)."""
    for _ in range(tries):
        warm = await asyncio.gather(*(request(c, kind) for kind in KINDS for _ in range(PER_ROUND)))
        if {r.status_code for r in warm} == {200}:
            return
    raise AssertionError(f"no round of {len(KINDS) * PER_ROUND} requests all answered 200")


def p95(latencies: list[float]) -> float:
    return statistics.quantiles(latencies, n=100, method="inclusive")[94]


def report(scenario: str, kind: str, latencies: list[float]) -> float:
    """Print p50/p95/max of ``latencies``; return the p95."""
    high = p95(latencies)
    print(f"[faults] {scenario:<8} {kind:<7} n={len(latencies)} "
          f"p50={statistics.median(latencies) * 1000:.1f}ms p95={high * 1000:.1f}ms "
          f"max={max(latencies) * 1000:.1f}ms")
    return high


def measured_calls(app: CountingApp) -> Counter[str]:
    """How many measured requests reached the app, by path."""
    return Counter(s["path"] for s in app.scopes
                   if s["type"] == "http" and (MEASURED.encode(), b"1") in s["headers"])


async def scrape(c: httpx.AsyncClient) -> Metrics:
    r = await c.get("/_gateway/metrics")
    assert r.status_code == 200
    return Metrics.parse(r.text)


def store_attempts(m: Metrics) -> float:
    """Failed store calls that went to the network (timeouts, refused or broken connections),
    as opposed to those the open breaker refused without a call."""
    return m.value("gateway_store_errors_total", kind="timeout") + m.value(
        "gateway_store_errors_total", kind="unavailable")


def breaker(m: Metrics) -> str:
    """The state the breaker gauge shows (exactly one state at 1)."""
    states = [s for s in ("closed", "open", "half_open")
              if m.value("gateway_store_breaker_state", state=s) == 1]
    assert len(states) == 1, states
    return states[0]


async def ready(c: httpx.AsyncClient) -> bool:
    return (await c.get("/_gateway/readyz")).status_code == 200


async def wait_ready(c: httpx.AsyncClient, since: float) -> float:
    """Poll readyz (bounded) until 200; the seconds from ``since``."""
    await poll(lambda: ready(c), deadline_s=RECOVERY_DEADLINE_S, every_s=0.05)
    return time.perf_counter() - since


def script_shas(*names: str) -> list[str]:
    return [hashlib.sha1(read_script(n).encode()).hexdigest() for n in names]


def events(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == event]


def assert_allowed_unchecked(r: httpx.Response) -> None:
    """An allow-on-error request passed: the app's 200, the policy named, no made-up count."""
    assert r.status_code == 200, r.text
    assert "ratelimit" not in r.headers
    assert r.headers["ratelimit-policy"] == f'"open";q={LIMIT};w=60'


def assert_store_unavailable(r: httpx.Response) -> None:
    assert_problem(r, 503, STORE_UNAVAILABLE)
    assert r.headers["retry-after"] == "1"
    assert "ratelimit" not in r.headers


def check_outage_answers(scenario: str, results: dict[str, list[tuple[httpx.Response, float]]]) -> None:
    """Allow-policy requests passed; deny-policy and keyed ones got 503; p95 of each < 0.5 s."""
    for r, _ in results["open"]:
        assert_allowed_unchecked(r)
    for r, _ in results["strict"] + results["keyed"]:
        assert_store_unavailable(r)
    highs = {kind: report(scenario, kind, [t for _, t in results[kind]]) for kind in KINDS}
    assert max(highs.values()) < P95_BOUND_S, highs


def check_app_calls(app: CountingApp, results: dict[str, list[tuple[httpx.Response, float]]]) -> None:
    """The app ran every measured allow-policy request and nothing else that was measured."""
    assert all(r.text == "ok" for r, _ in results["open"])
    assert measured_calls(app) == {"/open": ROUNDS * PER_ROUND}


def assert_decided(statuses: list[tuple[str, int]], ok: set[int]) -> None:
    """With Redis up, the stream is decided: every kind got through, and at most 1 in 20
    missed the 100 ms bound (a busy 2-core machine may make a cold connection that slow)."""
    assert {kind for kind, s in statuses if s in ok} == set(KINDS)
    missed = [s for _, s in statuses if s not in ok]
    assert set(missed) <= {503}
    assert len(missed) * 20 <= len(statuses), Counter(statuses)


class Load:
    """``workers`` tasks sending open, strict and keyed requests in turn, until stopped; each
    response's status is kept. ``finish()`` stops them and waits (bounded) for the last."""

    def __init__(self, client: httpx.AsyncClient, workers: int = WORKERS,
                 paths: Mapping[str, str] = PATHS) -> None:
        self._client = client
        self._paths = paths
        self._stop = asyncio.Event()
        self.statuses: list[tuple[str, int]] = []
        self._tasks = [asyncio.ensure_future(self._work(i)) for i in range(workers)]

    async def _work(self, first: int) -> None:
        for n in itertools.count(first):
            if self._stop.is_set():
                return
            kind = KINDS[n % len(KINDS)]
            try:
                r = await request(self._client, kind, paths=self._paths)
            except (httpx.RemoteProtocolError, httpx.ReadError):  # closed, or reset, mid-response
                if kind != "keyed":
                    raise
                self.statuses.append((kind, CUT_OFF))  # caught mid-completion by the fault
                continue
            self.statuses.append((kind, r.status_code))
            await asyncio.sleep(0.002)  # a stream, not a spin

    async def until(self, count: int, deadline_s: float = 10.0) -> None:
        """Wait until ``count`` responses in all have come back."""
        await poll(lambda: len(self.statuses) >= count, deadline_s=deadline_s)

    def stop(self) -> None:
        self._stop.set()

    async def finish(self, deadline_s: float = 20.0) -> None:
        self.stop()
        try:
            async with asyncio.timeout(deadline_s):
                await asyncio.gather(*self._tasks)
        finally:
            for task in self._tasks:
                task.cancel()

    async def __aenter__(self) -> Load:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.finish()


# ------------------------------------------------------------------------------------ killed
async def test_redis_killed_under_load(dedicated_redis: RedisProcess) -> None:
    """SIGKILL Redis under a stream of requests: allow-policy requests pass (200, upstream
    called, RateLimit-Policy but no RateLimit), deny-policy and keyed ones get 503
    store-unavailable with Retry-After, p95 of each under 0.5 s over 100; the breaker opens,
    refuses calls without the network, and the store is tried a bounded number of times (the
    calls that opened it, those already in flight, one probe per cool-down), not once a request."""
    gw, app = gateway_on(dedicated_redis, idempotency=STRAGGLER_LEASE)
    async with lifespan_running(gw), client_for(gw) as c:
        load = Load(c)
        try:
            await load.until(60)
            assert_decided(load.statuses, {200})
            before = len(load.statuses)
            killed_at = time.perf_counter()
            dedicated_redis.kill()
            await load.until(before + 60)
            assert breaker(await scrape(c)) == "open"
            load.stop()  # keyed requests caught mid-completion finish in the background
            results = await measure(c)
            m = await scrape(c)
            elapsed = time.perf_counter() - killed_at
        finally:
            await load.finish()
    assert {s for _, s in load.statuses} <= {200, 503, CUT_OFF}
    assert {kind for kind, s in load.statuses if s == CUT_OFF} <= {"keyed"}
    check_outage_answers("killed", results)
    check_app_calls(app, results)
    attempts = store_attempts(m)
    circuit_open = m.value("gateway_store_errors_total", kind="circuit_open")
    probes = math.ceil(elapsed / COOLDOWN_S) + 1
    bound = BREAKER_FAILURES + WORKERS + probes
    print(f"[faults] killed   store attempts={attempts:g} (bound {bound}) "
          f"circuit_open={circuit_open:g} opened={m.value('gateway_store_breaker_opened_total'):g} "
          f"over {elapsed:.1f}s")
    assert m.value("gateway_store_breaker_opened_total") >= 1
    assert m.value("gateway_store_errors_total", operation="ratelimit_take", kind="circuit_open") > 0
    assert m.value("gateway_store_errors_total", operation="idempotency_claim", kind="circuit_open") > 0
    assert 1 <= attempts <= bound
    assert m.value("gateway_ratelimit_decisions_total", policy="open", decision="error") >= 100
    assert m.value("gateway_ratelimit_decisions_total", policy="strict", decision="error") >= 100
    assert m.value("gateway_idempotency_outcomes_total", outcome="store_error") >= 100


SERVE_PATHS = {"open": "/echo/open", "strict": "/echo/strict", "keyed": "/charges"}


async def test_redis_killed_under_load_through_gateway_serve(
    dedicated_redis: RedisProcess, tmp_path: Path
) -> None:
    """The same kill under load through a real ``gateway serve`` process in front of a real
    upstream, on the wire: allow-policy requests reach the upstream, deny-policy and keyed ones
    get 503 with p95 under 0.5 s, /_gateway/metrics shows the breaker open and counts the
    refused calls, the JSON log says it opened, and the upstream ran exactly the keyed requests
    that got its 201 (none of those answered 503)."""
    upstream = Upstream(tmp_path)
    config = serve_config(upstream.url, dedicated_redis.url, unique_prefix(), rate_limit=[
        {"name": "open", "limit": LIMIT, "period": "1m", "paths": ["/echo/open"],
         "on_store_error": "allow"},
        {"name": "strict", "limit": LIMIT, "period": "1m", "paths": ["/echo/strict"],
         "on_store_error": "deny"},
    ])
    config["store"].update(timeout="100ms", breaker_failures=BREAKER_FAILURES,
                           breaker_cooldown=f"{COOLDOWN_S:g}s")
    config["idempotency"] = STRAGGLER_LEASE
    gateway = GatewayServe(tmp_path, config)
    try:
        for process in (upstream, gateway):
            process.launch()  # the cold starts overlap
        for process in (upstream, gateway):
            process.wait_ready()
        async with httpx.AsyncClient(base_url=gateway.url, timeout=10.0, trust_env=False) as c:
            load = Load(c, paths=SERVE_PATHS)
            try:
                await load.until(60)
                assert_decided(load.statuses, {200, 201})
                before = len(load.statuses)
                killed_at = time.perf_counter()
                dedicated_redis.kill()
                await load.until(before + 60)
                assert breaker(await scrape(c)) == "open"
                load.stop()
                # half the in-process concurrency: over real sockets on 2 cores, 30 requests
                # at once would mostly time the test client's own queue
                results = await measure(c, SERVE_PATHS, rounds=2 * ROUNDS, per_round=PER_ROUND // 2,
                                        pause_s=ROUND_PAUSE_S / 2)
                m = await scrape(c)
                elapsed = time.perf_counter() - killed_at
            finally:
                await load.finish()
        started = upstream.executions()["started"]
        opened = [line for line in gateway.logs() if line.get("event") == "store.breaker_opened"]
    finally:
        gateway.stop()
        upstream.stop()
    check_outage_answers("serve", results)
    attempts = store_attempts(m)
    bound = BREAKER_FAILURES + WORKERS + math.ceil(elapsed / COOLDOWN_S) + 1
    print(f"[faults] serve    store attempts={attempts:g} (bound {bound}) "
          f"circuit_open={m.value('gateway_store_errors_total', kind='circuit_open'):g} over {elapsed:.1f}s")
    assert 1 <= attempts <= bound
    assert all(r.json()["raw_path"] == "/echo/open" for r, _ in results["open"])  # upstream echo
    # each keyed run got its 201, or was cut off (caught mid-completion): none answered 503
    assert sum(1 for kind, s in load.statuses if kind == "keyed" and s in (201, CUT_OFF)) == len(started)
    assert set(started.values()) == {1}
    assert opened
    assert opened[0]["level"] == "warning"
    assert m.value("gateway_store_breaker_opened_total") >= 1
    assert m.value("gateway_store_errors_total", operation="ratelimit_take", kind="circuit_open") > 0
    assert m.value("gateway_store_errors_total", operation="idempotency_claim", kind="circuit_open") > 0
    assert m.value("gateway_requests_total", code="503") >= 2 * ROUNDS * PER_ROUND


# ------------------------------------------------------------------------------------ restarted
async def test_restarted_empty_redis_recovers_and_readyz_shows_the_breaker(
    dedicated_redis: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis killed until the breaker opens (readyz: 503 with ``"breaker": "open"`` and
    Retry-After, at once, without a store call), then started empty on the same port (no data,
    no scripts): within a few seconds and without a gateway restart readyz is 200 again with the
    breaker closed, rate limits decide on fresh buckets (scripts reloaded) and keyed requests run.
    A key completed before the crash runs again: a Redis without persistence forgot it, which is
    what the contract says such a store risks."""
    gw, app = gateway_on(dedicated_redis)
    observer = None
    with caplog.at_level(logging.INFO, logger="gateway"):
        async with lifespan_running(gw), client_for(gw) as c:
            r = await c.get("/_gateway/readyz")
            assert r.status_code == 200
            assert r.json() == {"status": "ready", "breaker": "closed"}
            assert (await request(c, "strict")).status_code == 200
            key = new_key()
            assert (await request(c, "keyed", key=key)).status_code == 200
            assert app.calls == 2

            dedicated_redis.kill()
            for _ in range(BREAKER_FAILURES):
                assert_store_unavailable(await request(c, "strict"))
            assert breaker(await scrape(c)) == "open"
            pings_refused = (await scrape(c)).value(
                "gateway_store_errors_total", operation="ping", kind="circuit_open")
            r = await c.get("/_gateway/readyz")
            body = assert_problem(r, 503, STORE_UNAVAILABLE)
            assert body["breaker"] == "open"
            assert r.headers["retry-after"]
            m = await scrape(c)
            assert m.value("gateway_store_errors_total", operation="ping",
                           kind="circuit_open") == pings_refused + 1

            dedicated_redis.start()
            recovery = await wait_ready(c, time.perf_counter())
            print(f"[faults] restart  readyz 200 again {recovery * 1000:.0f}ms after Redis came "
                  f"back (cool-down {COOLDOWN_S:g}s)")
            r = await c.get("/_gateway/readyz")
            assert r.json() == {"status": "ready", "breaker": "closed"}
            assert breaker(await scrape(c)) == "closed"

            observer = redis.asyncio.Redis.from_url(dedicated_redis.url)
            try:
                shas = script_shas("ratelimit_take", "idempotency_claim", "idempotency_complete")
                assert await observer.script_exists(*shas) == [False, False, False]
                r = await request(c, "strict")
                assert r.status_code == 200
                assert r.headers["ratelimit"] == f'"strict";r={LIMIT - 1};t=1'  # a fresh bucket
                again = await request(c, "keyed", key=key)
                assert again.status_code == 200
                assert "idempotent-replayed" not in again.headers
                assert app.calls == 4  # the forgotten key ran again
                replay = await request(c, "keyed", key=key)
                assert replay.status_code == 200
                assert replay.headers["idempotent-replayed"] == "true"
                assert app.calls == 4
                assert await observer.script_exists(*shas) == [True, True, True]
            finally:
                await observer.aclose()
    assert recovery < RECOVERY_DEADLINE_S
    opened = events(caplog, "store.breaker_opened")
    assert opened
    assert opened[0].levelno == logging.WARNING
    assert events(caplog, "store.breaker_closed")


# ------------------------------------------------------------------------------------ flush
async def test_script_flush_mid_run_costs_no_request(dedicated_redis: RedisProcess) -> None:
    """SCRIPT FLUSH five times under a stream of requests: not one 503 (a NOSCRIPT reloads the
    script in the same call), no store error counted, the scripts are loaded again afterwards
    and a key completed before the flushes still replays (flushing scripts keeps the data)."""
    # a looser bound than the default: on 2 noisy cores a slow call must not pass for a NOSCRIPT
    gw, _ = gateway_on(dedicated_redis, timeout="1s")
    observer = redis.asyncio.Redis.from_url(dedicated_redis.url)
    try:
        async with lifespan_running(gw), client_for(gw) as c:
            key = new_key()
            assert (await request(c, "keyed", key=key)).status_code == 200
            async with Load(c) as load:
                for _ in range(5):
                    await load.until(len(load.statuses) + 30)
                    await observer.script_flush()
                await load.until(len(load.statuses) + 30)
            replay = await request(c, "keyed", key=key)
            m = await scrape(c)
        shas = script_shas("ratelimit_take", "idempotency_claim", "idempotency_complete")
        assert await observer.script_exists(*shas) == [True, True, True]
    finally:
        await observer.aclose()
    statuses = Counter(load.statuses)
    print(f"[faults] flush    {sum(statuses.values())} requests across 5 SCRIPT FLUSH: {dict(statuses)}")
    assert {s for _, s in statuses} == {200}
    assert {k for k, _ in statuses} == set(KINDS)
    assert replay.status_code == 200
    assert replay.headers["idempotent-replayed"] == "true"
    assert m.value("gateway_store_errors_total") == 0
    assert m.value("gateway_store_breaker_opened_total") == 0


# ------------------------------------------------------------------------------------ paused
async def test_paused_redis_is_bounded_by_the_timeout(dedicated_redis: RedisProcess) -> None:
    """A Redis that accepts connections and never answers (SIGSTOP): allow-policy requests
    pass, deny-policy and keyed ones get 503, p95 of each under 0.5 s over 100 (a call costs at
    most the 100 ms timeout, and once the breaker opens nothing); readyz says 503 with the
    breaker's state; the store is tried a bounded number of times; after SIGCONT readyz is 200
    within a few seconds and requests are decided again."""
    gw, app = gateway_on(dedicated_redis)
    async with lifespan_running(gw), client_for(gw) as c:
        # as under load, a connection pooled for each request of a round: the pause hits
        # established connections (the kernel keeps what is sent on them), not only new ones
        await warm_up(c)
        with dedicated_redis.paused():
            paused_at = time.perf_counter()
            results = await measure(c)
            started = time.perf_counter()
            r = await c.get("/_gateway/readyz")
            readyz_s = time.perf_counter() - started
            m = await scrape(c)
            elapsed = time.perf_counter() - paused_at
        body = assert_problem(r, 503, STORE_UNAVAILABLE)
        assert body["breaker"] in ("open", "half_open")
        recovery = await wait_ready(c, time.perf_counter())
        print(f"[faults] paused   readyz 503 in {readyz_s * 1000:.1f}ms while paused; 200 again "
              f"{recovery * 1000:.0f}ms after SIGCONT")
        r = await request(c, "strict")
        assert r.status_code == 200
        assert r.headers["ratelimit"].startswith('"strict";r=')
        assert (await request(c, "keyed")).status_code == 200
    check_outage_answers("paused", results)
    check_app_calls(app, results)
    assert readyz_s < 0.5
    attempts = store_attempts(m)
    timeouts = m.value("gateway_store_errors_total", kind="timeout")
    probes = math.ceil(elapsed / COOLDOWN_S) + 1
    bound = BREAKER_FAILURES + len(KINDS) * PER_ROUND + probes
    # the first call on the silent connection times out; the calls waiting behind it on the
    # same (pipelined) connection fail with it as soon as it is given up (kind "unavailable")
    lost = m.value("gateway_store_errors_total", kind="unavailable")
    print(f"[faults] paused   store attempts={attempts:g} (timeouts {timeouts:g}, lost {lost:g}, "
          f"bound {bound}) circuit_open={m.value('gateway_store_errors_total', kind='circuit_open'):g} "
          f"over {elapsed:.1f}s")
    assert timeouts >= 1
    assert timeouts + lost >= BREAKER_FAILURES
    assert attempts <= bound
    assert m.value("gateway_store_errors_total", kind="circuit_open") > 0
    assert m.value("gateway_store_breaker_opened_total") >= 1


async def test_a_key_answered_503_while_redis_was_paused_runs_when_retried(
    dedicated_redis: RedisProcess,
) -> None:
    """A keyed request answered 503 ("the request was not run ... retry later") while Redis was
    paused: its claim, sent before the timeout, lands when Redis resumes, and the gateway frees
    it (nothing ran under it), so once Redis answers again the retry with the same key runs it,
    once, instead of meeting a claim nobody holds (409, then 502 outcome-unknown)."""
    gw, app = gateway_on(dedicated_redis, idempotency={"lock_ttl": "1s"})
    key = new_key()
    async with lifespan_running(gw), client_for(gw) as c:
        assert (await request(c, "keyed")).status_code == 200  # a pooled connection
        with dedicated_redis.paused():
            assert_store_unavailable(await request(c, "keyed", key=key))
        await wait_ready(c, time.perf_counter())
        seen = []
        end = time.monotonic() + 5.0
        while time.monotonic() < end:
            r = await request(c, "keyed", key=key)
            seen.append(r.status_code)
            if r.status_code not in (409, 503):
                break
            await asyncio.sleep(0.1)
        print(f"[faults] retry of a key answered 503 while paused: {seen}")
    assert r.status_code == 200, seen
    assert "idempotent-replayed" not in r.headers
    assert app.calls == 2


async def test_keys_answered_503_while_redis_was_paused_under_load_run_when_retried(
    dedicated_redis: RedisProcess,
) -> None:
    """Redis paused for ~2.5 s under load (connections pooled, as under load, so the first
    claims reach Redis's socket and land when it resumes): every keyed request was answered 503
    ("not run, retry later"), so once Redis is back each retry with the same key must run it,
    also after ``lock_ttl`` has passed (a claim left to lapse would answer 502 outcome-unknown
    for a request that never ran)."""
    gw, app = gateway_on(dedicated_redis, idempotency={"lock_ttl": "1s"})
    async with lifespan_running(gw), client_for(gw) as c:
        await warm_up(c)
        with dedicated_redis.paused():
            results = await measure(c)
        await wait_ready(c, time.perf_counter())
        assert await gw._idempotency.drain(5.0)  # the background frees have ended
        await asyncio.sleep(1.2)  # past lock_ttl: a claim nobody freed has lapsed
        before = app.calls
        keys = [r.request.headers["idempotency-key"] for r, _ in results["keyed"]]
        retried = [await request(c, "keyed", key=key) for key in keys]
    statuses = Counter(r.status_code for r in retried)
    print(f"[faults] paused   retries of the {len(keys)} keys answered 503: {dict(statuses)}")
    for r, _ in results["keyed"]:
        assert_store_unavailable(r)
    assert statuses == {200: len(keys)}
    assert app.calls == before + len(keys)


# A claim caught by a fault, moment by moment (claim, upstream, completion): test_store_fault_phases.py
