"""ratelimit: users hammer ``GET /hello`` through the gateway under a per-API-key token bucket.

User ``i`` sends ``X-Api-Key: lt-key-{i mod api_keys}``; with no think time each key is offered
far more than its rate, so its bucket runs dry and the pass rate is the limit. A 429 is the
expected answer, not a failure: Locust counts it as a success and the journal counts it as a
denial (with the window the key was used in, which the runner's checks compare against
``burst + rate * elapsed``). Every answer is checked on the wire: 200s carry the RateLimit
fields, 429s also ``Retry-After`` (whole seconds, at least 1).
"""

from __future__ import annotations

import time

from locust import task

from loadtests.plan import GATEWAY_HELLO
from loadtests.scenarios.common import JOURNAL, GatewayUser, current_plan, header, missing_fields

__all__ = ["RateLimitedUser"]

ALLOWED_FIELDS = ("RateLimit", "RateLimit-Policy")
DENIED_FIELDS = ("RateLimit", "RateLimit-Policy", "Retry-After")


class RateLimitedUser(GatewayUser):
    """GET /hello as fast as answers come, under one of the plan's API keys."""

    def on_start(self) -> None:
        super().on_start()
        self.api_key = f"lt-key-{self.index % current_plan().api_keys}"

    @task
    def hello(self) -> None:
        sent = time.monotonic()
        with self.client.get("/hello", headers={"X-Api-Key": self.api_key}, name=GATEWAY_HELLO,
                             catch_response=True) as response:
            received = time.monotonic()
            status = response.status_code
            if status == 200:
                outcome = "allowed"
                missing = missing_fields(response.headers, ALLOWED_FIELDS)
            elif status == 429:
                outcome = "denied"
                missing = missing_fields(response.headers, DENIED_FIELDS)
                retry_after = header(response.headers, "Retry-After") or ""
                if retry_after and not (retry_after.isdigit() and int(retry_after) >= 1):
                    JOURNAL.violation("retry_after_malformed", f"Retry-After: {retry_after!r}")
                response.success()  # the limit working is not an error
            else:
                outcome, missing = "other", []
                response.failure(f"unexpected status {status}")
            if missing:
                JOURNAL.violation("ratelimit_fields_missing", f"{status} without {', '.join(missing)}")
                response.failure(f"{status} without {', '.join(missing)}")
            JOURNAL.rate(self.api_key, outcome, sent, received)
