"""[[concurrency_limit]] across ``gateway serve`` processes on one real Redis: the upstream
records its own concurrency, and a SIGKILLed gateway's slots come back after ``lease``."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.redis_process import RedisProcess
from tests.serve_process import GatewayServe, Upstream, serve_config

pytestmark = pytest.mark.slow

LIMITED = "urn:gateway:problem:concurrency-limit-exceeded"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("concurrency")


@pytest.fixture(scope="module")
def upstream(workdir: Path) -> Iterator[Upstream]:
    process = Upstream(workdir)
    try:
        process.start()
        yield process
    finally:
        process.stop()


def held_stats(upstream: Upstream, key: str) -> dict[str, int]:
    with upstream.client() as client:
        stats: dict[str, int] = client.get("/held/stats", params={"key": key}).json()
    return stats


def limited_config(
    upstream: Upstream, redis_server: RedisProcess, prefix: str, **limit: Any,
) -> dict[str, Any]:
    section = {"name": "in-flight", "limit": 5, "key": "identity", "paths": ["/held"], **limit}
    return serve_config(upstream.url, redis_server.url, prefix, concurrency_limit=[section])


def slot_holders(redis_server: RedisProcess, prefix: str) -> int:
    client = redis.Redis.from_url(redis_server.url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:v1:cl:*"))
        for key in keys:
            assert client.pttl(key) > 0  # every slot set has a TTL
        return sum(int(client.zcard(k)) for k in keys)
    finally:
        client.close()


async def _burst(urls: list[str], n: int, path: str, key: str) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=30.0) as client:
        return await asyncio.gather(*(client.get(urls[i % len(urls)] + path, headers={"x-api-key": key})
                                      for i in range(n)))


def test_two_gateways_never_let_more_than_the_limit_reach_the_upstream(
    workdir: Path, upstream: Upstream, redis_server: RedisProcess,
) -> None:
    prefix = f"cl{uuid.uuid4().hex[:10]}"
    config = limited_config(upstream, redis_server, prefix)
    first, second = GatewayServe(workdir, config), GatewayServe(workdir, config)
    key = f"client-{uuid.uuid4().hex}"
    try:
        first.start()
        second.start()
        responses = asyncio.run(_burst([first.url, second.url], 50, "/held?s=0.3", key))
    finally:
        first.stop()
        second.stop()
    after = held_stats(upstream, key)
    codes = Counter(r.status_code for r in responses)
    assert set(codes) <= {200, 429}, codes
    assert codes[200] >= 5
    assert after["done"] == codes[200]  # refused ones never reached it
    assert after["peak"] <= 5, after  # the upstream's own count, over both gateways
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["type"] == LIMITED
    assert slot_holders(redis_server, prefix) == 0  # every slot back afterwards


def test_a_killed_gateways_slots_come_back_after_the_lease(
    workdir: Path, upstream: Upstream, redis_server: RedisProcess,
) -> None:
    prefix = f"cl{uuid.uuid4().hex[:10]}"
    config = limited_config(upstream, redis_server, prefix, limit=2, lease="1s")
    doomed, survivor = GatewayServe(workdir, config), GatewayServe(workdir, config)
    try:
        doomed.start()
        survivor.start()
        key = f"client-{uuid.uuid4().hex}"

        async def hold_and_kill() -> None:
            async with httpx.AsyncClient(timeout=30.0) as client:
                holding = [asyncio.ensure_future(client.get(doomed.url + "/held?s=20",
                                                            headers={"x-api-key": key})) for _ in range(2)]
                end = time.monotonic() + 10
                while held_stats(upstream, key)["now"] < 2:
                    assert time.monotonic() < end, "the two requests never reached the upstream"
                    await asyncio.sleep(0.05)
                doomed.signal(signal.SIGKILL)
                await asyncio.gather(*holding, return_exceptions=True)

        asyncio.run(hold_and_kill())
        killed_at = time.monotonic()
        assert slot_holders(redis_server, prefix) == 2
        with survivor.client() as client:
            assert client.get("/held?s=0", headers={"x-api-key": key}).status_code == 429
            end = killed_at + 10
            while True:
                r = client.get("/held?s=0", headers={"x-api-key": key})
                if r.status_code == 200:
                    break
                assert r.status_code == 429, r.text
                assert time.monotonic() < end, "the dead gateway's slots never came back"
                time.sleep(0.1)
        back_after = time.monotonic() - killed_at
    finally:
        doomed.stop()
        survivor.stop()
    assert back_after < 1.0 + 2.0  # about one lease (a renewal may have landed just before the kill)
