"""What one load-test run is: the scenario catalog, the gateway config each scenario needs, and
the ``Plan`` the runner hands to the Locust process.

The runner and the Locust users must agree on the numbers (the rate limit the checks verify is
the one the gateway enforces and the users hammer), so they live here once. The plan crosses
the process boundary as one JSON environment variable; this module imports nothing of Locust.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "CHARGE_BURST",
    "CHARGE_NEW",
    "CHARGE_RETRY",
    "CHARGE_REUSE",
    "CHARGE_UNKEYED",
    "CRITICAL_FLOOD",
    "CRITICAL_PACING_S",
    "CRITICAL_UNLOADED",
    "CRITICAL_USERS",
    "DIRECT_HELLO",
    "ENV_PLAN",
    "FLOOD_WORK",
    "GATEWAY_HELLO",
    "PROBE_FLOOD",
    "PROBE_UNLOADED",
    "RATE_BURST",
    "RATE_PER_S",
    "SCENARIOS",
    "Plan",
    "Scenario",
    "api_key_count",
    "baseline_seconds",
    "gateway_config",
    "toml",
]

#: The environment variable that carries the plan (JSON) into the Locust process.
ENV_PLAN = "LOADTESTS_PLAN"

#: ratelimit and mixed: each API key gets a bucket of RATE_BURST refilled at RATE_PER_S.
RATE_PER_S = 20
RATE_BURST = 20
MAX_API_KEYS = 5

# overhead: a per-client policy that nothing in a run of at most an hour drains, so every request
# pays for a real decision and none is denied; refilled within the hour, so the bucket keys expire
# (a huge per-second rate would make every bucket full again, hence absent, within a millisecond)
HUGE_LIMIT, HUGE_PERIOD = 1_000_000, "1h"
# the store bound the runs use: a loaded 2-core machine runs Redis, the gateway, the upstream and
# Locust side by side, and the 100 ms default would turn scheduling stalls into 503s
STORE_TIMEOUT = "1s"

# overload: a steady trickle of critical charges (CRITICAL_USERS users, one request every
# CRITICAL_PACING_S each: 50/s), first alone for the baseline, then beside a flood of GET /work
# (each held WORK_MS by the upstream) from every other user with no think time. One gateway
# process lets MAX_IN_FLIGHT requests in at once, so it serves at most ~MAX_IN_FLIGHT / WORK_MS
# = 640 flood requests a second; 200 users without a pause offer several times that.
CRITICAL_USERS = 5
CRITICAL_PACING_S = 0.1
WORK_MS = 50
SHED_MAX_IN_FLIGHT = 32
SHED_MAX_LOOP_LAG = "50ms"
BASELINE_MAX_S = 15  # the unloaded phase: a quarter of the run, 1 to 15 s


# request names, as Locust's statistics and the report show them
DIRECT_HELLO, GATEWAY_HELLO = "direct GET /hello", "gateway GET /hello"
CHARGE_NEW, CHARGE_RETRY = "gateway POST /charges", "gateway POST /charges (retry)"
CHARGE_BURST, CHARGE_REUSE = "gateway POST /charges (burst)", "gateway POST /charges (reused key)"
CHARGE_UNKEYED = "gateway POST /charges (no key)"
CRITICAL_UNLOADED = "gateway POST /charges (critical, unloaded)"
CRITICAL_FLOOD = "gateway POST /charges (critical, flood)"
FLOOD_WORK = "gateway GET /work (flood)"
# overload: the same trickle sent and timed by a client in a process of its own (loadtests/probe.py)
PROBE_UNLOADED = "probe POST /charges (critical, unloaded)"
PROBE_FLOOD = "probe POST /charges (critical, flood)"
_PAYMENT_ROUTES = (CHARGE_NEW, CHARGE_RETRY, CHARGE_BURST, CHARGE_REUSE)


@dataclass(frozen=True, slots=True, kw_only=True)
class Scenario:
    """One scenario: the Locust user classes it runs, and what the report compares."""

    name: str
    user_classes: tuple[str, ...]
    routes: tuple[str, ...]  # the request names a run must have exercised
    description: str
    direct: bool = False  # it also calls the upstream directly (the overhead comparison)
    payments: bool = False  # the at-most-once checks apply
    ratelimit: bool = False  # the allowed-rate checks apply
    overload: bool = False  # the load-shedding checks apply
    min_users: int = 1  # fewer could not exercise every route
    # its defaults for the machine it shares: "split" gives the gateway a CPU of its own
    # (runner.py, --cpu-layout); locust_idle runs Locust under SCHED_IDLE (--locust-idle)
    cpu_layout: str = "shared"
    locust_idle: bool = False


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(name="overhead", user_classes=("OverheadUser",), direct=True,
                 routes=(DIRECT_HELLO, GATEWAY_HELLO),
                 description="GET /hello direct to the upstream and through the gateway, same users"),
        Scenario(name="ratelimit", user_classes=("RateLimitedUser",), ratelimit=True,
                 routes=(GATEWAY_HELLO,),
                 description=f"GET /hello hammered over API keys limited to {RATE_PER_S}/s, "
                             f"burst {RATE_BURST}"),
        Scenario(name="payments", user_classes=("PaymentUser",), payments=True,
                 routes=_PAYMENT_ROUTES,
                 description="POST /charges with Idempotency-Key: retries, duplicate bursts, "
                             "reused keys"),
        Scenario(name="mixed", user_classes=("MixedRateLimitedUser", "MixedPaymentUser",
                                             "UnkeyedPostUser"),
                 ratelimit=True, payments=True, min_users=3,
                 routes=(GATEWAY_HELLO, *_PAYMENT_ROUTES, CHARGE_UNKEYED),
                 description="rate-limited GETs, idempotent payments and unkeyed POSTs together"),
        Scenario(name="overload", user_classes=("CriticalUser", "FloodUser"), overload=True,
                 min_users=CRITICAL_USERS + 1, cpu_layout="split", locust_idle=True,
                 routes=(CRITICAL_UNLOADED, CRITICAL_FLOOD, FLOOD_WORK),
                 description=f"a flood of sheddable GET /work ({WORK_MS} ms upstream) far beyond one "
                             f"gateway process, beside a trickle of critical POST /charges "
                             f"({CRITICAL_USERS} users, one each {CRITICAL_PACING_S:g} s)"),
    )
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """What the Locust users need to know about the run (read in the Locust process)."""

    scenario: str
    gateway_url: str
    direct_url: str
    journal_path: str
    seed: int
    rate_per_s: int = RATE_PER_S
    burst: int = RATE_BURST
    api_keys: int = 1
    baseline_s: int = 0  # overload: the critical trickle runs alone this long, then the flood
    work_ms: int = WORK_MS

    def to_env(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Plan:
        text = environ.get(ENV_PLAN)
        if not text:
            msg = f"{ENV_PLAN} is not set: run the scenarios through `python -m loadtests run`"
            raise RuntimeError(msg)
        data: dict[str, Any] = json.loads(text)
        return cls(**data)


def api_key_count(scenario: Scenario, users: int) -> int:
    """How many API keys (buckets) the rate-limited users share: every key needs a user or more
    hammering it, or its bucket never runs dry and the allowed rate cannot be checked."""
    if scenario.name == "mixed":
        users = (users - 1) * 5 // 9  # one UnkeyedPostUser, then MixedRateLimitedUser 5 : 4
    return max(1, min(users, MAX_API_KEYS))


def baseline_seconds(scenario: Scenario, duration_s: int) -> int:
    """overload: how long the critical trickle runs alone before the flood (0 for the others).

    The unloaded p99 is measured inside the same run, not in a run of its own: the same gateway
    process (warm, same connections to Redis and the upstream), the same Locust process and the
    same moment's machine, so on a 2-core box shared with other work the flood is the only
    difference between the two phases; and one run keeps one journal and one report."""
    if not scenario.overload:
        return 0
    return max(1, min(BASELINE_MAX_S, duration_s // 4))


def gateway_config(scenario: Scenario, *, upstream_url: str, store_url: str,
                   key_prefix: str) -> dict[str, Any]:
    """The ``gateway serve`` config of a scenario (CONTRACT section 4), as a dict."""
    config: dict[str, Any] = {
        "upstream": {"url": upstream_url, "connect_timeout": "2s", "timeout": "10s"},
        "store": {"url": store_url, "key_prefix": key_prefix, "timeout": STORE_TIMEOUT},
        "identity": {"sources": ["header:x-api-key", "ip"]},
        # records outlive the run by minutes, not the default day, in a Redis someone else owns
        "idempotency": {"ttl": "10m"},
    }
    if scenario.ratelimit:
        config["rate_limit"] = [{"name": "per-key", "limit": RATE_PER_S, "period": "1s",
                                 "burst": RATE_BURST, "key": "identity", "paths": ["/hello"],
                                 "methods": ["GET"]}]
    elif scenario.direct:
        config["rate_limit"] = [{"name": "per-client", "limit": HUGE_LIMIT, "period": HUGE_PERIOD,
                                 "key": "identity"}]
    if scenario.overload:
        # no rate limit: it would refuse the flood before the shedder sees it. reserve is the
        # critical share of a fleet budget; only the local shedder is on (one process).
        config["priority"] = [{"name": "critical", "paths": ["/charges"], "methods": ["POST"],
                               "reserve": 0.2}]
        config["shedding"] = {"local": {"enabled": True, "max_in_flight": SHED_MAX_IN_FLIGHT,
                                        "max_loop_lag": SHED_MAX_LOOP_LAG}}
    return config


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    msg = f"no TOML for {value!r}"
    raise TypeError(msg)


def _toml_table(header: str, table: Mapping[str, Any], lines: list[str]) -> None:
    """One table's scalars under ``header``, then its sub-tables (``[shedding.local]``)."""
    scalars = [f"{key} = {_toml_value(value)}" for key, value in table.items()
               if not isinstance(value, Mapping)]
    if scalars or len(scalars) == len(table):  # a table of sub-tables alone needs no header
        lines.extend([header, *scalars, ""])
    name = header.strip("[]")
    for key, value in table.items():
        if isinstance(value, Mapping):
            _toml_table(f"[{name}.{key}]", value, lines)


def toml(config: Mapping[str, Any]) -> str:
    """TOML for a config of tables (of scalars and tables), or lists of tables of scalars
    (``[[rate_limit]]``)."""
    lines: list[str] = []
    for section, body in config.items():
        if isinstance(body, list):
            for table in body:
                lines.append(f"[[{section}]]")
                lines.extend(f"{key} = {_toml_value(value)}" for key, value in table.items())
                lines.append("")
        else:
            _toml_table(f"[{section}]", body, lines)
    return "\n".join(lines)
