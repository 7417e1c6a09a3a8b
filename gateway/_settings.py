"""Turning a single middleware's keyword settings into config sections and a store.

``RateLimitMiddleware(app, rate_limit=[{...}], identity={...}, store="redis://...")`` and
``IdempotencyMiddleware(app, idempotency={...}, identity={...}, store=...)`` and
``ConcurrencyLimitMiddleware(app, concurrency_limit=[{...}], ...)`` take the same
settings as the TOML sections, as dicts or as the typed objects, and report problems with the
same ``ConfigError`` lines as ``load_config``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

from gateway.config import (
    ConcurrencyLimit,
    Config,
    IdempotencyConfig,
    IdentityConfig,
    RateLimitPolicy,
    SourceFunction,
    StoreConfig,
    load_config,
)
from gateway.store import Store, store_from_config

__all__ = ["ConfigSetting", "StoreSetting", "resolve", "with_identity"]

StoreSetting = str | Mapping[str, Any] | StoreConfig | Store | None


ConfigSetting = str | os.PathLike[str] | Mapping[str, Any] | Config | None


def resolve(
    *,
    config: ConfigSetting = None,
    rate_limit: Sequence[Mapping[str, Any] | RateLimitPolicy] | None = None,
    concurrency_limit: Sequence[Mapping[str, Any] | ConcurrencyLimit] | None = None,
    identity: Mapping[str, Any] | IdentityConfig | SourceFunction | None = None,
    sections: Mapping[str, Any] | None = None,
    idempotency: Mapping[str, Any] | IdempotencyConfig | None = None,
    store: StoreSetting = None,
) -> tuple[Config, Store, bool]:
    """The config these settings describe, the store to use, and whether the caller owns it.

    ``config``: a whole config (a TOML path, a dict of its shape, or a ``Config``), as
    ``GatewayMiddleware`` takes it, instead of the section keywords (only ``store`` may be given
    with it: a shared store). ``sections``: more top-level sections shaped like the TOML
    (``priority``, ``shedding``). A ``Store`` instance is shared (its owner opens and closes
    it); anything else builds a new store that the middleware owns. ``identity`` may be a
    callable (sync or async, given the scope): the one identity source (``with_identity``), with
    ``config`` too.
    """
    if callable(identity):
        built, st, owns = resolve(config=config, rate_limit=rate_limit, concurrency_limit=concurrency_limit,
                                  sections=sections, idempotency=idempotency, store=store)
        return with_identity(built, identity), st, owns
    if config is not None:
        keywords = (("rate_limit", rate_limit), ("concurrency_limit", concurrency_limit),
                    ("identity", identity), ("idempotency", idempotency), ("sections", sections))
        given = [name for name, value in keywords if value is not None]
        if given:
            msg = f"give the settings in config= or as keywords ({', '.join(given)}), not both"
            raise TypeError(msg)
        whole = load_config(config)
        if store is None:
            return whole, store_from_config(whole.store), True
        if isinstance(store, str | Mapping | StoreConfig):
            return _with_store(whole, store)
        return whole, store, False
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
    built = dataclasses.replace(load_config(data), **typed)
    if shared is not None:
        return built, shared, False
    return built, store_from_config(built.store), True


def with_identity(config: Config, identity: SourceFunction | None) -> Config:
    """``config`` with ``identity`` (a callable) as its one identity source; itself for None."""
    if identity is None:
        return config
    if not callable(identity):
        msg = f"identity= takes a callable (given the ASGI scope), got {identity!r}"
        raise TypeError(msg)
    return dataclasses.replace(config, identity=dataclasses.replace(config.identity, sources=(identity,)))


def _with_store(config: Config, store: str | Mapping[str, Any] | StoreConfig) -> tuple[Config, Store, bool]:
    """``config`` with its ``[store]`` replaced by ``store`` (a URL, a section, a StoreConfig)."""
    if isinstance(store, StoreConfig):
        section = store
    else:
        section = load_config({"store": {"url": store} if isinstance(store, str) else store}).store
    config = dataclasses.replace(config, store=section)
    return config, store_from_config(section), True
