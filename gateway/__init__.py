"""gateway: rate limits and Idempotency-Key deduplication as pure ASGI middleware.

    from gateway import GatewayMiddleware
    app = GatewayMiddleware(app, config="gateway.toml")

Each decision is one atomic Lua script in Redis (or, for one process, in the embedded
``memory://`` store that runs the same scripts).
"""

from __future__ import annotations

import logging

from gateway.concurrency import ConcurrencyLimitMiddleware
from gateway.config import Config, load_config
from gateway.errors import (
    ConfigError,
    GatewayError,
    StoreError,
    StoreScriptError,
    StoreTimeout,
    StoreUnavailable,
)
from gateway.idempotency import IdempotencyMiddleware, mark_not_sent, mark_outcome_unknown
from gateway.ratelimit import RateLimitMiddleware
from gateway.requestid import RequestIdMiddleware
from gateway.shedding import LoadSheddingMiddleware
from gateway.stack import GatewayMiddleware

__all__ = [
    "ConcurrencyLimitMiddleware",
    "Config",
    "ConfigError",
    "GatewayError",
    "GatewayMiddleware",
    "IdempotencyMiddleware",
    "LoadSheddingMiddleware",
    "RateLimitMiddleware",
    "RequestIdMiddleware",
    "StoreError",
    "StoreScriptError",
    "StoreTimeout",
    "StoreUnavailable",
    "load_config",
    "mark_not_sent",
    "mark_outcome_unknown",
]
__version__ = "0.1.0"

# A library configures no logging: with none configured, Python's last-resort handler would
# print the gateway's warnings as bare lines on stderr. They go where the app sends its logs
# (``gateway serve`` and ``gateway demo`` write JSON lines), or nowhere.
logging.getLogger("gateway").addHandler(logging.NullHandler())
