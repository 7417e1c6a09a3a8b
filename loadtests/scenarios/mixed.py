"""mixed: rate-limited GETs, idempotent payments and a few unkeyed POSTs, through one gateway.

The blend: one user posts ``/charges`` without a key, which the idempotency layer lets through
untouched (every such POST runs); of the others, by Locust weight, five in nine hammer
``GET /hello`` under the per-key limit (as in ``ratelimit``) and four in nine pay (as in
``payments``). So the blend needs three users at least. The runner
checks the invariants of both: the allowed rate per key, and no key executed twice.
"""

from __future__ import annotations

from locust import task

from loadtests.plan import CHARGE_UNKEYED
from loadtests.scenarios.common import JOURNAL, GatewayUser
from loadtests.scenarios.payments import PaymentUser
from loadtests.scenarios.ratelimit import RateLimitedUser

__all__ = ["MixedPaymentUser", "MixedRateLimitedUser", "UnkeyedPostUser"]



class MixedRateLimitedUser(RateLimitedUser):
    weight = 5


class MixedPaymentUser(PaymentUser):
    weight = 4


class UnkeyedPostUser(GatewayUser):
    """POST /charges without an Idempotency-Key: passes the gateway, runs every time."""

    fixed_count = 1  # one such user whatever the total: by weight a small run would have none

    @task
    def charge(self) -> None:
        body = '{"amount":100,"currency":"eur"}'
        with self.client.post("/charges", data=body, name=CHARGE_UNKEYED, catch_response=True,
                              headers={"Content-Type": "application/json",
                                       "X-Api-Key": f"lt-unkeyed-{self.index}"}) as response:
            if response.status_code == 201:
                JOURNAL.count("unkeyed_201")
            else:
                response.failure(f"unexpected status {response.status_code}")
