"""Each single middleware alone, as a user adds it: with no arguments (its documented defaults),
or refused at construction with one line naming the key; and with ``config=`` (a TOML path, a
dict, a ``Config``) like ``GatewayMiddleware``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from gateway import (
    ConcurrencyLimitMiddleware,
    IdempotencyMiddleware,
    LoadSheddingMiddleware,
    RateLimitMiddleware,
    load_config,
)
from gateway.errors import ConfigError
from tests.asgi_helpers import client_for, lifespan_running


async def _hello(request: Any) -> PlainTextResponse:
    return PlainTextResponse("hello")


def starlette_app() -> Starlette:
    return Starlette(routes=[Route("/hello", _hello, methods=["GET", "POST"])])


async def test_rate_limit_middleware_with_no_arguments_applies_its_documented_default() -> None:
    app = starlette_app()
    app.add_middleware(RateLimitMiddleware)  # built at the first request, as Starlette does
    async with lifespan_running(app), client_for(app) as client:
        r = await client.get("/hello")
    assert r.status_code == 200
    assert r.headers["ratelimit-policy"] == '"per-client";q=100;w=60'


async def test_concurrency_limit_middleware_with_no_arguments_applies_its_documented_default() -> None:
    app = starlette_app()
    app.add_middleware(ConcurrencyLimitMiddleware)
    async with lifespan_running(app), client_for(app) as client:
        assert (await client.get("/hello")).status_code == 200
    (mw,) = [m for m in app.user_middleware if m.cls is ConcurrencyLimitMiddleware]
    assert mw.kwargs == {}


async def test_idempotency_middleware_with_no_arguments_dedupes() -> None:
    app = starlette_app()
    app.add_middleware(IdempotencyMiddleware)
    async with lifespan_running(app), client_for(app) as client:
        first = await client.post("/hello", headers={"idempotency-key": "k1"})
        again = await client.post("/hello", headers={"idempotency-key": "k1"})
    assert again.headers["idempotent-replayed"] == "true"
    assert first.text == again.text == "hello"


@pytest.mark.parametrize(("build", "key"), [
    (lambda app: RateLimitMiddleware(app, rate_limit=[]), "rate_limit"),
    (lambda app: ConcurrencyLimitMiddleware(app, concurrency_limit=[]), "concurrency_limit"),
    (LoadSheddingMiddleware, "shedding"),
    (lambda app: RateLimitMiddleware(app, config={"idempotency": {}}), "rate_limit"),
    (lambda app: RateLimitMiddleware(app, rate_limit=[{"methods": ["PSOT"]}]), "rate_limit[0].methods[0]"),
])
def test_a_middleware_that_would_do_nothing_is_refused_at_construction(build: Any, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        build(starlette_app())
    (line,) = info.value.problems
    assert line.startswith(f"{key}:")


def test_config_and_keywords_together_are_refused() -> None:
    with pytest.raises(TypeError, match="not both"):
        RateLimitMiddleware(starlette_app(), config={}, rate_limit=[{}])
    with pytest.raises(TypeError, match="not both"):
        LoadSheddingMiddleware(starlette_app(), config={}, shedding={"local": {"enabled": True}})


TOML = """
[store]
url = "memory://"
key_prefix = "single"

[[rate_limit]]
name = "tight"
limit = 2
period = "1h"

[[concurrency_limit]]
name = "one-at-a-time"
limit = 1

[idempotency]
header = "X-Idem"

[shedding.local]
enabled = true
"""


@pytest.mark.parametrize("form", ["path", "dict", "Config"])
async def test_every_single_middleware_takes_config(form: str, tmp_path: Path) -> None:
    import tomllib

    path = tmp_path / "gateway.toml"
    path.write_text(TOML)
    source: Any = {"path": str(path), "dict": tomllib.loads(TOML), "Config": load_config(path)}[form]
    limited = RateLimitMiddleware(starlette_app(), config=source)
    async with lifespan_running(limited), client_for(limited) as client:
        codes = [(await client.get("/hello")).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    keyed = IdempotencyMiddleware(starlette_app(), config=source)
    async with lifespan_running(keyed), client_for(keyed) as client:
        await client.post("/hello", headers={"x-idem": "a"})
        assert (await client.post("/hello", headers={"x-idem": "a"})).headers["idempotent-replayed"] == "true"
    concurrent = ConcurrencyLimitMiddleware(starlette_app(), config=source)
    shedding = LoadSheddingMiddleware(starlette_app(), config=source)
    for mw in (concurrent, shedding):
        async with lifespan_running(mw), client_for(mw) as client:
            assert (await client.get("/hello")).status_code == 200


async def test_idempotency_middleware_alone_gives_the_first_response_and_its_replay_the_request_id() -> None:
    """Alone, a keyed request's first response and its replay both carry an X-Request-Id: the
    request's own when it sent one, as through the stack."""
    app = starlette_app()
    app.add_middleware(IdempotencyMiddleware)
    async with lifespan_running(app), client_for(app) as client:
        first = await client.post("/hello", headers={"idempotency-key": "k1", "x-request-id": "r-1"})
        again = await client.post("/hello", headers={"idempotency-key": "k1", "x-request-id": "r-2"})
        made = await client.post("/hello", headers={"idempotency-key": "k1"})
    assert again.headers["idempotent-replayed"] == "true"
    assert first.headers.get_list("x-request-id") == ["r-1"]
    assert again.headers.get_list("x-request-id") == ["r-2"]
    assert len(made.headers.get_list("x-request-id")) == 1
