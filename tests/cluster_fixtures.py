"""Fixtures that start real Redis Clusters (``tests/redis_cluster.py``); import them by name.

In CI (``CI`` set) a missing ``redis-server`` or ``redis-cli`` fails the run; elsewhere the
tests that need a cluster are skipped with the reason, never silently.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.conftest import require_redis_server
from tests.redis_cluster import RedisCluster, redis_cli_binary

__all__ = ["failover_cluster", "own_cluster", "redis_cluster", "require_redis_cluster"]


def require_redis_cluster() -> None:
    require_redis_server()
    if redis_cli_binary() is None:
        message = "redis-cli is not installed (apt-get install redis-tools)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}: in CI a missing Redis is a failure, not a skip")
        pytest.skip(message)


def running_cluster(replicas: int) -> Iterator[RedisCluster]:
    require_redis_cluster()
    cluster = RedisCluster(masters=3, replicas=replicas).start()
    try:
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """One 3-master cluster (no replicas) shared by the tests that never kill a node."""
    yield from running_cluster(replicas=0)


@pytest.fixture
def failover_cluster() -> Iterator[RedisCluster]:
    """A 3-master cluster with one replica per master, of this test's own (it kills a master)."""
    yield from running_cluster(replicas=1)


@pytest.fixture
def own_cluster() -> Iterator[RedisCluster]:
    """A 3-master cluster (no replicas) of this test's own (it changes the topology)."""
    yield from running_cluster(replicas=0)
