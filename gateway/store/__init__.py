"""Stores: where buckets (and idempotency records) live, chosen by the URL's scheme."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.config import StoreConfig
from gateway.errors import ConfigError
from gateway.store.base import (
    BucketSpec,
    BucketState,
    Claim,
    ClaimOutcome,
    LeaseTerms,
    RateDecision,
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
    "Store",
    "StoredResponse",
    "TakePlan",
    "store_from_config",
]


def store_from_config(config: StoreConfig, *, metrics: Metrics | None = None) -> Store:
    """Build (without connecting) the store ``config`` names: ``memory://`` or a Redis URL;
    with ``metrics``, every call's latency is observed there."""
    if config.cluster:
        raise ConfigError(["store.cluster: Redis Cluster is not supported by this version yet"])
    if config.url == "memory://":
        from gateway.store.memory import memory_store

        return memory_store(key_prefix=config.key_prefix, timeout_s=config.timeout_s, metrics=metrics)
    from gateway.store.redis import RedisStore

    return RedisStore.from_url(
        config.url, key_prefix=config.key_prefix, timeout_s=config.timeout_s, metrics=metrics
    )
