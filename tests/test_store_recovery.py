"""A restarted Redis (data and scripts gone) or a SCRIPT FLUSH costs no request an error."""

from __future__ import annotations

from typing import Any

import redis.asyncio

from gateway import GatewayMiddleware
from tests.asgi_helpers import CountingApp, client_for
from tests.redis_process import RedisProcess

# deny on store error: any failed store call would show as a 503, never as a quiet 200
POLICY = {"name": "p", "limit": 100, "period": "1m", "on_store_error": "deny"}


def gateway_on(server: RedisProcess) -> tuple[GatewayMiddleware, CountingApp]:
    app = CountingApp()
    config: dict[str, Any] = {"store": {"url": server.url, "timeout": "2s"}, "rate_limit": [POLICY]}
    return GatewayMiddleware(app, config), app


async def test_restarted_redis_is_survived(dedicated_redis: RedisProcess) -> None:
    """After a Redis crash and restart, the very next request is decided (pool reconnects,
    NOSCRIPT reloads the script) without restarting the gateway."""
    gw, app = gateway_on(dedicated_redis)
    sha = gw.store._take.sha  # type: ignore[attr-defined]
    # an observer of its own, so the gateway's pooled connection stays the dead one
    observer = redis.asyncio.Redis.from_url(dedicated_redis.url)
    try:
        async with client_for(gw) as c:
            for _ in range(3):
                remaining = 100 - app.calls - 1
                assert (await c.get("/")).headers["ratelimit"].startswith(f'"p";r={remaining};')
            dedicated_redis.restart()
            assert await observer.script_exists(sha) == [False]
            r = await c.get("/")
            assert r.status_code == 200
            assert r.headers["ratelimit"] == '"p";r=99;t=1'  # a new, empty Redis: a fresh bucket
            assert await observer.script_exists(sha) == [True]
    finally:
        await observer.aclose()
        await gw.store.close()


async def test_script_flush_mid_run_is_survived(dedicated_redis: RedisProcess) -> None:
    """SCRIPT FLUSH between requests: the next one reloads the script and keeps the bucket."""
    gw, _ = gateway_on(dedicated_redis)
    try:
        async with client_for(gw) as c:
            assert (await c.get("/")).status_code == 200
            await gw.store.client.script_flush()
            r = await c.get("/")
        assert r.status_code == 200
        assert r.headers["ratelimit"].startswith('"p";r=98;')  # same bucket, data kept
    finally:
        await gw.store.close()


async def test_redis_down_then_back_recovers_without_restart(dedicated_redis: RedisProcess) -> None:
    """While Redis is down deny-policies answer 503; once it is back, requests are decided again."""
    gw, app = gateway_on(dedicated_redis)
    try:
        async with client_for(gw) as c:
            assert (await c.get("/")).status_code == 200
            dedicated_redis.stop()
            down = await c.get("/")
            assert down.status_code == 503
            dedicated_redis.start()
            back = await c.get("/")
        assert back.status_code == 200
        assert back.headers["ratelimit"] == '"p";r=99;t=1'
        assert app.calls == 2
    finally:
        await gw.store.close()
