"""Real concurrency: the bucket admits exactly `burst` requests however they interleave."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from gateway import GatewayMiddleware
from tests.asgi_helpers import CountingApp, client_for, run_in_threads
from tests.conftest import unique_prefix
from tests.redis_process import RedisProcess

BURST = 50
# one token an hour: nothing refills while the test runs
POLICY = {"name": "burst", "limit": 1, "period": "1h", "burst": BURST, "key": "global",
          "on_store_error": "deny"}


async def fire(gw: GatewayMiddleware, n: int, start: threading.Barrier | None = None) -> list[int]:
    async with client_for(gw) as c:
        if start is not None:
            start.wait(timeout=10)
        responses = await asyncio.gather(*(c.get(f"/r/{i}") for i in range(n)))
    return [r.status_code for r in responses]


def test_two_instances_in_two_threads_admit_exactly_burst(redis_server: RedisProcess) -> None:
    """200 concurrent requests through two middleware instances (own loops, own pools) on one
    real Redis: exactly 50 pass, 150 get 429, and the apps ran exactly 50 times."""
    config: dict[str, Any] = {
        "store": {"url": redis_server.url, "key_prefix": unique_prefix(), "timeout": "5s"},
        "rate_limit": [POLICY],
    }
    apps = [CountingApp(), CountingApp()]
    results: list[list[int]] = [[], []]
    barrier = threading.Barrier(2)

    def run(i: int) -> None:
        async def main() -> None:
            gw = GatewayMiddleware(apps[i], config)
            try:
                results[i] = await fire(gw, 100, barrier)
            finally:
                await gw.store.close()

        asyncio.run(main())

    run_in_threads(run, 2)
    statuses = results[0] + results[1]
    assert len(statuses) == 200
    assert statuses.count(200) == BURST
    assert statuses.count(429) == 200 - BURST
    assert apps[0].calls + apps[1].calls == BURST


async def test_one_instance_on_either_store_admits_exactly_burst(store_kind: str, request: Any) -> None:
    """200 requests gathered on one event loop through one instance: exactly 50 pass."""
    url = "memory://" if store_kind == "memory" else request.getfixturevalue("redis_server").url
    app = CountingApp()
    gw = GatewayMiddleware(app, {"store": {"url": url, "key_prefix": unique_prefix(), "timeout": "5s"},
                                 "rate_limit": [POLICY]})
    try:
        statuses = await fire(gw, 200)
    finally:
        await gw.store.close()
    assert statuses.count(200) == BURST
    assert statuses.count(429) == 200 - BURST
    assert app.calls == BURST
