"""Stores: where buckets (and idempotency records) live, chosen by the URL's scheme."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway.config import StoreConfig
from gateway.store.base import (
    BucketSpec,
    BucketState,
    Claim,
    ClaimOutcome,
    LeaseTerms,
    RateDecision,
    RecordWatch,
    SlotDecision,
    SlotPlan,
    Store,
    StoredResponse,
    TakePlan,
)

if TYPE_CHECKING:
    from gateway.metrics import Metrics

__all__ = [
    "BucketSpec",
    "BucketState",
    "Claim",
    "ClaimOutcome",
    "LeaseTerms",
    "RateDecision",
    "RecordWatch",
    "SlotDecision",
    "SlotPlan",
    "Store",
    "StoredResponse",
    "TakePlan",
    "store_from_config",
]


def store_from_config(config: StoreConfig, *, metrics: Metrics | None = None) -> Store:
    """Build (without connecting) the store ``config`` names: ``memory://``, one Redis, the
    master Redis Sentinels name, or a Redis Cluster; with ``metrics``, every call's latency and
    errors and the circuit breaker's state are shown there."""
    from gateway.store.guard import new_breaker
    from gateway.store.redis import RedisStore

    breaker = new_breaker(config.breaker_failures, config.breaker_cooldown_s, metrics)
    options: dict[str, Any] = {
        "key_prefix": config.key_prefix, "timeout_s": config.timeout_s, "metrics": metrics,
        "max_connections": config.max_connections, "breaker": breaker,
    }
    if config.url == "memory://":
        from gateway.store.memory import memory_store

        return memory_store(**options)
    if config.sentinels:
        return RedisStore.from_sentinels(config.url, config.sentinels, config.service_name, **options)
    if config.cluster:
        from gateway.store.cluster import ClusterStore

        return ClusterStore.from_url(config.url, **options)
    return RedisStore.from_url(config.url, **options)
