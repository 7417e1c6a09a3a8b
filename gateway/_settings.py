"""Turning a single middleware's keyword settings into config sections and a store.

``RateLimitMiddleware(app, rate_limit=[{...}], identity={...}, store="redis://...")`` and
``IdempotencyMiddleware(app, idempotency={...}, identity={...}, store=...)`` and
``ConcurrencyLimitMiddleware(app, concurrency_limit=[{...}], ...)`` take the same
settings as the TOML sections, as dicts or as the typed objects, and report problems with the
same ``ConfigError`` lines as ``load_config``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from gateway.config import (
    ConcurrencyLimit,
    Config,
    IdempotencyConfig,
    IdentityConfig,
    RateLimitPolicy,
    StoreConfig,
    load_config,
)
from gateway.store import Store, store_from_config

__all__ = ["StoreSetting", "resolve"]

StoreSetting = str | Mapping[str, Any] | StoreConfig | Store | None


def resolve(
    *,
    rate_limit: Sequence[Mapping[str, Any] | RateLimitPolicy] | None = None,
    concurrency_limit: Sequence[Mapping[str, Any] | ConcurrencyLimit] | None = None,
    identity: Mapping[str, Any] | IdentityConfig | None = None,
    sections: Mapping[str, Any] | None = None,
    idempotency: Mapping[str, Any] | IdempotencyConfig | None = None,
    store: StoreSetting = None,
) -> tuple[Config, Store, bool]:
    """The config these settings describe, the store to use, and whether the caller owns it.

    ``sections``: more top-level sections shaped like the TOML (``priority``, ``shedding``).
    A ``Store`` instance is shared (its owner opens and closes it); anything else builds a new
    store that the middleware owns.
    """
    data: dict[str, Any] = {}
    typed: dict[str, Any] = {}
    if rate_limit is not None:
        if isinstance(rate_limit, Mapping | str):
            data["rate_limit"] = rate_limit  # load_config names the problem
        elif all(isinstance(p, RateLimitPolicy) for p in rate_limit):
            typed["rate_limits"] = tuple(rate_limit)
        else:
            data["rate_limit"] = list(rate_limit)
    if concurrency_limit is not None:
        if isinstance(concurrency_limit, Mapping | str):
            data["concurrency_limit"] = concurrency_limit  # load_config names the problem
        elif all(isinstance(c, ConcurrencyLimit) for c in concurrency_limit):
            typed["concurrency_limits"] = tuple(concurrency_limit)
        else:
            data["concurrency_limit"] = list(concurrency_limit)
    if isinstance(identity, IdentityConfig):
        typed["identity"] = identity
    elif identity is not None:
        data["identity"] = identity
    if isinstance(idempotency, IdempotencyConfig):
        typed["idempotency"] = idempotency
    elif idempotency is not None:
        data["idempotency"] = idempotency
    data.update(sections or {})  # more TOML-shaped sections, checked by load_config
    shared: Store | None = None
    if isinstance(store, StoreConfig):
        typed["store"] = store
    elif isinstance(store, str):
        data["store"] = {"url": store}
    elif isinstance(store, Mapping):
        data["store"] = store
    elif store is not None:
        shared = store
    config = dataclasses.replace(load_config(data), **typed)
    if shared is not None:
        return config, shared, False
    return config, store_from_config(config.store), True
