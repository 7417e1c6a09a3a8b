"""The bundled example behind ``gateway demo``: a tiny API behind the full stack on memory://.

It exists to show the gateway's behaviour with nothing installed but the package: the curl
lines it prints produce a 200 with RateLimit fields, then a 429 with ``Retry-After``; a charge
with an ``Idempotency-Key`` that runs once and is replayed (``Idempotent-Replayed: true``); the
same key with another body (422); two at once (409 for the second while the first runs); three
slow reports at once, the third refused by a concurrency limit (429); and what
``/_gateway/metrics`` counted.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.config import load_config
from gateway.stack import GatewayMiddleware

__all__ = ["CHARGE_SECONDS", "DEMO_CONFIG", "REPORT_SECONDS", "build_demo_app", "curl_lines"]

#: How long a demo charge takes ("talking to the card network"), long enough to show a 409.
CHARGE_SECONDS = 1.0
#: How long a demo report takes to build: long enough to have three in flight at once.
REPORT_SECONDS = 1.0

DEMO_CONFIG: dict[str, Any] = {
    "store": {"url": "memory://"},
    "rate_limit": [
        {"name": "per-client", "limit": 5, "period": "1m", "burst": 5, "key": "identity",
         "paths": ["/hello"]},
    ],
    "concurrency_limit": [
        {"name": "reports-in-flight", "limit": 2, "key": "identity", "paths": ["/report"]},
    ],
    "idempotency": {"required_paths": ["/charges"], "ttl": "24h"},
}


async def _hello(request: Request) -> JSONResponse:
    return JSONResponse({"hello": "world"})


async def _report(request: Request) -> JSONResponse:
    await asyncio.sleep(REPORT_SECONDS)
    return JSONResponse({"report": "ready"})


async def _index(request: Request) -> JSONResponse:
    return JSONResponse({"try": [
        "GET /hello (5 per minute per client)",
        "GET /report (slow; 2 in flight at once per client)",
        "POST /charges with an Idempotency-Key header and a JSON body like {\"amount\": 1234}",
    ]})


def _charges_endpoint() -> Any:
    numbers = itertools.count(1)

    async def create_charge(request: Request) -> JSONResponse:
        try:
            data = json.loads(await request.body() or b"{}")
            amount = int(data["amount"])
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": 'expected a JSON body like {"amount": 1234}'}, status_code=400)
        await asyncio.sleep(CHARGE_SECONDS)
        charge_id = f"ch_{next(numbers):04d}"
        charge = {"id": charge_id, "amount": amount, "currency": str(data.get("currency", "EUR"))}
        return JSONResponse(charge, status_code=201, headers={"Location": f"/charges/{charge_id}"})

    return create_charge


def build_demo_app() -> GatewayMiddleware:
    """The demo API wrapped in the gateway, always on the embedded store (env overrides of
    the store URL are for real deployments, not for the demo)."""
    api = Starlette(routes=[
        Route("/", _index),
        Route("/hello", _hello),
        Route("/report", _report),
        Route("/charges", _charges_endpoint(), methods=["POST"]),
    ])
    return GatewayMiddleware(api, config=load_config(DEMO_CONFIG, env={}))


def curl_lines(base: str) -> list[str]:
    """What to type to watch the gateway work, one shell line each."""

    def charge(key: str, amount: int, flags: str = "-i") -> str:
        return (f"curl {flags} -X POST {base}/charges -H 'Idempotency-Key: {key}' "
                f"-H 'Content-Type: application/json' -d '{{\"amount\": {amount}}}'")

    return [
        f"curl -i {base}/hello",
        "# five requests a minute per client pass; the sixth gets a 429 with Retry-After:",
        f"for i in 1 2 3 4 5 6; do curl -s -o /dev/null -w '%{{http_code}}\\n' {base}/hello; done",
        f"curl -i {base}/hello",
        "# another client (an API key is the identity) has its own bucket:",
        f"curl -i -H 'X-API-Key: alice' {base}/hello",
        "# a charge runs once (201); the same request again is replayed (Idempotent-Replayed: true):",
        charge("order-1001", 1234),
        charge("order-1001", 1234),
        "# the same key with another body gets a 422; a charge without a key, a 400:",
        charge("order-1001", 9999),
        f"curl -i -X POST {base}/charges -H 'Content-Type: application/json' -d '{{\"amount\": 1234}}'",
        "# two at once: the second gets a 409 while the first is still running:",
        f"{charge('order-1002', 500, '-s')} & sleep 0.3; {charge('order-1002', 500, '-s')}; wait",
        "# a slow report, three at once: two run, the third is refused (429, too many in flight):",
        f"for i in 1 2 3; do curl -s -w ' %{{http_code}}\\n' {base}/report & sleep 0.1; done; wait",
        "# what the gateway counted (Prometheus text), and its health and readiness probes:",
        f"curl -s {base}/_gateway/metrics"
        " | grep -E '^gateway_(requests|ratelimit|concurrency|idempotency)_[a-z_]*total'",
        f"curl -s {base}/_gateway/healthz; curl -s {base}/_gateway/readyz",
    ]
