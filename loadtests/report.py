"""The report's numbers: per-route statistics from Locust's ``*_stats.csv`` and the journal's
fine histogram, the overhead comparison, the gateway's own counters, ``summary.json``, and the
short table the runner prints.

Locust rounds response times below 100 ms to whole milliseconds, so its percentiles of a ~1 ms
route are steps of 1 ms; the summary keeps them (``p50_ms`` ...) and adds the journal's
percentiles at 10 microseconds (``fine_ms``), which the added-latency figures and the chart use.
Pure functions over rows and dicts; nothing here starts a process.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from loadtests.journal import percentile

__all__ = [
    "PERCENTILES",
    "added_latency",
    "format_table",
    "gateway_counters",
    "read_stats_csv",
    "route_stats",
    "write_summary",
]

PERCENTILES = (50, 95, 99)
AGGREGATED = "Aggregated"


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
    idempotency outcomes, store errors, and the mean added latency it measured itself."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {"gateway_requests_total": "code",
              "gateway_idempotency_outcomes_total": "outcome",
              "gateway_ratelimit_decisions_total": "decision",
              "gateway_store_errors_total": "kind"}
    out: dict[str, Any] = {name: {} for name in wanted}
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                label = sample.labels.get(wanted[sample.name], "")
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
    lines = [f"{summary.get('scenario')}: {summary.get('settings', {}).get('users')} users, "
             f"{summary.get('settings', {}).get('duration_s')} s (latency in ms)"]
    for row in rows:
        lines.append("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                      for i, (c, w) in enumerate(zip(row, widths, strict=True))))
    overhead = summary.get("overhead")
    if overhead:
        added = overhead["added_latency_ms"]
        lines.append("  added by the gateway: " + ", ".join(f"{p} {_cell(v)} ms" for p, v in added.items()))
    cpu = summary.get("settings", {}).get("cpu_while_locust_ran") or {}
    shares = [f"{name} {use['share_of_one_cpu']:.2f}" for name, use in cpu.items() if isinstance(use, dict)]
    if shares:
        cores = summary["settings"].get("cpu_count")
        lines.append(f"  CPU used during the run (1.00 = one core of {cores}): " + ", ".join(shares))
    lines.extend(f"  note: {note}" for note in summary.get("notes", []))
    for inv in summary.get("invariants", []):
        lines.append(f"  [{'ok' if inv['ok'] else 'FAIL'}] {inv['name']}: {inv['detail']}")
    lines.append(f"  => {'ok' if summary.get('ok') else 'FAILED'}; report in {summary.get('out')}")
    return "\n".join(lines)
