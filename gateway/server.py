"""The app ``gateway serve`` runs: the proxy behind the whole stack, built in each worker.

uvicorn imports ``gateway.server:create_app`` by name (``factory=True``) in every worker, which is
what lets ``--workers N`` start N independent processes; the config file reaches them through
``GATEWAY_CONFIG``. Each worker has its own store connections, proxy pool and metrics, and
shares limits and idempotency records with the others through the store.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

from gateway.config import Config, load_config
from gateway.errors import ConfigError
from gateway.http_protocol import GatewayHttpProtocol
from gateway.lifespan import SHUTDOWN_DRAIN_S
from gateway.metrics import Metrics
from gateway.problem import renderer_for
from gateway.proxy import ProxyApp
from gateway.stack import GatewayMiddleware

__all__ = ["ENV_CONFIG", "ENV_LOG_LEVEL", "build_app", "create_app", "uvicorn_options"]

#: The environment variable that names the config file for the workers.
ENV_CONFIG = "GATEWAY_CONFIG"
#: The level of the workers' gateway loggers (``gateway serve --log-level``).
ENV_LOG_LEVEL = "GATEWAY_LOG_LEVEL"


def build_app(config: Config) -> GatewayMiddleware:
    """The reverse proxy to ``[upstream]`` behind the full stack, one metrics for both."""
    metrics = Metrics((p.name for p in config.rate_limits), (c.name for c in config.concurrency_limits))
    proxy = ProxyApp(config.upstream, trusted_proxies=config.identity.trusted_proxies, metrics=metrics,
                     renderer=renderer_for(config.errors.format))
    # uvicorn's own Date is off (the upstream's passes through): the gateway dates what it makes
    return GatewayMiddleware(proxy, config, metrics=metrics, date_header=True)


def create_app() -> GatewayMiddleware:
    """uvicorn's app factory: the config file named by ``GATEWAY_CONFIG``, JSON logs on stderr."""
    from gateway.logs import install_json_logging

    path = os.environ.get(ENV_CONFIG)
    if not path:
        raise ConfigError([f"{ENV_CONFIG}: not set; run the proxy with `gateway serve --config FILE`"])
    level = os.environ.get(ENV_LOG_LEVEL, "info").upper()
    install_json_logging(getattr(logging, level, logging.INFO))
    return build_app(load_config(path))


def uvicorn_options(config: Config, *, access_log: bool = False, log_level: str = "info") -> dict[str, Any]:
    """uvicorn settings for the gateway, beyond the app and the socket.

    * ``proxy_headers`` off: uvicorn would otherwise take the client address from
      ``X-Forwarded-For`` whenever the peer is 127.0.0.1; the gateway believes that header only
      from ``identity.trusted_proxies`` and does the walk itself.
    * no ``server``/``date`` headers of uvicorn's own: the upstream's pass through.
    * the connection is ``GatewayHttpProtocol`` (``gateway/http_protocol.py``): trailers never
      become headers, a request head has ``server.header_timeout`` to arrive, and a worker holds
      at most ``server.max_connections`` connections.
    * uvicorn's own log lines are JSON on stderr like the gateway's, at WARNING (``log_level``
      ``debug``: at DEBUG); ``access_log``: one ``http.access`` line per response.
    * a graceful shutdown bounded by the upstream timeout plus the time settles may still take:
      in-flight requests finish and their idempotency records are stored before the store closes.
    """
    from gateway.logs import uvicorn_log_config

    uvicorn_level = "DEBUG" if log_level == "debug" else "WARNING"
    return {
        "log_config": uvicorn_log_config(uvicorn_level, access_log=access_log),
        "loop": "uvloop" if _has("uvloop") else "asyncio",
        "http": functools.partial(GatewayHttpProtocol, header_timeout_s=config.server.header_timeout_s,
                                  max_connections=config.server.max_connections,
                                  error_format=config.errors.format),
        "lifespan": "on",
        "log_level": None,  # the levels are log_config's
        "access_log": access_log,
        "proxy_headers": False,
        "server_header": False,
        "date_header": False,
        "timeout_graceful_shutdown": int(config.upstream.timeout_s + SHUTDOWN_DRAIN_S) + 1,
    }


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
