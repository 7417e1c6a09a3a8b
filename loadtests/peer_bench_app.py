"""The gateway as an extra app of ``../shared/peer-bench`` (``run.sh --extra``).

It wraps peer-bench's own endpoint (``apps.endpoint_app``, importable when run.py starts the
app) in the gateway, exactly as a user would configure it, on the Redis run.py started
(``BENCH_REDIS_URL``). Built lazily on attribute access, so importing connects to nothing.

    bash ../shared/peer-bench/run.sh \
      --extra 'gw_rl=peer_bench_app:rl_app,path=loadtests,workload=get,python=.venv/bin/python' \
      --extra 'gw_idem=peer_bench_app:idem_app,path=loadtests,workload=post,python=.venv/bin/python'
"""

from __future__ import annotations

import os
from typing import Any

# high enough that no request of a 10 s run is denied: only the cost of deciding shows
HUGE_PER_MINUTE = 1_000_000


def build_rl_app() -> Any:
    """GET /hello behind GatewayMiddleware: request id + one per-client token bucket."""
    from apps import endpoint_app  # peer-bench's shared endpoint

    from gateway import GatewayMiddleware

    config = {
        "store": {"url": os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")},
        "rate_limit": [{"name": "per-client", "limit": HUGE_PER_MINUTE, "period": "1m"}],
    }
    return GatewayMiddleware(endpoint_app(), config)


def build_idem_app() -> Any:
    """POST /charge behind GatewayMiddleware: request id + Idempotency-Key (claim, complete)."""
    from apps import endpoint_app

    from gateway import GatewayMiddleware

    config = {"store": {"url": os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")}}
    return GatewayMiddleware(endpoint_app(), config)


def build_full_app() -> Any:
    """POST /charge behind the whole stack: request id, a token bucket, Idempotency-Key."""
    from apps import endpoint_app

    from gateway import GatewayMiddleware

    config = {
        "store": {"url": os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")},
        "rate_limit": [{"name": "per-client", "limit": HUGE_PER_MINUTE, "period": "1m"}],
    }
    return GatewayMiddleware(endpoint_app(), config)


def build_rl_mw_app() -> Any:
    """GET /hello behind RateLimitMiddleware alone (one per-client bucket, no request id or
    metrics), the single middleware as ``add_middleware`` would add it: the row to set beside
    the peers, which are single middlewares too."""
    from apps import endpoint_app

    from gateway import RateLimitMiddleware

    return RateLimitMiddleware(
        endpoint_app(),
        rate_limit=[{"name": "per-client", "limit": HUGE_PER_MINUTE, "period": "1m"}],
        store=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"),
    )


def build_idem_mw_app() -> Any:
    """POST /charge behind IdempotencyMiddleware alone (claim, complete; no request id or metrics)."""
    from apps import endpoint_app

    from gateway import IdempotencyMiddleware

    return IdempotencyMiddleware(endpoint_app(), store=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))


_BUILDERS = {"rl_app": build_rl_app, "idem_app": build_idem_app, "full_app": build_full_app,
             "rl_mw_app": build_rl_mw_app, "idem_mw_app": build_idem_mw_app}


def __getattr__(name: str) -> Any:
    if name in _BUILDERS:
        return _BUILDERS[name]()
    raise AttributeError(name)
