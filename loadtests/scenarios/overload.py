"""overload: a flood of sheddable ``GET /work`` far beyond one gateway process, beside a steady
trickle of critical ``POST /charges``.

- ``CriticalUser`` (``CRITICAL_USERS`` of them, whatever the total): one charge every
  ``CRITICAL_PACING_S`` (Locust's ``constant_pacing``: a steady rate, not a closed loop that
  slows down when answers do), each with a new Idempotency-Key, so the upstream's record says
  which ran. The gateway config puts ``POST /charges`` in the ``critical`` class, which the local
  shedder never sheds. Each request is named by the phase it was sent in: ``(critical,
  unloaded)`` before the flood, ``(critical, flood)`` after, so the two p99s come out of the same
  run's statistics.
- ``FloodUser`` (every other user): waits out the baseline (``Plan.baseline_s``, counted from
  the first user started), then sends ``GET /work?ms=WORK_MS`` with no think time. The request
  is in the default class: the local shedder lets ``max_in_flight`` of them in and answers the
  rest ``503`` ``urn:gateway:problem:load-shed`` with ``Retry-After``, which is a success here;
  a timeout or a connection error is not.

What the users see goes to the journal (counts per outcome, violations, the moment the flood
started); the runner's checks compare it with the upstream's record and the gateway's RSS.
"""

from __future__ import annotations

import functools
import json
import time

import gevent  # type: ignore[import-untyped]
from locust import constant_pacing, task

from loadtests.plan import (
    CRITICAL_FLOOD,
    CRITICAL_PACING_S,
    CRITICAL_UNLOADED,
    CRITICAL_USERS,
    FLOOD_WORK,
)
from loadtests.scenarios.common import JOURNAL, GatewayUser, current_plan, header

__all__ = ["SHED_TYPE", "CriticalUser", "FloodUser"]

SHED_TYPE = b'"type":"urn:gateway:problem:load-shed"'  # as problem.py writes it (no spaces)


@functools.cache
def flood_at() -> float:
    """When the flood starts (``time.monotonic()``): the baseline after the first user started."""
    return time.monotonic() + current_plan().baseline_s


class CriticalUser(GatewayUser):
    """A steady trickle of charges, each with a fresh key: every one must be a 201."""

    fixed_count = CRITICAL_USERS  # spawned before the weighted flood users
    wait_time = constant_pacing(CRITICAL_PACING_S)

    def on_start(self) -> None:
        super().on_start()
        flood_at()
        self.headers = {"Content-Type": "application/json", "X-Api-Key": f"lt-critical-{self.index}"}

    @task
    def charge(self) -> None:
        name = CRITICAL_UNLOADED if time.monotonic() < flood_at() else CRITICAL_FLOOD
        key = f"lt-crit-{self.index}-{self.rng.getrandbits(64):016x}"
        body = json.dumps({"amount": self.rng.randint(100, 99_999), "currency": "eur",
                           "customer": f"cus_critical_{self.index}"})
        JOURNAL.key_sent(key)
        JOURNAL.count("critical_sent")
        with self.client.post("/charges", data=body, headers={**self.headers, "Idempotency-Key": key},
                              name=name, catch_response=True) as response:
            status = response.status_code
            if status == 201:
                JOURNAL.count("critical_201")
                JOURNAL.key_answer(key, "fresh")
                return
            JOURNAL.key_answer(key, "other")
            kind = "critical_error" if status == 0 else "critical_not_201"
            JOURNAL.count(kind)
            JOURNAL.violation(kind, f"{name}: {status} {(response.content or b'')[:120]!r}")
            response.failure(f"unexpected status {status}")


class FloodUser(GatewayUser):
    """GET /work as fast as answers come, once the baseline is over: sheddable by design."""

    def on_start(self) -> None:
        super().on_start()
        plan = current_plan()
        self.path = f"/work?ms={plan.work_ms}"
        self.headers = {"X-Api-Key": f"lt-flood-{self.index}"}
        wait_s = flood_at() - time.monotonic()
        if wait_s > 0:
            gevent.sleep(wait_s)  # only this user's greenlet waits
        JOURNAL.mark("flood_started", time.time())

    @task
    def work(self) -> None:
        with self.client.get(self.path, headers=self.headers, name=FLOOD_WORK,
                             catch_response=True) as response:
            status = response.status_code
            if 200 <= status < 300:
                JOURNAL.count("flood_2xx")
            elif status == 503:
                body = response.content or b""
                retry_after = header(response.headers, "Retry-After")
                if SHED_TYPE in body and retry_after == "1":
                    JOURNAL.count("flood_shed")
                    response.success()  # the shedder working is the point
                else:
                    JOURNAL.count("flood_other")
                    JOURNAL.violation("flood_503_not_shed", f"503 with Retry-After {retry_after!r}: "
                                      f"{body[:120]!r}")
                    response.failure("503 that is not a load-shed problem")
            elif status == 0:
                JOURNAL.count("flood_error")  # a timeout or a connection error: Locust says which
                response.failure(f"no answer: {response.error!r}")
            else:
                JOURNAL.count("flood_other")
                JOURNAL.violation("flood_unexpected", f"{status}: {(response.content or b'')[:120]!r}")
                response.failure(f"unexpected status {status}")
