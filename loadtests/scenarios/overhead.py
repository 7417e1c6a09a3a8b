"""overhead: the same ``GET /hello`` direct to the upstream and through the gateway, same users.

Each iteration sends one request each way, in an order the user's seeded generator picks, so
both routes see the same client, the same moment's load and the same number of requests; only
the gateway's share differs. Locust's statistics separate them by name (``direct GET /hello``,
``gateway GET /hello``). The gateway's policy is one nothing drains (no 429), so every gateway
request pays for a real rate-limit decision in Redis, as in the peer benchmark.
"""

from __future__ import annotations

from locust import task

from loadtests.plan import DIRECT_HELLO, GATEWAY_HELLO
from loadtests.scenarios.common import GatewayUser, current_plan

__all__ = ["OverheadUser"]


class OverheadUser(GatewayUser):
    """GET /hello both ways per iteration."""

    def on_start(self) -> None:
        super().on_start()
        plan = current_plan()
        self.routes = [(f"{plan.direct_url}/hello", DIRECT_HELLO),
                       (f"{plan.gateway_url}/hello", GATEWAY_HELLO)]
        self.headers = {"X-Api-Key": f"lt-client-{self.index}"}

    @task
    def hello(self) -> None:
        routes = self.routes if self.rng.random() < 0.5 else self.routes[::-1]
        for url, name in routes:
            with self.client.get(url, headers=self.headers, name=name,
                                 catch_response=True) as response:
                if response.status_code != 200:
                    response.failure(f"unexpected status {response.status_code}")
