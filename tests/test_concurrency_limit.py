"""[[concurrency_limit]] in process, on fakeredis and a real Redis: at most ``limit`` requests in
flight at the app, slots back on every way a request ends, renewals, store failures, shadow
mode counted against enforcement, and the take and the acquire sharing one store call."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from typing import Any

import pytest

from gateway import ConcurrencyLimitMiddleware, GatewayMiddleware
from gateway._asgi import Receive, Scope, Send
from gateway.concurrency import CONCURRENCY_LIMITED
from gateway.config import load_config
from gateway.errors import ConfigError, StoreUnavailable
from gateway.store.redis import RedisStore
from tests.asgi_helpers import answer_lifespan, assert_problem, client_for, lifespan_running, poll

KEY = {"x-api-key": "client-1"}


class HoldingApp:
    """Holds each request until ``release`` is set (or ``hold_s`` passed) and records how many
    it holds at once: the app's own view of the limit."""

    def __init__(self, hold_s: float | None = None) -> None:
        self.now = 0
        self.peak = 0
        self.entered = 0
        self.hold_s = hold_s
        self.release = asyncio.Event()
        self.fail = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send, [])
            return
        self.now += 1
        self.entered += 1
        self.peak = max(self.peak, self.now)
        try:
            if self.hold_s is not None:
                await asyncio.sleep(self.hold_s)
            else:
                await self.release.wait()
            if self.fail:
                raise RuntimeError("the app failed")
        finally:
            self.now -= 1
        headers = [(b"content-type", b"text/plain")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})


def config(store_section: dict[str, Any], *, limit: int = 5, **extra: Any) -> dict[str, Any]:
    section = {"name": "in-flight", "limit": limit, **extra}
    return {"store": store_section, "concurrency_limit": [section]}


async def slot_holders(gw: GatewayMiddleware, name: str = "in-flight") -> int:
    store = gw.store
    assert isinstance(store, RedisStore)
    keys = [k async for k in store.client.scan_iter(match=f"{store._keys._cl_prefix.decode()}*{name}")]
    return sum([int(await store.client.zcard(k)) for k in keys])


def metric(gw: GatewayMiddleware, name: str, **labels: str) -> float:
    value = gw.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_fifty_concurrent_requests_never_put_more_than_five_in_flight(
    store_section: dict[str, Any],
) -> None:
    app = HoldingApp(hold_s=0.2)
    gw = GatewayMiddleware(app, config(store_section))
    async with lifespan_running(gw), client_for(gw) as client:
        responses = await asyncio.gather(*(client.get("/v1/slow", headers=KEY) for _ in range(50)))
        codes = Counter(r.status_code for r in responses)
        assert app.peak == 5
        assert codes == {200: 5, 429: 45}
        refused = next(r for r in responses if r.status_code == 429)
        body = assert_problem(refused, 429, CONCURRENCY_LIMITED)
        assert body["violated-policies"] == ["in-flight"]
        assert refused.headers["retry-after"] == "1"
        assert await slot_holders(gw) == 0  # every slot back once the responses are in
        assert metric(gw, "gateway_concurrency_decisions_total", limit="in-flight", decision="allow") == 5
        assert metric(gw, "gateway_concurrency_decisions_total", limit="in-flight", decision="deny") == 45
        assert metric(gw, "gateway_concurrency_in_flight", limit="in-flight") == 0
        # and the next wave gets its slots
        again = await asyncio.gather(*(client.get("/v1/slow", headers=KEY) for _ in range(5)))
        assert {r.status_code for r in again} == {200}


async def test_each_client_has_its_own_slots(store_section: dict[str, Any]) -> None:
    app = HoldingApp()
    gw = GatewayMiddleware(app, config(store_section, limit=1))
    async with lifespan_running(gw), client_for(gw) as client:
        first = asyncio.ensure_future(client.get("/a", headers={"x-api-key": "one"}))
        await poll(lambda: app.now == 1)
        other = asyncio.ensure_future(client.get("/a", headers={"x-api-key": "two"}))
        await poll(lambda: app.now == 2)
        same = await client.get("/a", headers={"x-api-key": "one"})
        assert same.status_code == 429
        app.release.set()
        assert (await first).status_code == 200
        assert (await other).status_code == 200


async def test_a_serial_client_at_its_limit_is_never_refused(store_section: dict[str, Any]) -> None:
    """The slot is back before the response's last bytes reach the client: its next request,
    sent as soon as it has the answer, finds the slot free."""
    app = HoldingApp(hold_s=0)
    gw = GatewayMiddleware(app, config(store_section, limit=1))
    async with lifespan_running(gw), client_for(gw) as client:
        codes = [(await client.get("/a", headers=KEY)).status_code for _ in range(30)]
    assert codes == [200] * 30


async def test_the_slot_comes_back_when_the_app_raises(store_section: dict[str, Any]) -> None:
    app = HoldingApp(hold_s=0)
    app.fail = True
    gw = GatewayMiddleware(app, config(store_section, limit=1))
    async with lifespan_running(gw), client_for(gw) as client:
        for _ in range(3):
            with pytest.raises(RuntimeError):
                await client.get("/a", headers=KEY)
        await poll(lambda: not gw._concurrency.slots.releasing)  # type: ignore[union-attr]
        assert await slot_holders(gw) == 0
        app.fail = False
        assert (await client.get("/a", headers=KEY)).status_code == 200


async def test_the_slot_comes_back_when_the_request_is_cancelled(store_section: dict[str, Any]) -> None:
    app = HoldingApp()
    gw = GatewayMiddleware(app, config(store_section, limit=1))
    async with lifespan_running(gw), client_for(gw) as client:
        held = asyncio.ensure_future(client.get("/a", headers=KEY))
        await poll(lambda: app.now == 1)
        assert await slot_holders(gw) == 1
        held.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await held
        await poll(lambda: app.now == 0)
        await poll(lambda: not gw._concurrency.slots.releasing)  # type: ignore[union-attr]
        assert await slot_holders(gw) == 0
        app.release.set()
        assert (await client.get("/a", headers=KEY)).status_code == 200


async def test_the_slot_comes_back_when_the_client_disconnects(store_section: dict[str, Any]) -> None:
    """An app that sees http.disconnect and returns without a response gives the slot back."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send, [])
            return
        while (await receive())["type"] != "http.disconnect":
            pass

    gw = GatewayMiddleware(app, config(store_section, limit=1))
    messages = [{"type": "http.request", "body": b"", "more_body": True}, {"type": "http.disconnect"}]
    async with lifespan_running(gw):
        arrived = asyncio.Event()

        async def receive() -> dict[str, Any]:
            message = messages.pop(0)
            if message["type"] == "http.disconnect":
                arrived.set()
            return message

        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "http_version": "1.1", "method": "GET", "path": "/a", "raw_path": b"/a",
                 "query_string": b"", "headers": [(b"host", b"t"), (b"x-api-key", b"client-1")],
                 "client": ("203.0.113.7", 1), "server": ("t", 80), "scheme": "http", "root_path": ""}
        await gw(scope, receive, send)
        assert arrived.is_set()
        assert sent == []
        await poll(lambda: not gw._concurrency.slots.releasing)  # type: ignore[union-attr]
        assert await slot_holders(gw) == 0


async def test_a_long_request_renews_its_slot(store_section: dict[str, Any]) -> None:
    app = HoldingApp()
    gw = GatewayMiddleware(app, config(store_section, limit=1, lease="300ms"))
    async with lifespan_running(gw), client_for(gw) as client:
        held = asyncio.ensure_future(client.get("/a", headers=KEY))
        await poll(lambda: app.now == 1)
        await asyncio.sleep(1.0)  # more than three leases
        assert (await client.get("/a", headers=KEY)).status_code == 429
        assert metric(gw, "gateway_store_latency_seconds_count", operation="concurrency_renew") >= 3
        app.release.set()
        assert (await held).status_code == 200


@pytest.mark.parametrize(("on_store_error", "status"), [("allow", 200), ("deny", 503)])
async def test_a_store_failure_follows_on_store_error(
    store_section: dict[str, Any], on_store_error: str, status: int, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = HoldingApp(hold_s=0)
    gw = GatewayMiddleware(app, config(store_section, on_store_error=on_store_error))

    async def down(*args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailable("store down")

    async with lifespan_running(gw), client_for(gw) as client:
        monkeypatch.setattr(gw.store, "concurrency_acquire", down)
        monkeypatch.setattr(gw.store, "concurrency_release", down)
        with caplog.at_level(logging.WARNING, logger="gateway.concurrency"):
            r = await client.get("/a", headers=KEY)
    assert r.status_code == status
    assert app.entered == (1 if status == 200 else 0)
    assert metric(gw, "gateway_concurrency_decisions_total", limit="in-flight", decision="error") == 1
    assert any(getattr(rec, "event", "") == "concurrency.store_error" for rec in caplog.records)


async def _wave(gw: GatewayMiddleware, app: HoldingApp, n: int) -> Counter[int]:
    """``n`` requests at once, held in the app until every one of them was decided."""
    async with client_for(gw) as client:
        tasks = [asyncio.ensure_future(client.get("/a", headers=KEY)) for _ in range(n)]
        await poll(lambda: app.entered + sum(t.done() for t in tasks) == n)
        app.release.set()
        return Counter(r.status_code for r in await asyncio.gather(*tasks))


async def test_shadow_counts_exactly_what_enforcement_refuses(store_section: dict[str, Any]) -> None:
    """The same traffic both ways: 20 requests at once against a limit of 5."""
    enforced_app = HoldingApp()
    enforced = GatewayMiddleware(enforced_app, config(store_section, limit=5))
    async with lifespan_running(enforced):
        enforced_codes = await _wave(enforced, enforced_app, 20)
    shadow_app = HoldingApp()
    shadow_section = {**store_section, "key_prefix": store_section["key_prefix"] + "s"}
    shadow = GatewayMiddleware(shadow_app, config(shadow_section, limit=5, mode="shadow"))
    async with lifespan_running(shadow):
        shadow_codes = await _wave(shadow, shadow_app, 20)
        assert await slot_holders(shadow) == 0
    refused = enforced_codes[429]
    assert refused == 15
    assert shadow_codes == {200: 20}
    assert shadow_app.peak == 20
    shadow_denied = metric(shadow, "gateway_concurrency_decisions_total", limit="in-flight",
                           decision="shadow_deny")
    assert shadow_denied == refused
    assert metric(shadow, "gateway_concurrency_decisions_total", limit="in-flight", decision="deny") == 0


async def test_a_shadow_refusal_leaves_the_response_untouched(store_section: dict[str, Any]) -> None:
    app = HoldingApp()
    gw = GatewayMiddleware(app, config(store_section, limit=1, mode="shadow"))
    async with lifespan_running(gw), client_for(gw) as client:
        first = asyncio.ensure_future(client.get("/a", headers=KEY))
        await poll(lambda: app.now == 1)
        second = asyncio.ensure_future(client.get("/a", headers=KEY))
        await poll(lambda: app.now == 2)
        app.release.set()
        for r in (await first, await second):
            assert r.status_code == 200
            assert r.text == "ok"
            assert "retry-after" not in r.headers


async def test_the_take_and_the_acquire_are_one_store_call(store_section: dict[str, Any]) -> None:
    app = HoldingApp(hold_s=0)
    cfg = config(store_section, limit=5)
    cfg["rate_limit"] = [{"name": "per-client", "limit": 100, "period": "1h"}]
    gw = GatewayMiddleware(app, cfg)
    async with lifespan_running(gw), client_for(gw) as client:
        for _ in range(4):
            r = await client.get("/a", headers=KEY)
            assert r.status_code == 200
        assert r.headers["ratelimit"].startswith('"per-client";r=96;')
    assert metric(gw, "gateway_store_latency_seconds_count", operation="ratelimit_take_acquire") == 4
    assert metric(gw, "gateway_store_latency_seconds_count", operation="ratelimit_take") == 0
    assert metric(gw, "gateway_store_latency_seconds_count", operation="concurrency_acquire") == 0


async def test_a_concurrency_refusal_spends_no_tokens(store_section: dict[str, Any]) -> None:
    app = HoldingApp()
    cfg = config(store_section, limit=1)
    cfg["rate_limit"] = [{"name": "per-client", "limit": 10, "period": "1h"}]
    gw = GatewayMiddleware(app, cfg)
    async with lifespan_running(gw), client_for(gw) as client:
        held = asyncio.ensure_future(client.get("/a", headers=KEY))
        await poll(lambda: app.now == 1)
        for _ in range(3):
            refused = await client.get("/a", headers=KEY)
            assert_problem(refused, 429, CONCURRENCY_LIMITED)
            assert "ratelimit" not in refused.headers
        app.release.set()
        assert (await held).status_code == 200
        after = await client.get("/a", headers=KEY)
    # two requests ran, the three refused ones were given their tokens back
    assert after.headers["ratelimit"].startswith('"per-client";r=8;')
    assert metric(gw, "gateway_ratelimit_decisions_total", policy="per-client", decision="allow") == 2


async def test_a_rate_limit_denial_comes_first_and_holds_no_slot(store_section: dict[str, Any]) -> None:
    app = HoldingApp(hold_s=0)
    cfg = config(store_section, limit=5)
    cfg["rate_limit"] = [{"name": "per-client", "limit": 1, "period": "1h"}]
    gw = GatewayMiddleware(app, cfg)
    async with lifespan_running(gw), client_for(gw) as client:
        assert (await client.get("/a", headers=KEY)).status_code == 200
        denied = await client.get("/a", headers=KEY)
        assert_problem(denied, 429, "https://iana.org/assignments/http-problem-types#quota-exceeded")
        assert await slot_holders(gw) == 0


async def test_keyed_posts_hold_a_slot_and_are_replayed(store_section: dict[str, Any]) -> None:
    app = HoldingApp(hold_s=0)
    cfg = config(store_section, limit=1)
    cfg["rate_limit"] = [{"name": "per-client", "limit": 10, "period": "1h"}]
    gw = GatewayMiddleware(app, cfg)
    async with lifespan_running(gw), client_for(gw) as client:
        headers = {**KEY, "idempotency-key": "k-1"}
        first = await client.post("/charges", headers=headers, content=b"{}")
        replay = await client.post("/charges", headers=headers, content=b"{}")
        assert first.status_code == replay.status_code == 200
        assert replay.headers["idempotent-replayed"] == "true"
        assert app.entered == 1
        await poll(lambda: not gw._concurrency.slots.releasing)  # type: ignore[union-attr]
        assert await slot_holders(gw) == 0
    # the slot alone, then the take with the claim
    assert metric(gw, "gateway_store_latency_seconds_count", operation="concurrency_acquire") == 2
    assert metric(gw, "gateway_store_latency_seconds_count", operation="ratelimit_take_claim") == 2


async def test_paths_and_methods_pick_the_requests_limited(store_section: dict[str, Any]) -> None:
    app = HoldingApp()
    gw = GatewayMiddleware(app, config(store_section, limit=1, paths=["/v1/slow"], methods=["GET"]))
    async with lifespan_running(gw), client_for(gw) as client:
        held = asyncio.ensure_future(client.get("/v1/slow", headers=KEY))
        await poll(lambda: app.now == 1)
        others = [asyncio.ensure_future(client.get("/v1/fast", headers=KEY)),
                  asyncio.ensure_future(client.delete("/v1/slow", headers=KEY))]
        await poll(lambda: app.now == 3)
        assert (await client.get("/v1/slow/x", headers=KEY)).status_code == 429
        app.release.set()
        assert {r.status_code for r in await asyncio.gather(held, *others)} == {200}


async def test_the_middleware_alone(store_section: dict[str, Any]) -> None:
    app = HoldingApp()
    mw = ConcurrencyLimitMiddleware(app, concurrency_limit=[{"name": "c", "limit": 1}], store=store_section)
    async with lifespan_running(mw), client_for(mw) as client:
        held = asyncio.ensure_future(client.get("/a", headers=KEY))
        await poll(lambda: app.now == 1)
        refused = await client.get("/a", headers=KEY)
        assert_problem(refused, 429, CONCURRENCY_LIMITED)
        assert refused.headers["x-request-id"]
        app.release.set()
        assert (await held).status_code == 200
        assert (await client.get("/a", headers=KEY)).status_code == 200


def test_config_problems_name_their_key() -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"concurrency_limit": [
            {"name": "a", "limit": 0, "lease": "10ms", "mode": "dark", "key": "cookie:x"},
            {"name": "a", "bogus": 1},
        ]})
    text = str(info.value)
    for key in ("concurrency_limit[0].limit", "concurrency_limit[0].lease", "concurrency_limit[0].mode",
                "concurrency_limit[0].key", "concurrency_limit[1].name", "concurrency_limit[1].bogus"):
        assert key in text, key


def test_the_defaults() -> None:
    (limit,) = load_config({"concurrency_limit": [{}]}).concurrency_limits
    assert (limit.name, limit.limit, limit.key, limit.lease_ms, limit.mode, limit.on_store_error) == (
        "concurrent", 20, "identity", 30_000, "enforce", "allow")


PREFLIGHT = {"origin": "https://shop.example", "access-control-request-method": "POST", **KEY}


@pytest.mark.parametrize("limit_preflights", [False, True])
async def test_cors_preflights_pass_the_limits_unless_configured(
    store_section: dict[str, Any], limit_preflights: bool,
) -> None:
    """A browser's preflight spends no token and holds no slot by default; with
    request.limit_preflights = true it is limited like any request. A plain OPTIONS always is."""
    app = HoldingApp(hold_s=0)
    cfg = config(store_section, limit=5)
    cfg["rate_limit"] = [{"name": "per-client", "limit": 2, "period": "1h"}]
    cfg["request"] = {"limit_preflights": limit_preflights}
    gw = GatewayMiddleware(app, cfg)
    async with lifespan_running(gw), client_for(gw) as client:
        preflights = [await client.options("/charges", headers=PREFLIGHT) for _ in range(3)]
        plain = await client.options("/charges", headers=KEY)
    codes = [r.status_code for r in preflights]
    if limit_preflights:
        assert codes == [200, 200, 429]
    else:
        assert codes == [200, 200, 200]
        assert all("ratelimit" not in r.headers for r in preflights)
        assert plain.headers["ratelimit"].startswith('"per-client";r=1;')  # only it was charged
    # limited: the first two preflights hold a slot each, the third and the plain OPTIONS are
    # denied by the rate limit before any slot; exempt: only the plain OPTIONS holds one
    assert metric(gw, "gateway_concurrency_decisions_total", limit="in-flight", decision="allow") == (
        2 if limit_preflights else 1)
    if limit_preflights:
        assert plain.status_code == 429
