"""The report's numbers: per-route statistics from Locust's ``*_stats.csv`` and the journal's
fine histogram, the overhead comparison, the overload scenario's phases (from Locust's critical
users and from the probe, ``loadtests/probe.py``), the gateway's own counters and resident
memory, ``summary.json``, and the short table the runner prints.

Locust rounds response times below 100 ms to whole milliseconds, so its percentiles of a ~1 ms
route are steps of 1 ms; the summary keeps them (``p50_ms`` ...) and adds the journal's
percentiles at 10 microseconds (``fine_ms``), which the added-latency figures and the chart use.
Pure functions over rows and dicts; nothing here starts a process.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from loadtests.journal import TICK_MS, percentile
from loadtests.plan import CRITICAL_FLOOD, CRITICAL_UNLOADED, FLOOD_WORK, PROBE_FLOOD, PROBE_UNLOADED

__all__ = [
    "PERCENTILES",
    "added_latency",
    "format_table",
    "gateway_counters",
    "memory_summary",
    "overload_summary",
    "probe_routes",
    "read_stats_csv",
    "route_stats",
    "write_summary",
]

PERCENTILES = (50, 95, 99)
AGGREGATED = "Aggregated"
MIB = 1024 * 1024


def read_stats_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "", "N/A") else None
    except ValueError:
        return None


def route_stats(rows: Iterable[Mapping[str, str]],
                latency: Mapping[str, Mapping[str, int]] | None = None) -> dict[str, dict[str, Any]]:
    """Per request name: count, failures, rps, avg/p50/p95/p99/max in ms (Locust's), plus
    ``fine_ms`` percentiles from the journal's histogram when it has the name."""
    routes: dict[str, dict[str, Any]] = {}
    for row in rows:
        name = row.get("Name", "")
        if not name or name == AGGREGATED:
            continue
        stats: dict[str, Any] = {
            "method": row.get("Type", ""),
            "count": int(_number(row.get("Request Count")) or 0),
            "failures": int(_number(row.get("Failure Count")) or 0),
            "rps": round(_number(row.get("Requests/s")) or 0.0, 1),
            "avg_ms": _rounded(_number(row.get("Average Response Time"))),
            **{f"p{p}_ms": _number(row.get(f"{p}%")) for p in PERCENTILES},
            "max_ms": _rounded(_number(row.get("Max Response Time"))),
        }
        histogram = (latency or {}).get(name)
        if histogram:
            stats["fine_ms"] = {f"p{p}": percentile(histogram, p) for p in PERCENTILES}
        routes[name] = stats
    return routes


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _percentiles(route: Mapping[str, Any], fine: bool) -> dict[str, float | None]:
    if fine and "fine_ms" in route:
        return dict(route["fine_ms"])
    return {f"p{p}": route.get(f"p{p}_ms") for p in PERCENTILES}


def added_latency(direct: Mapping[str, Any], gateway: Mapping[str, Any], *, fine: bool = True,
                  ) -> dict[str, float | None]:
    """Gateway minus direct, per percentile, in ms (None where either side has no value)."""
    d, g = _percentiles(direct, fine), _percentiles(gateway, fine)
    added: dict[str, float | None] = {}
    for p, base in d.items():
        via = g.get(p)
        added[p] = None if base is None or via is None else round(via - base, 3)
    return added


def gateway_counters(text: str) -> dict[str, Any]:
    """The gateway's own view from ``/_gateway/metrics``: requests by code, rate-limit decisions,
    idempotency outcomes, store errors, requests shed (``shedder/priority/decision``), and the
    mean added latency it measured itself."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {"gateway_requests_total": ("code",),
              "gateway_idempotency_outcomes_total": ("outcome",),
              "gateway_ratelimit_decisions_total": ("decision",),
              "gateway_store_errors_total": ("kind",),
              "gateway_shed_total": ("shedder", "priority", "decision")}
    out: dict[str, Any] = {name: {} for name in wanted}
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                label = "/".join(sample.labels.get(n, "") for n in wanted[sample.name])
                table = out[sample.name]
                table[label] = int(table.get(label, 0) + sample.value)
            elif sample.name.startswith(("gateway_added_latency_seconds_",
                                         "gateway_upstream_latency_seconds_")):
                sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    for what in ("added", "upstream"):
        count = sums.get(f"gateway_{what}_latency_seconds_count", 0.0)
        total = sums.get(f"gateway_{what}_latency_seconds_sum", 0.0)
        out[f"{what}_latency_mean_ms"] = round(total / count * 1000, 3) if count else None
    return out


def memory_summary(samples: Sequence[tuple[float, int]], since: float | None = None) -> dict[str, Any]:
    """The gateway's resident memory over the run from ``(time.time(), bytes)`` samples, in MiB:
    start (as Locust started), peak, end, the growth, and the highest sample of the first and
    of the last third of the samples from ``since`` on (the flood, in the overload scenario;
    the whole run when None): a process whose memory is bounded stops growing."""
    if not samples:
        return {"samples": 0}
    t0 = samples[0][0]
    mib = [round(b / MIB, 1) for _, b in samples]
    phase = [m for (t, _), m in zip(samples, mib, strict=True) if since is None or t >= since]
    third = max(1, len(phase) // 3)
    return {
        "samples": len(samples),
        "start_mib": mib[0], "peak_mib": max(mib), "end_mib": mib[-1],
        "growth_mib": round(max(mib) - mib[0], 1),
        "phase_from_s": None if since is None else round(since - t0, 1),
        "phase_first_third_max_mib": max(phase[:third]) if phase else None,
        "phase_last_third_max_mib": max(phase[-third:]) if phase else None,
        "series": [[round(t - t0, 1), m] for (t, _), m in zip(samples, mib, strict=True)],
    }


def _phase(route: Mapping[str, Any] | None) -> dict[str, Any]:
    route = route or {}
    fine = route.get("fine_ms") or {}
    return {"count": int(route.get("count", 0)), "failures": int(route.get("failures", 0)),
            "rps": route.get("rps"),
            **{f"p{p}_ms": fine.get(f"p{p}", route.get(f"p{p}_ms")) for p in PERCENTILES}}


def _ratio(over: float | None, under: float | None) -> float | None:
    return None if over is None or not under else round(over / under, 2)


def overload_summary(routes: Mapping[str, Mapping[str, Any]], journal: Mapping[str, Any],
                     record: Mapping[str, Any], *, baseline_s: int,
                     memory: Mapping[str, Any], probe_keys: Mapping[str, int] | None = None,
                     ) -> dict[str, Any]:
    """The overload scenario's numbers: the critical trickle alone and under the flood (fine
    percentiles, the flood/unloaded ratios), as Locust's critical users saw it (``critical``)
    and as the probe did (``probe``, when it ran: ``probe_keys`` is its key -> status), what the
    flood got, the upstream's own counts."""
    counts: Mapping[str, int] = journal.get("counts", {})
    unloaded, flood = _phase(routes.get(CRITICAL_UNLOADED)), _phase(routes.get(CRITICAL_FLOOD))
    sheddable = _phase(routes.get(FLOOD_WORK))
    sent = sum(counts.get(k, 0) for k in ("flood_2xx", "flood_shed", "flood_other", "flood_error"))
    probe = None
    if probe_keys is not None:
        p_unloaded, p_flood = _phase(routes.get(PROBE_UNLOADED)), _phase(routes.get(PROBE_FLOOD))
        statuses = Counter(probe_keys.values())
        probe = {
            "unloaded": p_unloaded, "flood": p_flood,
            "p50_ratio": _ratio(p_flood["p50_ms"], p_unloaded["p50_ms"]),
            "p99_ratio": _ratio(p_flood["p99_ms"], p_unloaded["p99_ms"]),
            "sent": len(probe_keys), "answered_201": statuses.get(201, 0),
            "errors": statuses.get(0, 0),
            "not_201": sum(n for status, n in statuses.items() if status not in (0, 201)),
        }
    return {
        "baseline_s": baseline_s,
        "flood_started_s": memory.get("phase_from_s"),
        "critical": {
            "unloaded": unloaded, "flood": flood,
            "p50_ratio": _ratio(flood["p50_ms"], unloaded["p50_ms"]),
            "p99_ratio": _ratio(flood["p99_ms"], unloaded["p99_ms"]),
            "sent": counts.get("critical_sent", 0), "answered_201": counts.get("critical_201", 0),
            "not_201": counts.get("critical_not_201", 0), "errors": counts.get("critical_error", 0),
            # sent, and still unanswered when Locust stopped its users (no answer is no refusal)
            "cut_off": counts.get("critical_sent", 0) - sum(
                counts.get(k, 0) for k in ("critical_201", "critical_not_201", "critical_error")),
            "upstream_charges": record.get("charges"),
        },
        "sheddable": {
            **sheddable, "sent": sent, "answered_2xx": counts.get("flood_2xx", 0),
            "shed_503": counts.get("flood_shed", 0), "other": counts.get("flood_other", 0),
            "errors": counts.get("flood_error", 0),
            "shed_share": round(counts.get("flood_shed", 0) / sent, 3) if sent else None,
            "upstream_work": record.get("work"),
        },
        "probe": probe,
    }


def probe_routes(probe: Mapping[str, Any], flood_started: float | None) -> dict[str, dict[str, Any]]:
    """The probe's samples as two routes shaped like ``route_stats``'s (a non-201 is a
    failure), split at the flood's start: before it the unloaded phase, from it the flood."""
    phases: dict[str, list[tuple[float, float, int]]] = {PROBE_UNLOADED: [], PROBE_FLOOD: []}
    for sent_at, ms, status, *_ in probe.get("samples", []):
        flooded = flood_started is not None and sent_at >= flood_started
        phases[PROBE_FLOOD if flooded else PROBE_UNLOADED].append((sent_at, ms, status))
    routes: dict[str, dict[str, Any]] = {}
    for name, samples in phases.items():
        if not samples:
            continue
        ticks = Counter(round(ms / TICK_MS) for _, ms, _ in samples)
        fine = {f"p{p}": percentile(ticks, p) for p in PERCENTILES}
        span = max(t for t, _, _ in samples) - min(t for t, _, _ in samples)
        routes[name] = {
            "method": "POST", "count": len(samples),
            "failures": sum(1 for _, _, status in samples if status != 201),
            "rps": round(len(samples) / span, 1) if span > 0 else None,
            "avg_ms": round(sum(ms for _, ms, _ in samples) / len(samples), 3),
            **{f"p{p}_ms": fine[f"p{p}"] for p in PERCENTILES},
            "max_ms": round(max(ms for _, ms, _ in samples), 3),
            "fine_ms": fine,
        }
    return routes


def write_summary(path: Path, summary: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if value < 100 else f"{value:.0f}"
    return str(value)


def format_table(summary: Mapping[str, Any]) -> str:
    """The short text the runner prints: routes, the overhead, the invariants."""
    routes: Mapping[str, Mapping[str, Any]] = summary.get("routes", {})
    header = ("route", "count", "fail", "rps", "p50", "p95", "p99", "max")
    rows: list[Sequence[str]] = [header]
    for name, r in routes.items():
        fine = r.get("fine_ms", {})
        rows.append((name, _cell(r["count"]), _cell(r["failures"]), _cell(r["rps"]),
                     *(_cell(fine.get(f"p{p}", r.get(f"p{p}_ms"))) for p in PERCENTILES),
                     _cell(r.get("max_ms"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    settings = summary.get("settings", {})
    locust_priority = f", Locust at nice {settings['locust_nice']}" if settings.get("locust_nice") else ""
    if settings.get("locust_policy") == "idle":
        locust_priority += ", Locust under SCHED_IDLE"
    cpus = settings.get("cpus")  # set for a split layout only
    layout = "" if cpus is None else (f", the gateway alone on {_cpus(cpus['gateway'])}, the rest "
                                      f"on {_cpus(cpus['others'])}")
    lines = [f"{summary.get('scenario')}: {settings.get('users')} users, "
             f"{settings.get('duration_s')} s{locust_priority}{layout} (latency in ms)"]
    for row in rows:
        lines.append("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                      for i, (c, w) in enumerate(zip(row, widths, strict=True))))
    overhead = summary.get("overhead")
    if overhead:
        added = overhead["added_latency_ms"]
        lines.append("  added by the gateway: " + ", ".join(f"{p} {_cell(v)} ms" for p, v in added.items()))
    overload = summary.get("overload")
    if overload:
        crit, flood, probe = overload["critical"], overload["sheddable"], overload.get("probe")
        if probe:
            lines.append(f"  critical p99 (probe, its own process): unloaded "
                         f"{_cell(probe['unloaded']['p99_ms'])} ms, under the flood "
                         f"{_cell(probe['flood']['p99_ms'])} ms (x{_cell(probe['p99_ratio'])}); "
                         f"{probe['answered_201']} of {probe['sent']} answered 201")
        lines.append(f"  critical p99{' (Locust)' if probe else ''}: unloaded "
                     f"{_cell(crit['unloaded']['p99_ms'])} ms, under the flood "
                     f"{_cell(crit['flood']['p99_ms'])} ms (x{_cell(crit['p99_ratio'])}); "
                     f"{crit['answered_201']} of {crit['sent']} answered 201")
        lines.append(f"  flood: {flood['sent']} sent, {flood['answered_2xx']} 2xx, {flood['shed_503']} shed "
                     f"(503), {flood['errors']} errors, {flood['other']} other")
    memory = summary.get("memory") or {}
    if memory.get("samples"):
        lines.append(f"  gateway RSS (MiB): start {memory['start_mib']}, peak {memory['peak_mib']}, "
                     f"end {memory['end_mib']}")
    cpu = summary.get("settings", {}).get("cpu_while_locust_ran") or {}
    shares = [f"{name} {use['share_of_one_cpu']:.2f}" for name, use in cpu.items() if isinstance(use, dict)]
    if shares:
        cores = summary["settings"].get("cpu_count")
        lines.append(f"  CPU used during the run (1.00 = one core of {cores}): " + ", ".join(shares))
    waits = [f"{name} {use['runqueue_wait_s']:.1f}" for name, use in cpu.items()
             if isinstance(use, dict) and use.get("runqueue_wait_s") is not None]
    if waits:
        lines.append("  seconds each waited, runnable, for a CPU another held: " + ", ".join(waits))
    lines.extend(f"  note: {note}" for note in summary.get("notes", []))
    for inv in summary.get("invariants", []):
        lines.append(f"  [{'ok' if inv['ok'] else 'FAIL'}] {inv['name']}: {inv['detail']}")
    lines.append(f"  => {'ok' if summary.get('ok') else 'FAILED'}; report in {summary.get('out')}")
    return "\n".join(lines)


def _cpus(cpus: Sequence[int]) -> str:
    return ("CPU " if len(cpus) == 1 else "CPUs ") + ",".join(str(c) for c in cpus)
