"""The Locust entry point of the load tests: every scenario's users, and the journal's hooks.

Run by the runner (``python -m loadtests run --scenario ...``), which names the user classes of
the scenario on Locust's command line and passes the plan in ``LOADTESTS_PLAN``. Running it by
hand works the same way: ``LOADTESTS_PLAN='{...}' locust -f loadtests/locustfile.py ...``.

Every request's response time also goes into the journal's fine histogram, and the journal is
written when the test stops, for the runner's checks.
"""

from __future__ import annotations

from typing import Any

import gevent  # type: ignore[import-untyped]
from locust import events
from locust.stats import CSV_STATS_INTERVAL_SEC

from loadtests.scenarios.common import JOURNAL, current_plan
from loadtests.scenarios.mixed import MixedPaymentUser, MixedRateLimitedUser, UnkeyedPostUser
from loadtests.scenarios.overhead import OverheadUser
from loadtests.scenarios.overload import CriticalUser, FloodUser
from loadtests.scenarios.payments import PaymentUser
from loadtests.scenarios.ratelimit import RateLimitedUser

__all__ = ["CriticalUser", "FloodUser", "MixedPaymentUser", "MixedRateLimitedUser", "OverheadUser",
           "PaymentUser", "RateLimitedUser", "UnkeyedPostUser"]


def _timed(name: str, response_time: float, **_: Any) -> None:
    JOURNAL.latency_ms(name, response_time)


def _write_journal(**_: Any) -> None:
    JOURNAL.write(current_plan().journal_path)
    # Locust rewrites <prefix>_stats.csv once a second and at exit only closes it, so without a
    # pause here the CSV misses the last second of the run (seen: 17 % of a 5 s run's requests).
    # The users have stopped; one more pass of its writer makes the CSV final.
    gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.5)


# EventHook.add_listener is untyped in Locust
events.request.add_listener(_timed)  # type: ignore[no-untyped-call]
events.test_stop.add_listener(_write_journal)  # type: ignore[no-untyped-call]
