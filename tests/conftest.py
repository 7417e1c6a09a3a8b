"""Shared fixtures: a real redis-server per session, and stores over fakeredis and real Redis.

In CI (``CI`` set) a missing redis-server fails the run; elsewhere those tests are skipped
with the reason, never silently.
"""

from __future__ import annotations

import inspect
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from gateway.store.memory import memory_store
from gateway.store.redis import RedisStore
from tests.hostile import RecordingUpstream
from tests.redis_process import RedisProcess, redis_server_binary

# generous: the suite runs on 2 noisy cores next to the servers it starts
TEST_STORE_TIMEOUT_S = 2.0


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object) -> None:
    """Run every ``async def`` test on asyncio through anyio's plugin (no extra dependency).

    The mark goes on before the test is parametrized, so fixture params still apply."""
    if name.startswith("test") and inspect.iscoroutinefunction(obj):
        pytest.mark.anyio(obj)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


def require_redis_server() -> None:
    if redis_server_binary() is None:
        message = "redis-server is not installed (apt-get install redis-server)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}: in CI a missing Redis is a failure, not a skip")
        pytest.skip(message)


def running_redis(args: tuple[str, ...] = ()) -> Iterator[RedisProcess]:
    """A started redis-server on a free loopback port (``args`` on its command line), stopped
    (by PID) afterwards."""
    require_redis_server()
    server = RedisProcess(args=args).start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisProcess]:
    """One real redis-server for the session."""
    yield from running_redis()


@pytest.fixture
def dedicated_redis() -> Iterator[RedisProcess]:
    """A redis-server of this test's own, for tests that kill or restart it."""
    yield from running_redis()


def unique_prefix() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["memory", "redis"])
def store_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
def store_section(store_kind: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    """A ``[store]`` section on memory:// or the session's real Redis, keys unique to the test."""
    if store_kind == "memory":
        return {"url": "memory://", "key_prefix": unique_prefix(), "timeout": "2s"}
    server: RedisProcess = request.getfixturevalue("redis_server")
    return {"url": server.url, "key_prefix": unique_prefix(), "timeout": "2s"}


@pytest.fixture
async def store(store_kind: str, request: pytest.FixtureRequest) -> AsyncIterator[RedisStore]:
    """A store on fakeredis (memory://) or on the session's real Redis, keys unique per test."""
    if store_kind == "memory":
        st = memory_store(key_prefix=unique_prefix(), timeout_s=TEST_STORE_TIMEOUT_S)
    else:
        server: RedisProcess = request.getfixturevalue("redis_server")
        st = RedisStore.from_url(server.url, key_prefix=unique_prefix(), timeout_s=TEST_STORE_TIMEOUT_S)
    try:
        await st.open()
        yield st
    finally:
        await st.close()


@pytest.fixture(scope="module")
def recording_upstream() -> Iterator[RecordingUpstream]:
    """A raw upstream that keeps every request's bytes (``tests/hostile.py``), one per module."""
    with RecordingUpstream() as up:
        yield up
