"""The invariants a run must keep, checked from the journal, the upstream's record and the stats.

Each check returns ``Invariant(name, ok, detail)``; a run is ok when all are. The payments checks
trust the upstream's own record of what it executed, not the gateway's word: a key the record
shows twice was executed twice, whatever the gateway answered. The rate-limit bound is exact for
a token bucket: a key first used at ``t0`` (client clock, before the store saw it) and last
answered at ``t1`` can have had at most ``burst + rate * (t1 - t0)`` requests allowed. The
overload checks compare the critical trickle under the flood with the same run's unloaded phase
(the latency bound is judged on the probe's trickle, timed in a process of its own, when it ran;
Locust's critical users are checked for their answers), and read the gateway's resident memory
as the runner sampled it.

Pure Python over plain dicts, so the unit tests can feed crafted records.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "P99_RATIO_MAX",
    "RATE_FLOOR",
    "RSS_FLAT_MARGIN_MIB",
    "RSS_GROWTH_MAX_MIB",
    "Invariant",
    "check_overload",
    "check_payments",
    "check_ratelimit",
    "check_requests",
    "rate_bounds",
]

RATE_FLOOR = 0.8  # a saturated key must be allowed at least this share of its bound
RATE_TOLERANCE = 1.0  # tokens: rounding of the store's millisecond clock
MAX_LISTED = 5  # offenders named in a detail
P99_RATIO_MAX = 2.0  # overload: critical p99 under the flood, at most this times the unloaded one
RSS_GROWTH_MAX_MIB = 64.0  # overload: the gateway's peak RSS above its RSS as Locust started
RSS_FLAT_MARGIN_MIB = 8.0  # overload: the flood's last third may peak this much above its first


@dataclass(frozen=True, slots=True)
class Invariant:
    name: str
    ok: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _listed(items: Iterable[str]) -> str:
    items = list(items)
    more = f" (+{len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
    return ", ".join(items[:MAX_LISTED]) + more


def _violations(journal: Mapping[str, Any], kinds: Iterable[str]) -> dict[str, int]:
    seen: Mapping[str, int] = journal.get("violations", {})
    return {k: seen[k] for k in kinds if seen.get(k)}


def _examples(journal: Mapping[str, Any], kinds: Iterable[str]) -> list[str]:
    prefixes = tuple(f"{k}:" for k in kinds)
    return [e for e in journal.get("examples", []) if e.startswith(prefixes)]


def _no_violations(name: str, journal: Mapping[str, Any], kinds: tuple[str, ...],
                   passed: str) -> Invariant:
    found = _violations(journal, kinds)
    if not found:
        return Invariant(name, True, passed)
    counts = ", ".join(f"{k}={n}" for k, n in found.items())
    return Invariant(name, False, f"{counts}; e.g. {_listed(_examples(journal, kinds))}")


# ------------------------------------------------------------------------------ every scenario
def check_requests(routes: Mapping[str, Mapping[str, Any]], expected: Iterable[str]) -> list[Invariant]:
    """Every expected route was exercised, and no request failed (Locust's failures)."""
    missing = [name for name in expected if not routes.get(name, {}).get("count")]
    served = Invariant("every route was exercised", not missing,
                       f"no requests on {_listed(missing)}" if missing else
                       ", ".join(f"{n}: {r['count']}" for n, r in routes.items()))
    failed = {n: int(r.get("failures", 0)) for n, r in routes.items() if r.get("failures")}
    total = sum(int(r.get("count", 0)) for r in routes.values())
    failures = Invariant("no request failed", not failed,
                         f"{sum(failed.values())} of {total} failed: "
                         + _listed(f"{n}: {c}" for n, c in failed.items())
                         if failed else f"0 of {total} failed")
    return [served, failures]


# ------------------------------------------------------------------------------ rate limits
def rate_bounds(journal: Mapping[str, Any], rate_per_s: float, burst: int) -> dict[str, dict[str, Any]]:
    """Per API key: allowed, denied, the window in seconds, the bound and allowed/bound."""
    table: dict[str, dict[str, Any]] = {}
    for key, rec in sorted(journal.get("api_keys", {}).items()):
        elapsed = max(0.0, float(rec["last_received"]) - float(rec["first_sent"]))
        bound = burst + rate_per_s * elapsed + RATE_TOLERANCE
        allowed = int(rec["allowed"])
        table[key] = {"allowed": allowed, "denied": int(rec["denied"]), "other": int(rec["other"]),
                      "elapsed_s": round(elapsed, 3), "bound": round(bound, 1),
                      "share_of_bound": round(allowed / bound, 3)}
    return table


def check_ratelimit(journal: Mapping[str, Any], rate_per_s: float, burst: int) -> list[Invariant]:
    table = rate_bounds(journal, rate_per_s, burst)
    if not table:
        return [Invariant("rate limit: keys were exercised", False, "no rate-limited answers")]
    over = [f"{k}: {r['allowed']} > {r['bound']}" for k, r in table.items() if r["allowed"] > r["bound"]]
    unsaturated = [k for k, r in table.items() if not r["denied"]]
    low = [f"{k}: {r['allowed']} < {RATE_FLOOR:.0%} of {r['bound']}" for k, r in table.items()
           if r["denied"] and r["share_of_bound"] < RATE_FLOOR]
    shares = ", ".join(f"{k} {r['allowed']}/{r['bound']}" for k, r in table.items())
    return [
        Invariant("rate limit: allowed <= burst + rate * elapsed, per key", not over,
                  _listed(over) if over else f"allowed/bound: {shares}"),
        Invariant("rate limit: every key was driven past its limit", not unsaturated,
                  f"never denied: {_listed(unsaturated)}" if unsaturated else
                  ", ".join(f"{k} {r['denied']} denied" for k, r in table.items())),
        Invariant(f"rate limit: allowed >= {RATE_FLOOR:.0%} of the bound, per key", not low,
                  _listed(low) if low else
                  "lowest share " + str(min(r["share_of_bound"] for r in table.values()))),
        _no_violations("rate limit: 200s carry RateLimit fields, 429s Retry-After too", journal,
                       ("ratelimit_fields_missing", "retry_after_malformed"), "every answer had them"),
    ]


# ------------------------------------------------------------------------------ idempotency
def check_payments(journal: Mapping[str, Any], record: Mapping[str, Any]) -> list[Invariant]:
    executions: Mapping[str, int] = record.get("executions", {})
    keys: Mapping[str, Mapping[str, int]] = journal.get("keys", {})
    twice = sorted(k for k, n in executions.items() if n > 1)
    answered = [k for k, kinds in keys.items() if kinds.get("fresh") or kinds.get("replayed")]
    not_once = sorted(f"{k} ran {executions.get(k, 0)}x" for k in answered if executions.get(k, 0) != 1)
    unknown = sorted(set(executions) - set(keys))
    counts: Mapping[str, int] = journal.get("counts", {})
    unexercised = [what for what in ("new", "retry", "burst", "reuse") if not counts.get(what)]
    most = max(executions.values(), default=0)
    return [
        Invariant("no key executed twice (upstream record)", not twice,
                  f"{len(twice)} keys: {_listed(f'{k} ran {executions[k]}x' for k in twice)}" if twice
                  else f"{len(executions)} keys executed, at most {most} time each"),
        Invariant("every key answered 201 executed exactly once (upstream record)", not not_once,
                  _listed(not_once) if not_once else f"{len(answered)} keys answered 201, each ran once"),
        Invariant("the upstream ran only keys the clients sent", not unknown,
                  _listed(unknown) if unknown else f"{len(keys)} keys sent"),
        _no_violations("every new key's first request ran (201)", journal, ("first_not_fresh",),
                       f"{counts.get('new', 0)} new keys"),
        _no_violations("retries replayed byte for byte with Idempotent-Replayed", journal,
                       ("ran_again", "replay_missing", "replay_differs"),
                       f"{counts.get('retry', 0)} retries"),
        _no_violations("duplicate bursts: one execution, the rest 409 (Retry-After) or a replay",
                       journal, ("burst_not_one_fresh", "burst_unexpected",
                                 "conflict_without_retry_after"),
                       f"{counts.get('burst', 0)} bursts"),
        _no_violations("a key reused with another body got 422", journal, ("reuse_not_422",),
                       f"{counts.get('reuse', 0)} reuses"),
        Invariant("every payment behaviour was exercised", not unexercised,
                  f"never: {', '.join(unexercised)}" if unexercised else
                  ", ".join(f"{w} {counts[w]}" for w in ("new", "retry", "burst", "reuse"))),
    ]


# ------------------------------------------------------------------------------ load shedding
def check_overload(overload: Mapping[str, Any], journal: Mapping[str, Any], record: Mapping[str, Any],
                   memory: Mapping[str, Any], probe_keys: Mapping[str, int] | None = None) -> list[Invariant]:
    """The critical trickle served in full and in time, the flood shed cleanly, memory bounded.

    ``overload`` is ``report.overload_summary``'s, ``memory`` ``report.memory_summary``'s,
    ``probe_keys`` the probe's key -> status (0: no answer) when it ran: its charges are checked
    with Locust's, and its p99 ratio is the one bounded."""
    crit, flood, probe = overload["critical"], overload["sheddable"], overload.get("probe")
    timed = probe if probe is not None else crit  # whose latency the bound is judged on
    unloaded, flooded = timed["unloaded"], timed["flood"]
    probe_keys = probe_keys or {}
    refused = crit["not_201"] + crit["errors"] + (probe["not_201"] + probe["errors"] if probe else 0)
    answered = crit["answered_201"] + (probe["answered_201"] if probe else 0)
    executions: Mapping[str, int] = record.get("executions", {})
    keys: Mapping[str, Mapping[str, int]] = journal.get("keys", {})
    fresh = {k for k, kinds in keys.items() if kinds.get("fresh")} | {
        k for k, status in probe_keys.items() if status == 201}
    not_once = sorted(f"{k} ran {executions.get(k, 0)}x" for k in fresh if executions.get(k, 0) != 1)
    unknown = sorted(set(executions) - set(keys) - set(probe_keys))
    # a request cut off by the end of the run (or by its timeout) may have run unanswered
    cut_off_ran = sum(1 for k, kinds in keys.items() if not any(kinds.values()) and executions.get(k))
    cut_off_ran += sum(1 for k, status in probe_keys.items() if status != 201 and executions.get(k))
    charges = record.get("charges")
    upstream_ok = not not_once and not unknown and charges == answered + cut_off_ran
    ratio = timed["p99_ratio"]
    shed, served = flood["shed_503"], flood["answered_2xx"]
    shapes = _violations(journal, ("flood_503_not_shed", "flood_unexpected"))
    growth, first, last = (memory.get("growth_mib"), memory.get("phase_first_third_max_mib"),
                           memory.get("phase_last_third_max_mib"))
    bounded = (growth is not None and first is not None and last is not None
               and growth <= RSS_GROWTH_MAX_MIB and last <= first + RSS_FLAT_MARGIN_MIB)
    probe_detail = (f"; probe {probe['answered_201']} of {probe['sent']} (its own process)" if probe else "")
    return [
        Invariant("critical: every request answered 201 (no 503, no error)",
                  answered > 0 and refused == 0
                  and not _violations(journal, ("critical_not_201", "critical_error")),
                  f"{crit['answered_201']} of {crit['answered_201']}: unloaded {crit['unloaded']['count']}, "
                  f"flood {crit['flood']['count']} ({crit['cut_off']} cut off by the end of the run)"
                  + probe_detail if not refused
                  else f"{refused} of {answered + refused} not 201 ({crit['not_201']} refused, "
                  f"{crit['errors']} errors"
                  + (f"; probe: {probe['not_201']} refused, {probe['errors']} errors" if probe else "")
                  + f"); e.g. {_listed(_examples(journal, ('critical_not_201', 'critical_error')))}"),
        Invariant("critical: each 201 executed exactly once by the upstream (its record)", upstream_ok,
                  f"upstream charges {charges}, 201s {answered}, cut off and run {cut_off_ran}"
                  + (f"; not once: {_listed(not_once)}" if not_once else "")
                  + (f"; unknown keys: {_listed(unknown)}" if unknown else "")),
        Invariant(f"critical: p99 under the flood <= {P99_RATIO_MAX:g}x the unloaded p99"
                  + (" (probe)" if probe else ""),
                  ratio is not None and ratio <= P99_RATIO_MAX and flooded["count"] > 0,
                  f"unloaded p99 {unloaded['p99_ms']} ms ({unloaded['count']} requests), flood p99 "
                  f"{flooded['p99_ms']} ms ({flooded['count']}): x{ratio}"
                  + (f"; as Locust's critical users saw it: x{crit['p99_ratio']}" if probe else "")),
        Invariant("sheddable: the flood was shed and partly served (the gateway was overloaded)",
                  shed > 0 and served > 0,
                  f"{shed} shed, {served} served of {flood['sent']} (shed share {flood['shed_share']})"),
        Invariant("sheddable: every non-2xx was a 503 load-shed problem with Retry-After",
                  not shapes and flood["other"] == 0,
                  f"{shed} 503 load-shed" if not shapes and not flood["other"] else
                  f"{flood['other']} other answers; e.g. "
                  f"{_listed(_examples(journal, ('flood_503_not_shed', 'flood_unexpected')))}"),
        Invariant("sheddable: no timeouts or connection errors", flood["errors"] == 0,
                  f"{flood['errors']} of {flood['sent']}"),
        Invariant(f"gateway RSS bounded: growth <= {RSS_GROWTH_MAX_MIB:g} MiB, the flood's last "
                  f"third <= its first + {RSS_FLAT_MARGIN_MIB:g} MiB", bounded,
                  "not sampled" if growth is None else
                  f"start {memory['start_mib']}, peak {memory['peak_mib']}, end {memory['end_mib']} "
                  f"MiB (growth {growth}); flood thirds: first max {first}, last max {last}"),
    ]
