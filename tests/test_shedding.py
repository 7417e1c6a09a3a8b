"""Load shedding by priority ([[priority]], [shedding.fleet], [shedding.local]), on fakeredis and a
real Redis: classes, the fleet budget with its reserves across two stacks sharing one store,
the local shedder under a flood and a stalled loop, letting classes back gradually, shadow mode,
and the kill switches."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any

import pytest

from gateway import GatewayMiddleware, LoadSheddingMiddleware
from gateway.config import IdentityConfig, LocalShedding, PriorityClass, load_config
from gateway.errors import ConfigError, StoreUnavailable
from gateway.requestid import bind_request_id, current_request_id
from gateway.shedding import (
    LET_BACK_STEP,
    LOAD_SHED,
    SHED_LOG_INTERVAL_S,
    TICK_S,
    LocalShedder,
    PriorityClasses,
)
from tests.asgi_helpers import assert_problem, client_for, lifespan_running, poll
from tests.conftest import unique_prefix
from tests.redis_process import RedisProcess
from tests.test_concurrency_limit import HoldingApp, metric

CLASSES = [
    {"name": "critical", "paths": ["/v1/charges"], "reserve": 0.5},
    {"name": "reads", "paths": ["/v1"], "methods": ["GET"]},
]


def shed_config(store_section: dict[str, Any], **shedding: Any) -> dict[str, Any]:
    return {"store": store_section, "priority": CLASSES, "shedding": shedding}


def scope(path: str, method: str = "GET", headers: list[tuple[bytes, bytes]] | None = None,
          client: str = "203.0.113.7") -> dict[str, Any]:
    return {"type": "http", "method": method, "path": path, "headers": headers or [], "client": (client, 1)}


def test_a_request_is_in_the_first_class_it_matches() -> None:
    classes = PriorityClasses(
        [PriorityClass(name="critical", paths=("/v1/charges",)),
         PriorityClass(name="reads", paths=("/v1",), methods=frozenset({"GET"})),
         PriorityClass(name="batch", header=("x-priority", "low"))],
        "default", IdentityConfig(trusted_proxies=("10.0.0.0/8",)))
    assert classes.names == ("critical", "reads", "batch", "default")
    assert classes.of(scope("/v1/charges/ch_1", "GET")) == 0  # first match wins
    assert classes.of(scope("/v1/customers")) == 1
    assert classes.of(scope("/v1/customers", "POST")) == 3  # matches none: the default, last
    low = [(b"x-priority", b"low")]
    assert classes.of(scope("/x", headers=low, client="10.1.2.3")) == 2
    # a client cannot pick its class by sending the header itself
    assert classes.of(scope("/x", headers=low)) == 3


def test_a_listed_class_can_be_the_default() -> None:
    classes = PriorityClasses([PriorityClass(name="critical", paths=("/pay",)), PriorityClass(name="normal")],
                              "critical", IdentityConfig())
    assert classes.names == ("critical", "normal")
    assert classes.of(scope("/other")) == 1  # "normal" matches every path
    only = PriorityClasses([PriorityClass(name="normal", paths=("/v1",))], "normal", IdentityConfig())
    assert only.of(scope("/v2")) == 0


async def _hold(
    client: Any, app: HoldingApp, path: str, n: int, method: str = "GET"
) -> list[asyncio.Future[Any]]:
    """``n`` more requests held in the app (each arrives before the next is sent)."""
    held = []
    for _ in range(n):
        before = app.now
        held.append(asyncio.ensure_future(client.request(method, path, headers={"x-api-key": "k"})))
        await poll(lambda before=before: app.now == before + 1)  # type: ignore[misc]
    return held


async def test_the_fleet_budget_keeps_its_reserve_for_critical_requests(
    store_section: dict[str, Any],
) -> None:
    app = HoldingApp()
    gw = GatewayMiddleware(app, shed_config(store_section, fleet={"enabled": True, "limit": 4}))
    async with lifespan_running(gw), client_for(gw) as client:
        held = await _hold(client, app, "/v1/customers", 2)  # reads may fill 4 x (1 - 0.5) = 2
        shed = await client.get("/v1/customers")
        body = assert_problem(shed, 503, LOAD_SHED)
        assert body["priority"] == "reads"
        assert shed.headers["retry-after"] == "1"
        held += await _hold(client, app, "/v1/charges", 2, "POST")  # critical may fill all 4
        assert_problem(await client.post("/v1/charges"), 503, LOAD_SHED)
        assert app.entered == 4
        app.release.set()
        assert {r.status_code for r in await asyncio.gather(*held)} == {200}
        await poll(lambda: not gw._shedding.fleet.slots.releasing)  # type: ignore[union-attr]
        assert (await client.get("/v1/customers")).status_code == 200  # every slot back
    assert metric(gw, "gateway_shed_total", shedder="fleet", priority="reads", decision="shed") == 1
    assert metric(gw, "gateway_shed_total", shedder="fleet", priority="critical", decision="shed") == 1


async def test_two_stacks_on_one_redis_share_the_fleet_budget(redis_server: RedisProcess) -> None:
    """Two gateways (stacks with stores of their own) on one Redis: one budget between them."""
    first_app, second_app = HoldingApp(), HoldingApp()
    section = {"url": redis_server.url, "key_prefix": unique_prefix(), "timeout": "2s"}
    config = shed_config(section, fleet={"enabled": True, "limit": 3})
    first, second = GatewayMiddleware(first_app, config), GatewayMiddleware(second_app, config)
    async with lifespan_running(first), lifespan_running(second), \
            client_for(first) as a, client_for(second) as b:
        held = await _hold(a, first_app, "/v1/charges", 2, "POST")
        held += await _hold(b, second_app, "/v1/charges", 1, "POST")
        assert_problem(await b.post("/v1/charges"), 503, LOAD_SHED)
        assert_problem(await a.post("/v1/charges"), 503, LOAD_SHED)
        first_app.release.set()
        second_app.release.set()
        await asyncio.gather(*held)


async def test_a_shadow_fleet_sheds_nothing_and_counts_what_it_would(store_section: dict[str, Any]) -> None:
    results = {}
    for mode in ("enforce", "shadow"):
        app = HoldingApp()
        section = {**store_section, "key_prefix": f"{store_section['key_prefix']}{mode}"}
        gw = GatewayMiddleware(app, shed_config(section, fleet={"enabled": True, "limit": 4, "mode": mode}))
        async with lifespan_running(gw), client_for(gw) as client:
            tasks = [asyncio.ensure_future(client.get("/v1/customers")) for _ in range(10)]
            await poll(lambda app=app, tasks=tasks: app.entered + sum(t.done() for t in tasks) == 10)  # type: ignore[misc]
            app.release.set()
            codes = Counter(r.status_code for r in await asyncio.gather(*tasks))
        results[mode] = (codes, metric(gw, "gateway_shed_total", shedder="fleet", priority="reads",
                                       decision="shadow_shed" if mode == "shadow" else "shed"))
    enforced_codes, shed = results["enforce"]
    shadow_codes, would = results["shadow"]
    assert enforced_codes == {200: 2, 503: 8}
    assert shadow_codes == {200: 10}
    assert would == shed == 8


async def test_the_local_shedder_keeps_critical_requests_going_under_a_flood(
    store_section: dict[str, Any],
) -> None:
    """200 reads at once against max_in_flight 8: at most 8 reach the app, the rest are shed at
    once, and every critical request sent meanwhile runs."""
    app = HoldingApp(hold_s=0.05)
    gw = GatewayMiddleware(app, shed_config(store_section, local={"enabled": True, "max_in_flight": 8}))
    async with lifespan_running(gw), client_for(gw) as client:
        flood = [asyncio.ensure_future(client.get("/v1/customers")) for _ in range(200)]
        critical = [asyncio.ensure_future(client.post("/v1/charges")) for _ in range(10)]
        reads = Counter(r.status_code for r in await asyncio.gather(*flood))
        assert {r.status_code for r in await asyncio.gather(*critical)} == {200}
    assert reads[503] >= 150
    assert set(reads) == {200, 503}
    assert app.peak <= 8 + 10  # the reads never past their cap, the critical ones on top
    assert metric(gw, "gateway_shed_total", shedder="local", priority="reads", decision="shed") == reads[503]


async def test_a_stalled_loop_sheds_the_lowest_class_and_lets_it_back_gradually(
    store_section: dict[str, Any],
) -> None:
    app = HoldingApp(hold_s=0)
    gw = GatewayMiddleware(app, shed_config(store_section, local={"enabled": True, "max_loop_lag": "20ms"}))
    async with lifespan_running(gw), client_for(gw) as client:
        assert (await client.get("/v1/customers")).status_code == 200  # starts the sampling
        shedder = gw._shedding.local  # type: ignore[union-attr]
        assert shedder is not None
        time.sleep(0.15)  # the event loop stalls  # noqa: ASYNC251 - that is the point
        await poll(lambda: shedder.admitting[2] == 0.0, deadline_s=2)
        assert shedder.admitting[:2] == [1.0, 1.0]  # the most sheddable class (default) first
        default = await client.get("/elsewhere")
        assert_problem(default, 503, LOAD_SHED)
        assert (await client.get("/v1/customers")).status_code == 200
        seen: list[float] = []
        deadline = time.monotonic() + 5
        while shedder.admitting[2] < 1.0:
            seen.append(shedder.admitting[2])
            assert time.monotonic() < deadline
            await asyncio.sleep(TICK_S / 2)
        # let back a step at a time, never all at once
        steps = sorted(set(seen))
        assert len(steps) >= int(0.5 / LET_BACK_STEP)
        assert steps == sorted(steps)
    assert metric(gw, "gateway_shed_admitting", priority="default") == 1.0


async def test_a_shadow_local_shedder_sheds_nothing(store_section: dict[str, Any]) -> None:
    app = HoldingApp(hold_s=0.05)
    gw = GatewayMiddleware(app, shed_config(store_section, local={"enabled": True, "max_in_flight": 4,
                                                                  "mode": "shadow"}))
    async with lifespan_running(gw), client_for(gw) as client:
        codes = Counter(r.status_code for r in await asyncio.gather(
            *(client.get("/v1/customers") for _ in range(30))))
    assert codes == {200: 30}
    assert metric(gw, "gateway_shed_total", shedder="local", priority="reads", decision="shadow_shed") >= 20


async def test_the_kill_switches_leave_the_layer_out(store_section: dict[str, Any]) -> None:
    app = HoldingApp(hold_s=0)
    gw = GatewayMiddleware(app, shed_config(store_section, fleet={"enabled": False, "limit": 1},
                                            local={"enabled": False, "max_in_flight": 1}))
    assert gw._shedding is None
    async with lifespan_running(gw), client_for(gw) as client:
        responses = await asyncio.gather(*(client.get("/v1/x") for _ in range(5)))
        assert {r.status_code for r in responses} == {200}


async def test_a_shed_request_spends_no_rate_limit_tokens(store_section: dict[str, Any]) -> None:
    app = HoldingApp()
    cfg = shed_config(store_section, fleet={"enabled": True, "limit": 2})
    cfg["rate_limit"] = [{"name": "per-client", "limit": 10, "period": "1h"}]
    gw = GatewayMiddleware(app, cfg)
    async with lifespan_running(gw), client_for(gw) as client:
        held = await _hold(client, app, "/v1/customers", 1)
        for _ in range(3):
            assert_problem(await client.get("/v1/customers", headers={"x-api-key": "k"}), 503, LOAD_SHED)
        app.release.set()
        await asyncio.gather(*held)
        after = await client.get("/v1/customers", headers={"x-api-key": "k"})
    assert after.headers["ratelimit"].startswith('"per-client";r=8;')


async def test_the_middleware_alone(store_section: dict[str, Any]) -> None:
    app = HoldingApp()
    mw = LoadSheddingMiddleware(app, priority=CLASSES, shedding={"fleet": {"enabled": True, "limit": 1}},
                                store=store_section)
    async with lifespan_running(mw), client_for(mw) as client:
        held = await _hold(client, app, "/v1/charges", 1, "POST")
        assert_problem(await client.post("/v1/charges"), 503, LOAD_SHED)
        app.release.set()
        await asyncio.gather(*held)


def test_config_problems_name_their_key() -> None:
    with pytest.raises(ConfigError) as info:
        load_config({
            "priority": [{"paths": ["/"]}, {"name": "a", "reserve": 0.6, "header": "nocolon"},
                         {"name": "b", "reserve": 0.5}, {"name": "a"}],
            "shedding": {"default_class": "nope", "fleet": {"limit": 0, "mode": "dark"},
                         "local": {"max_loop_lag": "1ms", "bogus": 1}},
        })
    text = str(info.value)
    for key in ("priority[0].name", "priority[1].header", "priority[2].reserve", "priority[3].name",
                "shedding.default_class", "shedding.fleet.limit", "shedding.fleet.mode",
                "shedding.local.max_loop_lag", "shedding.local.bogus"):
        assert key in text, key


@pytest.mark.parametrize(("on_store_error", "status"), [("allow", 200), ("deny", 503)])
async def test_a_fleet_store_failure_follows_on_store_error(
    store_section: dict[str, Any], on_store_error: str, status: int, monkeypatch: pytest.MonkeyPatch,
) -> None:
    app = HoldingApp(hold_s=0)
    fleet = {"enabled": True, "on_store_error": on_store_error}
    gw = GatewayMiddleware(app, shed_config(store_section, fleet=fleet))

    async def down(*args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailable("store down")

    async with lifespan_running(gw), client_for(gw) as client:
        monkeypatch.setattr(gw.store, "concurrency_acquire", down)
        monkeypatch.setattr(gw.store, "concurrency_release", down)
        r = await client.get("/v1/customers")
    assert r.status_code == status
    if status == 503:
        assert_problem(r, 503, "urn:gateway:problem:store-unavailable")
    assert app.entered == (1 if status == 200 else 0)


async def test_the_local_shedders_ticks_log_under_no_requests_id() -> None:
    """The sampling timer a request starts runs outside that request's context: its later
    decisions are not logged under the id of a request long gone."""
    shedder = LocalShedder(LocalShedding(enabled=True, max_in_flight=1), classes=2)
    seen: list[str | None] = []

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if getattr(record, "event", None) == "shedding.local_shed":
                seen.append(current_request_id())

    async def first_request() -> None:
        bind_request_id(b"req-that-started-the-timer")
        assert shedder.admits(1)

    handler, logger = Seen(), logging.getLogger("gateway.shedding")
    logger.addHandler(handler)
    try:
        await asyncio.create_task(first_request())
        shedder.in_flight = 5  # over max_in_flight: the next tick sheds the lower class
        await poll(lambda: seen, deadline_s=2)
    finally:
        logger.removeHandler(handler)
        shedder.stop()
    assert seen == [None]


async def test_a_flood_of_shed_requests_writes_a_line_a_second_with_the_count(
    store_section: dict[str, Any], caplog: pytest.LogCaptureFixture,
) -> None:
    app = HoldingApp()
    gw = GatewayMiddleware(app, shed_config(store_section, fleet={"enabled": True, "limit": 1}))
    async with lifespan_running(gw), client_for(gw) as client:
        held = asyncio.ensure_future(client.get("/v1/customers"))
        await poll(lambda: app.now == 1)
        with caplog.at_level(logging.INFO, logger="gateway.shedding"):
            for _ in range(50):
                assert (await client.get("/v1/customers")).status_code == 503
            await asyncio.sleep(SHED_LOG_INTERVAL_S)
            assert (await client.get("/v1/customers")).status_code == 503
        app.release.set()
        await held
    lines = [r for r in caplog.records if getattr(r, "event", "") == "shedding.shed"]
    assert [getattr(r, "count", None) for r in lines] == [1, 50]  # the first at once, then the rest
    assert metric(gw, "gateway_shed_total", shedder="fleet", priority="reads", decision="shed") == 51
