"""The bundled example behind ``gateway demo``: a tiny API behind the full stack on memory://.

It exists to show the gateway's behaviour with nothing installed but the package: the curl
lines it prints produce a 200 with RateLimit fields, then a 429 with ``Retry-After``.
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.config import load_config
from gateway.stack import GatewayMiddleware

__all__ = ["DEMO_CONFIG", "build_demo_app", "curl_lines"]

DEMO_CONFIG: dict[str, Any] = {
    "store": {"url": "memory://"},
    "rate_limit": [
        {"name": "per-client", "limit": 5, "period": "1m", "burst": 5, "key": "identity",
         "paths": ["/hello"]},
    ],
}


async def _hello(request: Request) -> JSONResponse:
    return JSONResponse({"hello": "world"})


async def _index(request: Request) -> JSONResponse:
    return JSONResponse({"try": ["GET /hello (5 per minute per client)"]})


def build_demo_app() -> GatewayMiddleware:
    """The demo API wrapped in the gateway, always on the embedded store (env overrides of
    the store URL are for real deployments, not for the demo)."""
    api = Starlette(routes=[Route("/", _index), Route("/hello", _hello)])
    return GatewayMiddleware(api, config=load_config(DEMO_CONFIG, env={}))


def curl_lines(base: str) -> list[str]:
    """What to type to watch the gateway work, one shell line each."""
    return [
        f"curl -i {base}/hello",
        "# five requests a minute per client pass; the sixth gets a 429 with Retry-After:",
        f"for i in 1 2 3 4 5 6; do curl -s -o /dev/null -w '%{{http_code}}\\n' {base}/hello; done",
        f"curl -i {base}/hello",
        "# another client (an API key is the identity) has its own bucket:",
        f"curl -i -H 'X-API-Key: alice' {base}/hello",
    ]
