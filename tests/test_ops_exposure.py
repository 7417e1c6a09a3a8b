"""Operations in-process and under serve (issue 16, item 6): ``[ops]`` moves, restricts or
disables ``/_gateway/*``, metrics are loopback-only by default; ``gateway serve --access-log /
--log-level``; denial lines carry the request's method and path; the library's records are JSON."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway import GatewayMiddleware, load_config
from gateway.cli import main
from gateway.errors import ConfigError
from gateway.logs import JsonFormatter
from tests.asgi_helpers import CountingApp, client_for, lifespan_running
from tests.conftest import unique_prefix
from tests.redis_process import RedisProcess
from tests.serve_process import GatewayServe, Upstream, serve_config, wait_for

FAR = "203.0.113.7"


async def get(app: Any, path: str, client_ip: str = FAR, **headers: str) -> httpx.Response:
    async with client_for(app, client_ip=client_ip) as c:
        return await c.get(path, headers=headers)


async def test_metrics_are_loopback_only_by_default_in_process() -> None:
    """Wrapping an app, /_gateway/metrics answers loopback and 404s anyone else (as a name it
    does not have); health and readiness answer everyone."""
    app = CountingApp()
    gw = GatewayMiddleware(app)
    async with lifespan_running(gw):
        far = await get(gw, "/_gateway/metrics")
        forged = await get(gw, "/_gateway/metrics", **{"x-forwarded-for": "127.0.0.1"})
        near = await get(gw, "/_gateway/metrics", client_ip="127.0.0.1")
        near6 = await get(gw, "/_gateway/metrics", client_ip="::1")
        health = await get(gw, "/_gateway/healthz")
        ready = await get(gw, "/_gateway/readyz")
    assert far.status_code == forged.status_code == 404
    assert far.json()["type"] == "urn:gateway:problem:not-found"
    assert near.status_code == near6.status_code == 200
    assert b"gateway_requests_total" in near.content
    assert health.status_code == ready.status_code == 200
    assert app.calls == 0  # never passed on


async def test_metrics_allowed_from_trusted_cidrs_through_a_trusted_proxy() -> None:
    """``ops.metrics_allow`` names who may scrape; behind a trusted proxy the client is the one
    its X-Forwarded-For names."""
    gw = GatewayMiddleware(CountingApp(), {"ops": {"metrics_allow": ["10.0.0.0/8"]},
                                           "identity": {"trusted_proxies": ["192.0.2.1/32"]}})
    async with lifespan_running(gw):
        scraper = await get(gw, "/_gateway/metrics", client_ip="10.1.2.3")
        loopback = await get(gw, "/_gateway/metrics", client_ip="127.0.0.1")
        via_proxy = await get(gw, "/_gateway/metrics", client_ip="192.0.2.1",
                              **{"x-forwarded-for": "10.9.9.9"})
        outsider = await get(gw, "/_gateway/metrics", client_ip="192.0.2.1", **{"x-forwarded-for": FAR})
    assert (scraper.status_code, loopback.status_code) == (200, 404)
    assert (via_proxy.status_code, outsider.status_code) == (200, 404)


async def test_ops_moved_restricted_and_disabled() -> None:
    """``ops.prefix`` moves the routes (the old path is the app's); ``ops.allow`` restricts them
    all; ``ops.enabled = false`` hands every path to the app."""
    app = CountingApp()
    moved = GatewayMiddleware(app, {"ops": {"prefix": "/internal/gw", "allow": ["10.0.0.0/8"]}})
    async with lifespan_running(moved):
        inside = await get(moved, "/internal/gw/healthz", client_ip="10.0.0.1")
        outside = await get(moved, "/internal/gw/healthz")
        old = await get(moved, "/_gateway/healthz", client_ip="10.0.0.1")
    assert (inside.status_code, outside.status_code) == (200, 404)
    assert old.status_code == 200
    assert old.text == "ok"  # the app's answer
    off = GatewayMiddleware(app, {"ops": {"enabled": False}})
    async with lifespan_running(off):
        passed = await get(off, "/_gateway/metrics", client_ip="127.0.0.1")
    assert passed.text == "ok"
    assert app.calls == 2


@pytest.mark.parametrize(("ops", "key"), [
    ({"prefix": "/"}, "ops.prefix"), ({"prefix": "_gateway"}, "ops.prefix"),
    ({"prefix": "/a/"}, "ops.prefix"), ({"prefix": "/a b"}, "ops.prefix"),
    ({"allow": ["nope"]}, "ops.allow[0]"),
    ({"metrics_allow": "127.0.0.1"}, "ops.metrics_allow"), ({"enabled": "yes"}, "ops.enabled"),
    ({"public": True}, "ops.public"),
])
def test_bad_ops_keys(ops: dict[str, Any], key: str) -> None:
    """Each bad ``[ops]`` key is one line naming it."""
    with pytest.raises(ConfigError) as info:
        load_config({"ops": ops})
    (line,) = info.value.problems
    assert line.startswith(f"{key}: "), line


@pytest.fixture
def json_records() -> Iterator[io.StringIO]:
    """The gateway loggers' records, formatted as ``gateway serve`` writes them."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("gateway")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield out
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def test_denial_lines_carry_method_and_path(json_records: io.StringIO) -> None:
    """A 429's log line names the request's method and path (not its query), with its id."""
    gw = GatewayMiddleware(CountingApp(), {"rate_limit": [{"limit": 1, "period": "1h"}]})
    async with lifespan_running(gw), client_for(gw) as c:
        await c.post("/v1/charges?secret=1")
        denied = await c.post("/v1/charges?secret=1")
    lines = [json.loads(line) for line in json_records.getvalue().splitlines()]
    (line,) = [x for x in lines if x.get("event") == "ratelimit.denied"]
    assert (line["method"], line["path"]) == ("POST", "/v1/charges")
    assert line["request_id"] == denied.headers["x-request-id"]


def test_bad_log_level_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """``--log-level`` takes debug, info, warning or error; anything else is exit 2, one line."""
    assert main(["serve", "--config", "x.toml", "--log-level", "loud"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "loud" in err


@pytest.mark.slow
def test_serve_access_log_and_log_level(tmp_path: Path, redis_server: RedisProcess) -> None:
    """``--access-log`` writes one ``http.access`` JSON line per response with its request id;
    ``--log-level warning`` drops the gateway's INFO decisions; every stderr line is JSON."""
    upstream = Upstream(tmp_path).start()
    config = serve_config(upstream.url, redis_server.url, unique_prefix(),
                          rate_limit=[{"name": "one", "limit": 1, "period": "1h"}])
    loud = GatewayServe(tmp_path, config, args=("--access-log",))
    quiet = GatewayServe(tmp_path, config, args=("--log-level", "warning"))
    try:
        seen = []
        for gw in (loud, quiet):
            gw.start()
            with gw.client() as c:
                seen += [c.get("/hello", headers={"x-api-key": gw.url}).status_code for _ in range(2)]
        denied = wait_for(lambda: [x for x in loud.logs() if x.get("event") == "ratelimit.denied"],
                          "the denial line")
        access = wait_for(lambda: [x for x in loud.logs() if x.get("event") == "http.access"
                                   and x["status"] == 429], "the access lines") and \
            [x for x in loud.logs() if x.get("event") == "http.access"]
    finally:
        for process in (loud, quiet, upstream):
            process.stop()
    assert (denied[0]["method"], denied[0]["path"]) == ("GET", "/hello")
    mine = [(x["method"], x["path"], x["status"]) for x in access if x["path"] == "/hello"]
    assert mine == [("GET", "/hello", seen[0]), ("GET", "/hello", 429)]
    assert seen[1] == 429
    assert all(x.get("request_id") for x in access)
    assert not [x for x in quiet.logs() if x.get("event") in ("ratelimit.denied", "http.access")]
    assert loud.non_json_stderr_lines() == []
    assert quiet.non_json_stderr_lines() == []
