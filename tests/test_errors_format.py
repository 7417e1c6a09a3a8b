"""``[errors] format``: every refusal in RFC 9457 problem+json (the default) or in Stripe's error
envelope, written by the one renderer the layers were given (``gateway/problem.py``). In-process
through ``GatewayMiddleware`` on fakeredis and real Redis; ``tests/test_stripe_client.py`` runs
the official client against ``gateway serve``."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from gateway import GatewayMiddleware, IdempotencyMiddleware, RateLimitMiddleware
from gateway._asgi import Receive, Scope, Send
from gateway.http_protocol import _REFUSALS
from gateway.problem import PROBLEM_RENDERER, STRIPE_ERRORS, STRIPE_RENDERER, renderer_for
from gateway.store.redis import RedisStore
from tests.asgi_helpers import CountingApp, client_for

STRIPE = {"errors": {"format": "stripe"}}


def assert_stripe(r: httpx.Response, status: int, type_: str, code: str, *, retry: bool) -> dict[str, Any]:
    """``r`` is a Stripe-shaped refusal: status, envelope, Request-Id = X-Request-Id, the retry hint."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["request-id"] == r.headers["x-request-id"]
    assert r.headers.get_list("stripe-should-retry") == ["true" if retry else "false"]
    error: dict[str, Any] = r.json()["error"]
    assert (error["type"], error["code"]) == (type_, code)
    assert error["message"]
    assert set(r.json()) == {"error"}
    return error


class Held:
    """Answers 201 after ``release`` is set (``entered`` once it runs); counts its runs."""

    def __init__(self) -> None:
        self.calls = 0
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        self.calls += 1
        await receive()
        self.entered.set()
        await self.release.wait()
        await send({"type": "http.response.start", "status": 201,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"made"})


class TestStripeShapes:
    async def test_rate_limit(self, store: RedisStore) -> None:
        """429 stays 429: invalid_request_error, rate_limit, not to be retried, Retry-After kept."""
        gw = GatewayMiddleware(CountingApp(), {**STRIPE, "rate_limit": [{"limit": 1}]}, store=store)
        async with client_for(gw) as c:
            await c.get("/")
            r = await c.get("/")
        error = assert_stripe(r, 429, "invalid_request_error", "rate_limit", retry=False)
        assert error["violated_policies"] == ["per-client"]
        assert int(r.headers["retry-after"]) >= 1
        assert "ratelimit" in r.headers

    async def test_idempotency_refusals(self, store: RedisStore) -> None:
        """409 in use (retry), 422 reused -> 400 idempotency_error, 400 bad key, 413 -> 400."""
        app = Held()
        gw = GatewayMiddleware(app, {**STRIPE, "idempotency": {"max_body_bytes": 100}}, store=store)
        async with client_for(gw) as c:
            first = asyncio.ensure_future(c.post("/p", content=b"a", headers={"Idempotency-Key": "k"}))
            async with asyncio.timeout(10):
                await app.entered.wait()
            in_use = await c.post("/p", content=b"a", headers={"Idempotency-Key": "k"})
            app.release.set()
            done = await first
            reused = await c.post("/p", content=b"b", headers={"Idempotency-Key": "k"})
            replay = await c.post("/p", content=b"a", headers={"Idempotency-Key": "k"})
            bad = await c.post("/p", content=b"a", headers={"Idempotency-Key": "k" * 256})
            big = await c.post("/p", content=b"x" * 101, headers={"Idempotency-Key": "big"})
        assert_stripe(in_use, 409, "idempotency_error", "idempotency_key_in_use", retry=True)
        assert in_use.headers["retry-after"] == "1"
        assert done.status_code == 201
        assert_stripe(reused, 400, "idempotency_error", "idempotency_key_reused", retry=False)
        assert (replay.status_code, replay.content) == (201, b"made")
        assert replay.headers.get_list("stripe-should-retry") == ["false"]
        assert replay.headers["request-id"] == replay.headers["x-request-id"]  # the app sent none
        assert_stripe(bad, 400, "invalid_request_error", "idempotency_key_invalid", retry=False)
        assert_stripe(big, 400, "invalid_request_error", "body_too_large", retry=False)
        assert app.calls == 1

    async def test_outcome_unknown_is_stored_in_stripe_shape(self, store: RedisStore) -> None:
        """An app that raises: 502 api_error outcome_unknown, not retried; its replay is the same
        document, Stripe-Should-Retry said once, and the current Request-Id."""

        async def raising(scope: Scope, receive: Receive, send: Send) -> None:
            raise RuntimeError("boom")

        gw = GatewayMiddleware(raising, STRIPE, store=store)
        transport = httpx.ASGITransport(app=gw, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            first = await c.post("/p", content=b"a", headers={"Idempotency-Key": "u"})
            again = await c.post("/p", content=b"a", headers={"Idempotency-Key": "u"})
        assert_stripe(first, 502, "api_error", "outcome_unknown", retry=False)
        assert_stripe(again, 502, "api_error", "outcome_unknown", retry=False)
        assert again.headers["idempotent-replayed"] == "true"
        assert again.json() == first.json()
        assert again.headers["request-id"] != first.headers["request-id"]

    async def test_store_unavailable(self) -> None:
        """A keyed request with the store down: 503 api_error store_unavailable, to be retried."""
        config = {**STRIPE, "store": {"url": "redis://127.0.0.1:1/0", "timeout": "200ms"}}
        gw = GatewayMiddleware(CountingApp(), config)
        async with client_for(gw) as c:
            r = await c.post("/p", content=b"a", headers={"Idempotency-Key": "s"})
        await gw.store.close()
        assert_stripe(r, 503, "api_error", "store_unavailable", retry=True)
        assert r.headers["retry-after"] == "1"

    async def test_request_check_refusal(self, store: RedisStore) -> None:
        """Even the request check's 400 (two key lines) is Stripe-shaped."""
        gw = GatewayMiddleware(CountingApp(), STRIPE, store=store)
        async with client_for(gw) as c:
            r = await c.post("/p", headers=[("Idempotency-Key", "a"), ("Idempotency-Key", "b")])
        assert_stripe(r, 400, "invalid_request_error", "ambiguous_request", retry=False)

    async def test_single_middlewares_take_it_from_config(self, store: RedisStore) -> None:
        """RateLimitMiddleware and IdempotencyMiddleware read [errors] from config= too, and name
        their reply with a Request-Id equal to its X-Request-Id when no stack does."""
        rl = RateLimitMiddleware(CountingApp(), config={**STRIPE, "rate_limit": [{"limit": 1}]}, store=store)
        idem = IdempotencyMiddleware(CountingApp(), config=STRIPE, store=store)
        async with client_for(rl) as c:
            await c.get("/")
            limited = await c.get("/")
        async with client_for(idem) as c:
            bad = await c.post("/", headers={"Idempotency-Key": ""})
        assert_stripe(limited, 429, "invalid_request_error", "rate_limit", retry=False)
        assert_stripe(bad, 400, "invalid_request_error", "idempotency_key_invalid", retry=False)


class TestProblemStaysTheDefault:
    async def test_default_is_problem_json(self, store: RedisStore) -> None:
        """Without [errors] the refusals are RFC 9457 problem+json, with no Stripe headers."""
        gw = GatewayMiddleware(CountingApp(), {"rate_limit": [{"limit": 1}]}, store=store)
        async with client_for(gw) as c:
            await c.get("/")
            r = await c.get("/")
        assert r.status_code == 429
        assert r.headers["content-type"] == "application/problem+json"
        assert {"type", "title", "status", "detail"} <= set(r.json())
        assert "stripe-should-retry" not in r.headers
        assert "request-id" not in r.headers

    async def test_ops_answers_stay_problem_json(self, store: RedisStore) -> None:
        """/_gateway/* is for operators and probes: problem+json whatever the format."""
        gw = GatewayMiddleware(CountingApp(), STRIPE, store=store)
        async with client_for(gw) as c:
            r = await c.get("/_gateway/nothing")
        assert (r.status_code, r.headers["content-type"]) == (404, "application/problem+json")


@pytest.mark.parametrize("fmt", ["problem", "stripe"])
def test_the_connections_own_refusals_follow_the_format(fmt: str) -> None:
    """gateway serve's 400/408/503 written by the connection itself are in the format too."""
    raw = _REFUSALS[fmt].too_many.bytes()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = dict(line.split(b": ", 1) for line in lines[1:])
    assert lines[0] == b"HTTP/1.1 503 Service Unavailable"
    assert int(headers[b"content-length"]) == len(body)
    if fmt == "stripe":
        assert json.loads(body)["error"]["code"] == "too_many_connections"
        assert headers[b"stripe-should-retry"] == b"true"
        assert headers[b"request-id"] == headers[b"x-request-id"]
    else:
        assert json.loads(body)["type"] == "urn:gateway:problem:too-many-connections"


def test_every_mapped_problem_keeps_or_lowers_to_a_stripe_status() -> None:
    """The table only maps to statuses stripe-python classifies: 400 for the two Stripe says
    400 for, the problem's own status for the rest; renderer_for picks by format."""
    assert {e.status for e in STRIPE_ERRORS.values()} == {None, 400}
    assert renderer_for("stripe") is STRIPE_RENDERER
    assert renderer_for("problem") is PROBLEM_RENDERER
