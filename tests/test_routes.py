"""Per-route limits beside the route (issue 16, item 4): ``gateway.routes`` as a FastAPI
dependency and a Starlette decorator, deciding with RateLimitMiddleware's own machinery (store,
script, fields, problem responses); and the README's FastAPI example run under a real uvicorn."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from gateway import GatewayMiddleware
from gateway.errors import ConfigError
from gateway.routes import RouteLimits
from tests.asgi_helpers import client_for, lifespan_running
from tests.jwt_keys import token
from tests.redis_process import HOST
from tests.serve_process import REPO_ROOT, ServerProcess, child_env
from tests.test_identity_sources import rsa_jwt

QUOTA = "https://iana.org/assignments/http-problem-types#quota-exceeded"


def fastapi_app(limits: RouteLimits) -> FastAPI:
    api = FastAPI()
    limits.install(api)

    @api.post("/charges", dependencies=[Depends(limits.limit("2/minute", name="create-charge"))])
    async def create_charge() -> dict[str, str]:
        return {"id": "ch_1"}

    @api.get("/raw", dependencies=[Depends(limits.limit("1/hour", name="raw"))])
    async def raw() -> Response:
        return PlainTextResponse("raw")  # a Response of its own: install's layer adds the fields

    @api.get("/free")
    async def free() -> dict[str, str]:
        return {"ok": "yes"}

    return api


async def test_fastapi_dependency_limits_its_route(store_section: dict[str, Any]) -> None:
    """The dependency allows up to its limit with the RateLimit fields, then answers the gateway's
    429 problem; other routes are not limited."""
    api = fastapi_app(RouteLimits(store=store_section))
    async with lifespan_running(api), client_for(api) as c:
        charges = [await c.post("/charges") for _ in range(3)]
        raws = [await c.get("/raw") for _ in range(2)]
        free = await c.get("/free")
    assert [r.status_code for r in charges] == [200, 200, 429]
    assert charges[0].headers["ratelimit-policy"] == '"create-charge";q=2;w=60'
    assert charges[0].headers["ratelimit"] == '"create-charge";r=1;t=30'
    denied = charges[2]
    assert denied.headers["content-type"] == "application/problem+json"
    assert denied.json()["type"] == QUOTA
    assert denied.json()["violated-policies"] == ["create-charge"]
    assert int(denied.headers["retry-after"]) >= 1
    assert denied.headers["x-request-id"]
    assert [r.status_code for r in raws] == [200, 429]
    assert raws[0].headers["ratelimit-policy"] == '"raw";q=1;w=3600'
    assert raws[0].text == "raw"
    assert "ratelimit-policy" not in free.headers


async def test_without_install_the_fields_still_reach_a_data_response(store_section: dict[str, Any]) -> None:
    """Without ``install``, a route returning data still gets the fields (FastAPI merges the
    dependency's response headers), and the store opens at the first request."""
    limits = RouteLimits(store=store_section)
    api = FastAPI()

    @api.get("/x", dependencies=[Depends(limits.limit("5/second", name="x"))])
    async def x() -> dict[str, int]:
        return {"x": 1}

    async with client_for(api) as c:
        r = await c.get("/x")
    await limits.close()
    assert r.status_code == 200
    assert r.headers["ratelimit-policy"] == '"x";q=5;w=1'


async def test_starlette_decorator(store_section: dict[str, Any]) -> None:
    """``decorate`` puts a Starlette endpoint (sync or async) behind its limit."""
    limits = RouteLimits(store=store_section, identity={"sources": ["header:x-user"]})

    @limits.decorate("1/minute", name="report")
    async def report(request: Request) -> Response:
        return JSONResponse({"user": request.headers["x-user"]})

    @limits.decorate("1/minute", name="sync-report")
    def sync_report(request: Request) -> Response:
        return PlainTextResponse("sync")

    app = Starlette(routes=[Route("/report", report), Route("/sync", sync_report)])
    limits.install(app)
    async with lifespan_running(app), client_for(app) as c:
        a = [await c.get("/report", headers={"x-user": "a"}) for _ in range(2)]
        b = await c.get("/report", headers={"x-user": "b"})
        s = [await c.get("/sync", headers={"x-user": "a"}) for _ in range(2)]
    assert [r.status_code for r in a] == [200, 429]
    assert a[0].headers["ratelimit-policy"] == '"report";q=1;w=60'
    assert a[1].json()["violated-policies"] == ["report"]
    assert b.status_code == 200
    assert [r.status_code for r in s] == [200, 429]


async def test_a_route_limit_inside_the_stack(store_section: dict[str, Any]) -> None:
    """Under GatewayMiddleware both the stack's policy and the route's apply and are shown;
    the route's refusal is the same problem response."""
    config = {"store": store_section, "rate_limit": [{"name": "per-client", "limit": 100, "period": "1m"}]}
    limits = RouteLimits(config=config)
    gw = GatewayMiddleware(fastapi_app(limits), config)
    async with lifespan_running(gw), client_for(gw) as c:
        charges = [await c.post("/charges") for _ in range(3)]
        health = await c.get("/_gateway/healthz")
    assert [r.status_code for r in charges] == [200, 200, 429]
    assert charges[0].headers.get_list("ratelimit-policy") == [
        '"create-charge";q=2;w=60', '"per-client";q=100;w=60']
    assert charges[2].json()["violated-policies"] == ["create-charge"]
    assert len(charges[2].headers.get_list("x-request-id")) == 1
    assert health.status_code == 200


async def test_route_limit_with_plans_and_a_verified_claim(store_section: dict[str, Any]) -> None:
    """A route limit takes ``plan``/``plans`` like any policy; the identity is the verified ``sub``."""
    limits = RouteLimits(store=store_section, identity={"sources": ["jwt:sub", "ip"], "jwt": rsa_jwt()})
    api = FastAPI()
    limits.install(api)
    dep = limits.limit("1/minute", name="exports", plan="jwt:plan", plans={"pro": {"limit": 3}})

    @api.get("/export", dependencies=[Depends(dep)])
    async def export() -> dict[str, str]:
        return {}

    async with lifespan_running(api), client_for(api) as c:
        as_pro = {"authorization": f"Bearer {token({'sub': 'p', 'plan': 'pro'})}"}
        as_free = {"authorization": f"Bearer {token({'sub': 'f'})}"}
        pro = [await c.get("/export", headers=as_pro) for _ in range(4)]
        free = [await c.get("/export", headers=as_free) for _ in range(2)]
    assert [r.status_code for r in pro] == [200, 200, 200, 429]
    assert pro[0].headers["ratelimit-policy"] == '"exports";q=3;w=60'
    assert [r.status_code for r in free] == [200, 429]


def test_bad_route_limits_are_refused_when_made() -> None:
    """A bad spec or key is a ConfigError line; a second limit of one name a ValueError."""
    limits = RouteLimits()
    with pytest.raises(ConfigError, match=r"^limit: "):
        limits.limit("ten per minute")
    with pytest.raises(ConfigError) as info:
        limits.limit("10/minute", burst=0)
    assert info.value.problems[0].startswith("rate_limit[0].burst: ")
    with pytest.raises(ConfigError, match=r"rate_limit\[0\].plan: .*trusted_proxies"):
        limits.limit("10/minute", plan="header:x-plan", plans={"pro": {"limit": 1}})
    limits.limit("10/minute", name="once")
    with pytest.raises(ValueError, match="once"):
        limits.limit("5/minute", name="once")
    with pytest.raises(TypeError):
        limits.limit("5/minute", paths=["/x"])
    assert limits.limit("100/5m").policy.period_ms == 300_000
    assert limits.limit("3/second").policy.name == "route-3"


def readme_fastapi_example() -> str:
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## FastAPI and Starlette", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None
    return match.group(1)


class ExampleApp(ServerProcess):
    """The README's FastAPI example as a module, under ``uvicorn example:app``."""

    name = "fastapi-example"

    def __init__(self, workdir: Path, store_url: str) -> None:
        super().__init__(workdir)
        (workdir / "example.py").write_text(readme_fastapi_example())
        self.store_url = store_url

    def command(self) -> list[str]:
        return [sys.executable, "-m", "uvicorn", "example:app", "--app-dir", str(self.workdir),
                "--host", HOST, "--port", str(self.port), "--log-level", "warning", "--no-access-log"]

    def environment(self) -> dict[str, str]:
        return child_env(GATEWAY_STORE_URL=self.store_url)  # the README's URL, pointed at this test's

    def ready_url(self) -> str:
        return f"{self.url}/_gateway/healthz"


@pytest.mark.slow
def test_the_readme_fastapi_example_under_uvicorn(store_kind: str, request: pytest.FixtureRequest,
                                                  tmp_path: Path) -> None:
    """The README's example app, run by uvicorn: ten charges a minute per client, the eleventh the
    gateway's 429, both policies shown, other routes only the stack's."""
    url = "memory://" if store_kind == "memory" else request.getfixturevalue("redis_server").url
    app = ExampleApp(tmp_path, url).start()
    key = f"k-{tmp_path.name}"  # a client of this run only, on a shared Redis
    try:
        with httpx.Client(base_url=app.url, timeout=10.0, trust_env=False) as c:
            charges = [c.post("/charges", headers={"x-api-key": key}) for _ in range(11)]
            read = c.get("/charges/ch_1", headers={"x-api-key": key})
    finally:
        app.stop()
    assert [r.status_code for r in charges] == [200] * 10 + [429]
    assert charges[0].json() == {"id": "ch_1", "status": "succeeded"}
    assert charges[0].headers.get_list("ratelimit-policy") == [
        '"create-charge";q=10;w=60', '"per-client";q=100;w=60']
    assert charges[10].headers["content-type"] == "application/problem+json"
    assert charges[10].json()["violated-policies"] == ["create-charge"]
    assert read.status_code == 200
    assert read.headers.get_list("ratelimit-policy") == ['"per-client";q=100;w=60']
