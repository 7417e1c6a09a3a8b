"""``/_gateway/*`` and the metrics, in-process through GatewayMiddleware.

The endpoints answer without reaching the app or the rate limit; the counters and histograms
count exactly what the test made happen (read from the registry or scraped from
``/_gateway/metrics``); two stacks keep separate registries; under
``PROMETHEUS_MULTIPROC_DIR`` a scrape sums every process's counts.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway._asgi import Receive, Scope, Send
from gateway.config import load_config
from gateway.stack import GatewayMiddleware
from tests.asgi_helpers import (
    PROBLEM,
    CountingApp,
    answer_lifespan,
    assert_problem,
    client_for,
    lifespan_running,
    poll,
)
from tests.conftest import require_redis_server, unique_prefix
from tests.redis_process import HOST, RedisProcess, free_port

KEY = "Idempotency-Key"
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
REPO_ROOT = Path(__file__).resolve().parent.parent
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# --------------------------------------------------------------------------------------------
# apps, stack, metrics readers
# --------------------------------------------------------------------------------------------


class HoldApp:
    """Reads the body, then (from the first call on) waits for ``release`` before answering 200."""

    def __init__(self) -> None:
        self.calls = 0
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send, [])
            return
        self.calls += 1
        while (await receive()).get("more_body", False):
            pass
        self.entered.set()
        async with asyncio.timeout(10):
            await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"held"})


class SleepApp:
    """Answers 200 after ``seconds``: the app's own share of the latency."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send, [])
            return
        await asyncio.sleep(self.seconds)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"slept"})


def gateway(app: Any, store: Mapping[str, Any], **sections: Any) -> GatewayMiddleware:
    """GatewayMiddleware around ``app`` with ``[store]`` = ``store`` and the other sections given;
    metrics readable from any address (the exposure itself: tests/test_ops_exposure.py)."""
    sections.setdefault("ops", {"metrics_allow": ["0.0.0.0/0", "::/0"]})
    return GatewayMiddleware(app, load_config({"store": dict(store), **sections}, env={}))


def policy(name: str, limit: int, **extra: Any) -> dict[str, Any]:
    return {"name": name, "limit": limit, "period": "60s", **extra}


def dead_store() -> dict[str, Any]:
    """A [store] on a loopback port nobody listens on: every call fails at once."""
    return {"url": f"redis://{HOST}:{free_port()}/0", "timeout": "200ms", "key_prefix": unique_prefix()}


@asynccontextmanager
async def serving(app: GatewayMiddleware) -> AsyncIterator[httpx.AsyncClient]:
    """Lifespan startup, a client for the block, then shutdown (the store closed)."""
    async with lifespan_running(app), client_for(app) as client:
        yield client


def value(gw: GatewayMiddleware, name: str, **labels: str) -> float:
    """One sample of ``gw``'s registry; 0 when the series does not exist."""
    return gw.metrics.registry.get_sample_value(name, labels) or 0.0


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def scrape(client: httpx.AsyncClient) -> Samples:
    """Every sample ``/_gateway/metrics`` reports."""
    r = await client.get("/_gateway/metrics")
    assert r.status_code == 200
    return parse(r.text)


def at(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


MEMORY = {"url": "memory://", "timeout": "2s"}


# --------------------------------------------------------------------------------------------
# the endpoints
# --------------------------------------------------------------------------------------------


class TestEndpoints:
    async def test_healthz(self) -> None:
        """GET /_gateway/healthz is 200 {"status":"ok"} as uncached JSON with an X-Request-Id."""
        async with serving(gateway(CountingApp(), MEMORY)) as c:
            r = await c.get("/_gateway/healthz")
        assert r.status_code == 200
        assert r.json() == {"status": "ok"}
        assert r.headers["content-type"] == "application/json"
        assert r.headers["cache-control"] == "no-store"
        assert r.headers["content-length"] == str(len(r.content))
        assert r.headers["x-request-id"]

    async def test_readyz_with_a_working_store(self, store_section: dict[str, Any]) -> None:
        """GET /_gateway/readyz is 200 {"status":"ready"} when the store answers a PING."""
        gw = gateway(CountingApp(), store_section)
        async with serving(gw) as c:
            r = await c.get("/_gateway/readyz")
        assert r.status_code == 200
        assert r.json() == {"status": "ready", "breaker": "closed"}
        assert value(gw, "gateway_store_latency_seconds_count", operation="ping") == 1

    async def test_readyz_503_until_the_store_answers(self) -> None:
        """readyz is a 503 store-unavailable while nothing listens at the store's address, and 200
        once a Redis starts there."""
        require_redis_server()
        port = free_port()
        store = {"url": f"redis://{HOST}:{port}/0", "timeout": "200ms", "key_prefix": unique_prefix()}
        gw = gateway(CountingApp(), store)
        redis: RedisProcess | None = None
        try:
            async with serving(gw) as c:
                down = await c.get("/_gateway/readyz")
                redis = RedisProcess(port=port)
                await asyncio.to_thread(redis.start)
                end = time.monotonic() + 10
                while (up := await c.get("/_gateway/readyz")).status_code != 200:
                    assert time.monotonic() < end, up.text
                    await asyncio.sleep(0.02)
        finally:
            if redis is not None:
                redis.cleanup()
        assert_problem(down, 503, PROBLEM + "store-unavailable")
        assert down.headers["retry-after"] == "1"
        assert up.json() == {"status": "ready", "breaker": "closed"}

    async def test_metrics_endpoint(self) -> None:
        """GET /_gateway/metrics is Prometheus text 0.0.4 naming every family the contract lists,
        each policy's decisions exported from the start."""
        gw = gateway(CountingApp(), MEMORY, rate_limit=[policy("per-client", 10)])
        async with serving(gw) as c:
            r = await c.get("/_gateway/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"] == METRICS_CONTENT_TYPE
        assert r.headers["x-request-id"]
        families = {f.name: f.type for f in text_string_to_metric_families(r.text)}
        assert families.items() >= {
            "gateway_requests": "counter",
            "gateway_ratelimit_decisions": "counter",
            "gateway_idempotency_outcomes": "counter",
            "gateway_store_latency_seconds": "histogram",
            "gateway_upstream_latency_seconds": "histogram",
            "gateway_added_latency_seconds": "histogram",
            "gateway_upstream_errors": "counter",
        }.items()
        samples = parse(r.text)
        for decision in ("allow", "deny", "error"):
            key = ("gateway_ratelimit_decisions_total",
                   frozenset({("policy", "per-client"), ("decision", decision)}))
            assert samples[key] == 0

    @pytest.mark.parametrize("path", ["/_gateway/x", "/_gateway", "/_gateway/", "/_gateway/healthz/",
                                      "/_gateway/healthz/x", "/_gateway/Healthz"])
    async def test_unknown_ops_path_is_404(self, path: str) -> None:
        """Any other path under /_gateway is a 404 problem, never the app's."""
        app = CountingApp()
        async with serving(gateway(app, MEMORY)) as c:
            r = await c.get(path)
        assert_problem(r, 404, PROBLEM + "not-found")
        assert app.calls == 0

    @pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
    @pytest.mark.parametrize("name", ["healthz", "readyz", "metrics"])
    async def test_other_methods_are_405(self, method: str, name: str) -> None:
        """Methods other than GET and HEAD on an endpoint are a 405 with Allow: GET, HEAD."""
        app = CountingApp()
        async with serving(gateway(app, MEMORY)) as c:
            r = await c.request(method, f"/_gateway/{name}", content=b"x", headers={KEY: "k"})
        assert_problem(r, 405, PROBLEM + "method-not-allowed")
        assert r.headers["allow"] == "GET, HEAD"
        assert app.calls == 0

    async def test_head(self) -> None:
        """HEAD on each endpoint is its GET's status and headers without a body."""
        async with serving(gateway(CountingApp(), MEMORY)) as c:
            health = await c.head("/_gateway/healthz")
            ready = await c.head("/_gateway/readyz")
            metrics = await c.head("/_gateway/metrics")
        assert (health.status_code, health.content) == (200, b"")
        assert health.headers["content-length"] == str(len(b'{"status":"ok"}'))
        assert (ready.status_code, ready.content) == (200, b"")
        assert (metrics.status_code, metrics.content) == (200, b"")
        assert metrics.headers["content-type"] == METRICS_CONTENT_TYPE

    async def test_never_rate_limited(self) -> None:
        """With a limit of 1 on "/", ten healthz calls are all 200 and take no token: the first
        ordinary request still passes."""
        gw = gateway(CountingApp(), MEMORY, rate_limit=[policy("one", 1)])
        async with serving(gw) as c:
            health = [await c.get("/_gateway/healthz") for _ in range(10)]
            first = await c.get("/")
            second = await c.get("/")
        assert [r.status_code for r in health] == [200] * 10
        assert all("ratelimit" not in r.headers for r in health)
        assert (first.status_code, second.status_code) == (200, 429)
        assert value(gw, "gateway_store_latency_seconds_count", operation="ratelimit_take") == 2

    async def test_never_reach_the_app_nor_the_counts(self) -> None:
        """Ops requests (answered, 404 or 405) never reach the app and are not counted as requests."""
        app = CountingApp()
        gw = gateway(app, MEMORY)
        async with serving(gw) as c:
            for path in ("/_gateway/healthz", "/_gateway/readyz", "/_gateway/metrics", "/_gateway/nope"):
                await c.get(path)
            await c.post("/_gateway/healthz", content=b"x", headers={KEY: "k"})
            samples = await scrape(c)
        assert app.calls == 0
        assert not [k for k in samples if k[0] == "gateway_requests_total"]
        assert at(samples, "gateway_added_latency_seconds_count") == 0
        assert at(samples, "gateway_upstream_latency_seconds_count") == 0
        assert sum(v for k, v in samples.items() if k[0] == "gateway_idempotency_outcomes_total") == 0

    @pytest.mark.parametrize("path", ["/_gatewayx", "/_gateway-x/healthz", "/x/_gateway/healthz",
                                      "/_GATEWAY/healthz"])
    async def test_prefix_is_by_segment(self, path: str) -> None:
        """Paths that only look like /_gateway (not that segment) reach the app and are counted."""
        app = CountingApp()
        gw = gateway(app, MEMORY)
        async with serving(gw) as c:
            r = await c.get(path)
        assert (r.status_code, r.content) == (200, b"ok")
        assert app.calls == 1
        assert value(gw, "gateway_requests_total", code="200") == 1

    @pytest.mark.parametrize("path", ["/_gateway/healthz", "/_gateway/readyz", "/_gateway/metrics",
                                      "/_gateway/nope"])
    async def test_request_id_echoed(self, path: str) -> None:
        """Every ops response echoes a well-formed X-Request-Id the client sent."""
        async with serving(gateway(CountingApp(), MEMORY)) as c:
            given = await c.get(path, headers={"X-Request-Id": "ops-check-1"})
            made = await c.get(path)
        assert given.headers.get_list("x-request-id") == ["ops-check-1"]
        assert len(made.headers.get_list("x-request-id")) == 1
        assert made.headers["x-request-id"] != "ops-check-1"


# --------------------------------------------------------------------------------------------
# what the metrics count
# --------------------------------------------------------------------------------------------


class TestCounts:
    async def test_allowed_and_denied_requests(self, store_section: dict[str, Any]) -> None:
        """3 allowed and 2 denied requests count as 3 code=200, 2 code=429, 3 allow and 2 deny
        decisions, 3 upstream timings, 5 added-latency timings and 4 ratelimit_take calls (the
        second denial is answered from the local deny cache)."""
        app = CountingApp()
        gw = gateway(app, store_section, rate_limit=[policy("per-client", 3)])
        async with serving(gw) as c:
            codes = [(await c.get("/things")).status_code for _ in range(5)]
            s = await scrape(c)
        assert codes == [200, 200, 200, 429, 429]
        assert app.calls == 3
        assert at(s, "gateway_requests_total", code="200") == 3
        assert at(s, "gateway_requests_total", code="429") == 2
        assert at(s, "gateway_ratelimit_decisions_total", policy="per-client", decision="allow") == 3
        assert at(s, "gateway_ratelimit_decisions_total", policy="per-client", decision="deny") == 2
        assert at(s, "gateway_ratelimit_decisions_total", policy="per-client", decision="error") == 0
        assert at(s, "gateway_upstream_latency_seconds_count") == 3
        assert at(s, "gateway_added_latency_seconds_count") == 5
        assert at(s, "gateway_store_latency_seconds_count", operation="ratelimit_take") == 4

    async def test_two_policies_one_violated(self, store_section: dict[str, Any]) -> None:
        """With two matched policies, an allowed request is an allow for each; a denied one is a deny
        only for the violated policy and an allow for neither; an unmatched policy counts nothing."""
        gw = gateway(CountingApp(), store_section, rate_limit=[
            policy("wide", 100), policy("narrow", 1), policy("admin", 1, paths=["/admin"]),
        ])
        async with serving(gw) as c:
            codes = [(await c.get("/x")).status_code for _ in range(2)]
        assert codes == [200, 429]
        counts = {(p, d): value(gw, "gateway_ratelimit_decisions_total", policy=p, decision=d)
                  for p in ("wide", "narrow", "admin") for d in ("allow", "deny", "error")}
        assert counts == {
            ("wide", "allow"): 1, ("wide", "deny"): 0, ("wide", "error"): 0,
            ("narrow", "allow"): 1, ("narrow", "deny"): 1, ("narrow", "error"): 0,
            ("admin", "allow"): 0, ("admin", "deny"): 0, ("admin", "error"): 0,
        }

    @pytest.mark.parametrize(("first", "second", "status"), [
        ("allow", "allow", 200), ("deny", "deny", 503), ("allow", "deny", 503),
    ])
    async def test_store_failure_is_an_error_per_matched_policy(
        self, first: str, second: str, status: int
    ) -> None:
        """A failed store is decision="error" for each matched policy whatever on_store_error then
        did, never allow or deny; the failed call is timed too."""
        gw = gateway(CountingApp(), dead_store(), rate_limit=[
            policy("a", 10, on_store_error=first), policy("b", 10, on_store_error=second),
            policy("admin", 10, paths=["/admin"]),
        ])
        async with serving(gw) as c:
            r = await c.get("/x")
        assert r.status_code == status
        counts = {(p, d): value(gw, "gateway_ratelimit_decisions_total", policy=p, decision=d)
                  for p in ("a", "b", "admin") for d in ("allow", "deny", "error")}
        assert counts == {
            ("a", "allow"): 0, ("a", "deny"): 0, ("a", "error"): 1,
            ("b", "allow"): 0, ("b", "deny"): 0, ("b", "error"): 1,
            ("admin", "allow"): 0, ("admin", "deny"): 0, ("admin", "error"): 0,
        }
        assert value(gw, "gateway_store_latency_seconds_count", operation="ratelimit_take") == 1
        assert value(gw, "gateway_requests_total", code=str(status)) == 1

    async def test_idempotency_outcomes(self, store_section: dict[str, Any]) -> None:
        """A first keyed request is executed, its retry replayed, a reuse with another body a
        mismatch, and a bad key, a missing required key and an oversized body each invalid."""
        app = CountingApp()
        gw = gateway(app, store_section, idempotency={"required_paths": ["/pay"], "max_body_bytes": 8})
        async with serving(gw) as c:
            first = await c.post("/orders", content=b"a", headers={KEY: "k1"})
            again = await c.post("/orders", content=b"a", headers={KEY: "k1"})
            other = await c.post("/orders", content=b"b", headers={KEY: "k1"})
            bad = await c.post("/orders", content=b"a", headers={KEY: "a b"})
            missing = await c.post("/pay", content=b"a")
            large = await c.post("/orders", content=b"x" * 100, headers={KEY: "k2"})
            plain = await c.post("/orders", content=b"a")
            s = await scrape(c)
        assert [r.status_code for r in (first, again, other, bad, missing, large, plain)] == [
            200, 200, 422, 400, 400, 413, 200]
        outcomes = {o: at(s, "gateway_idempotency_outcomes_total", outcome=o)
                    for o in ("executed", "replayed", "in_flight", "mismatch", "invalid", "store_error")}
        assert outcomes == {"executed": 1, "replayed": 1, "in_flight": 0, "mismatch": 1, "invalid": 3,
                            "store_error": 0}
        assert app.calls == 2
        assert at(s, "gateway_upstream_latency_seconds_count") == 2
        assert at(s, "gateway_added_latency_seconds_count") == 7

    async def test_in_flight(self, store_section: dict[str, Any]) -> None:
        """Two concurrent requests with one key: one executed, the other in_flight (409)."""
        app = HoldApp()
        gw = gateway(app, store_section)
        async with serving(gw) as c:

            async def second() -> httpx.Response:
                async with asyncio.timeout(10):
                    await app.entered.wait()
                try:
                    return await c.post("/orders", content=b"a", headers={KEY: "same"})
                finally:
                    app.release.set()

            first, late = await asyncio.gather(
                c.post("/orders", content=b"a", headers={KEY: "same"}), second()
            )
        assert (first.status_code, late.status_code) == (200, 409)
        assert app.calls == 1
        assert value(gw, "gateway_idempotency_outcomes_total", outcome="executed") == 1
        assert value(gw, "gateway_idempotency_outcomes_total", outcome="in_flight") == 1

    @pytest.mark.parametrize(("on_store_error", "status", "calls"), [("deny", 503, 0), ("allow", 200, 1)])
    async def test_idempotency_store_error(self, on_store_error: str, status: int, calls: int) -> None:
        """A keyed request whose claim fails counts store_error whatever on_store_error then did."""
        app = CountingApp()
        gw = gateway(app, dead_store(), idempotency={"on_store_error": on_store_error})
        async with serving(gw) as c:
            r = await c.post("/orders", content=b"a", headers={KEY: "k"})
        assert r.status_code == status
        assert app.calls == calls
        assert value(gw, "gateway_idempotency_outcomes_total", outcome="store_error") == 1
        assert value(gw, "gateway_idempotency_outcomes_total", outcome="executed") == 0
        assert value(gw, "gateway_store_latency_seconds_count", operation="idempotency_claim") == 1

    async def test_store_latency_counts_each_call(self, store_section: dict[str, Any]) -> None:
        """The store latency histogram has one observation per call, by operation: a keyed run is a
        take with its claim (one call) and a complete; its replay a take with its claim; a plain
        GET a take; readyz a ping."""
        gw = gateway(CountingApp(), store_section, rate_limit=[policy("p", 100)])

        def count(operation: str) -> float:
            return value(gw, "gateway_store_latency_seconds_count", operation=operation)

        async with serving(gw) as c:
            assert [count(op) for op in ("ratelimit_take", "idempotency_claim", "ping")] == [0, 0, 0]
            await c.post("/orders", content=b"a", headers={KEY: "k"})
            await poll(lambda: count("idempotency_complete") == 1)
            await c.post("/orders", content=b"a", headers={KEY: "k"})
            await c.get("/orders")
            await c.get("/_gateway/readyz")
        assert {op: count(op) for op in ("ratelimit_take", "ratelimit_take_claim", "idempotency_claim",
                                          "idempotency_complete", "idempotency_release", "idempotency_renew",
                                          "ping")} == {
            "ratelimit_take": 1, "ratelimit_take_claim": 2, "idempotency_claim": 0, "idempotency_complete": 1,
            "idempotency_release": 0, "idempotency_renew": 0, "ping": 1,
        }
        assert value(gw, "gateway_store_latency_seconds_sum", operation="ratelimit_take") > 0

    async def test_upstream_latency_only_for_requests_reaching_the_app(
        self, store_section: dict[str, Any]
    ) -> None:
        """Upstream latency is timed for requests that reached the app, not for 429s, replays or
        refusals; added latency for every one of them."""
        app = CountingApp()
        gw = gateway(app, store_section, rate_limit=[policy("p", 3)])
        async with serving(gw) as c:
            replies = [
                await c.post("/o", content=b"a", headers={KEY: "k"}),  # runs
                await c.post("/o", content=b"a", headers={KEY: "k"}),  # replayed
                await c.get("/o"),  # runs
                await c.get("/o"),  # 429
            ]
        assert [r.status_code for r in replies] == [200, 200, 200, 429]
        assert app.calls == 2
        assert value(gw, "gateway_upstream_latency_seconds_count") == 2
        assert value(gw, "gateway_added_latency_seconds_count") == 4
        assert value(gw, "gateway_requests_total", code="200") == 3
        assert value(gw, "gateway_requests_total", code="429") == 1

    async def test_added_latency_excludes_the_apps_time(self) -> None:
        """With an app that takes 0.2 s, the upstream latency holds those 0.2 s and the added
        latency does not."""
        gw = gateway(SleepApp(0.2), MEMORY)
        async with serving(gw) as c:
            r = await c.get("/")
        assert r.status_code == 200
        assert value(gw, "gateway_upstream_latency_seconds_count") == 1
        assert value(gw, "gateway_upstream_latency_seconds_sum") >= 0.2
        assert value(gw, "gateway_added_latency_seconds_count") == 1
        assert 0 <= value(gw, "gateway_added_latency_seconds_sum") < 0.1

    async def test_app_exception_counted_as_500(self) -> None:
        """An app that raises before responding (the server then answers 500) is still counted:
        code="500" and one added-latency timing."""

        async def broken(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "lifespan":
                await answer_lifespan(receive, send, [])
                return
            raise RuntimeError("app bug")

        gw = gateway(broken, MEMORY)
        transport = httpx.ASGITransport(app=gw, raise_app_exceptions=False, client=("203.0.113.7", 1))
        async with serving(gw), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            r = await c.get("/")
        assert r.status_code == 500
        assert value(gw, "gateway_requests_total", code="500") == 1
        assert value(gw, "gateway_added_latency_seconds_count") == 1

    async def test_two_stacks_keep_their_own_metrics(self) -> None:
        """Two GatewayMiddleware in one process, with the same policy name, count separately."""
        a = gateway(CountingApp(), MEMORY, rate_limit=[policy("same", 100)])
        b = gateway(CountingApp(), MEMORY, rate_limit=[policy("same", 100)])
        assert a.metrics.registry is not b.metrics.registry
        async with serving(a) as ca, serving(b) as cb:
            for _ in range(3):
                await ca.get("/")
            await cb.get("/")
            sa, sb = await scrape(ca), await scrape(cb)
        assert at(sa, "gateway_requests_total", code="200") == 3
        assert at(sb, "gateway_requests_total", code="200") == 1
        assert at(sa, "gateway_ratelimit_decisions_total", policy="same", decision="allow") == 3
        assert at(sb, "gateway_ratelimit_decisions_total", policy="same", decision="allow") == 1


# --------------------------------------------------------------------------------------------
# multiprocess mode
# --------------------------------------------------------------------------------------------

_COUNTER = """
import asyncio, sys
import httpx
from gateway.config import load_config
from gateway.stack import GatewayMiddleware
from tests.asgi_helpers import answer_lifespan, lifespan_running

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        await answer_lifespan(receive, send, [])
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})

async def main(requests, limit):
    rate_limit = [{"name": "p", "limit": limit, "period": "60s"}] if limit else []
    gw = GatewayMiddleware(app, load_config({"rate_limit": rate_limit}, env={}))
    transport = httpx.ASGITransport(app=gw, client=("203.0.113.7", 1))
    # as a worker runs: within the app's lifespan, whose shutdown folds what is still pending
    async with lifespan_running(gw), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        codes = [(await c.get("/")).status_code for _ in range(requests)]
    print(codes)

asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
"""

_READER = """
import sys
from gateway.metrics import Metrics
sys.stdout.write(Metrics().exposition().decode())
"""


def _child_env(multiproc_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("GATEWAY_") and k.lower() != "prometheus_multiproc_dir"}
    env["PROMETHEUS_MULTIPROC_DIR"] = str(multiproc_dir)
    return env


def test_multiprocess_scrape_sums_every_process(tmp_path: Path) -> None:
    """Under PROMETHEUS_MULTIPROC_DIR two processes count on their own Metrics and a third
    process's exposition() reports the sums."""
    env = _child_env(tmp_path)
    counters = [
        subprocess.Popen([sys.executable, "-c", _COUNTER, "3", "0"], cwd=REPO_ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE),
        subprocess.Popen([sys.executable, "-c", _COUNTER, "4", "2"], cwd=REPO_ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE),
    ]
    outputs = []
    for proc in counters:
        try:
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err.decode()
        outputs.append(json.loads(out))
    assert outputs == [[200, 200, 200], [200, 200, 429, 429]]
    reader = subprocess.run([sys.executable, "-c", _READER], cwd=REPO_ROOT, env=env,
                            capture_output=True, timeout=60, check=False)
    assert reader.returncode == 0, reader.stderr.decode()
    s = parse(reader.stdout.decode())
    assert at(s, "gateway_requests_total", code="200") == 5
    assert at(s, "gateway_requests_total", code="429") == 2
    assert at(s, "gateway_ratelimit_decisions_total", policy="p", decision="allow") == 2
    assert at(s, "gateway_ratelimit_decisions_total", policy="p", decision="deny") == 2
    assert at(s, "gateway_added_latency_seconds_count") == 7
    assert at(s, "gateway_upstream_latency_seconds_count") == 5
