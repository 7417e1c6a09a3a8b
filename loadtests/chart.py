"""``chart.png``: latency percentiles (p50, p95, p99) per route, direct vs gateway.

One group of bars per percentile, one bar per route (for the overhead scenario the direct route
and the gateway route; for the others the gateway's routes alone; for overload the critical
trickle unloaded and under the flood, as Locust's users and as the probe timed it, and the
flood), each labelled with its value, the title
naming the scenario, users and duration. For overload a second panel draws the gateway's
resident memory over the run, the flood's start marked. matplotlib (the ``load`` extra) draws it on
its file-only Agg backend, imported here lazily so nothing else of the runner pays for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["write_chart"]

PERCENTILES = ("p50", "p95", "p99")
COLOURS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860")


def _values(route: Mapping[str, Any]) -> list[float]:
    fine = route.get("fine_ms") or {}
    values = [fine.get(p, route.get(f"{p}_ms")) for p in PERCENTILES]
    return [float(v) if v is not None else 0.0 for v in values]


def write_chart(summary: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    memory = summary.get("memory") or {}
    overload = summary.get("overload") and memory.get("series")
    if overload:
        fig, (ax, mem_ax) = plt.subplots(1, 2, figsize=(14, 5.5), dpi=110,
                                         gridspec_kw={"width_ratios": [3, 2]})
    else:
        fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    try:
        _percentile_bars(ax, summary)
        if overload:
            _memory_line(mem_ax, summary)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)


def _percentile_bars(ax: Any, summary: Mapping[str, Any]) -> None:
    routes: Mapping[str, Mapping[str, Any]] = summary.get("routes", {})
    names = list(routes)
    settings = summary.get("settings", {})
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        values = _values(routes[name])
        xs = [x + (i - (len(names) - 1) / 2) * width for x in range(len(PERCENTILES))]
        bars = ax.bar(xs, values, width * 0.95, label=name, color=COLOURS[i % len(COLOURS)])
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=8, padding=2)
    ax.set_xticks(range(len(PERCENTILES)), PERCENTILES)
    ax.set_ylabel("response time (ms)")
    ax.set_xlabel("percentile (client side, 10 µs resolution)")
    overhead, overload = summary.get("overhead"), summary.get("overload")
    extra = ""
    if overhead:
        extra = "\nadded by the gateway: " + ", ".join(
            f"{p} {'-' if v is None else f'{v:+.2f}'} ms"
            for p, v in overhead["added_latency_ms"].items())
    elif overload:
        crit, flood, probe = overload["critical"], overload["sheddable"], overload.get("probe")
        ratios = (f"probe x{probe['p99_ratio']}, Locust x{crit['p99_ratio']}" if probe
                  else f"x{crit['p99_ratio']}")
        extra = (f"\ncritical p99 under the flood / unloaded: {ratios}; "
                 f"flood: {flood['answered_2xx']} served, {flood['shed_503']} shed (503), "
                 f"{flood['errors']} errors")
    ax.set_title(f"{summary.get('scenario')}: latency percentiles"
                 f"{', direct vs gateway' if overhead else ''}\n"
                 f"{settings.get('users')} users, {settings.get('duration_s')} s, "
                 f"{settings.get('cpu_count')} CPUs{extra}", fontsize=11)
    ax.margins(y=0.12)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    # below the plot, where it can never cover a bar
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=min(3, max(1, len(names))),
              fontsize=9, frameon=False)


def _memory_line(ax: Any, summary: Mapping[str, Any]) -> None:
    """The gateway's RSS over the run, the flood's start marked."""
    memory = summary["memory"]
    xs = [t for t, _ in memory["series"]]
    ys = [m for _, m in memory["series"]]
    ax.plot(xs, ys, color=COLOURS[3], linewidth=1.5)
    start = memory.get("phase_from_s")
    if start is not None:
        ax.axvline(start, color="grey", linestyle="--", linewidth=1)
        ax.annotate("flood starts", (start, min(ys)), xytext=(4, 4), textcoords="offset points",
                    fontsize=8, color="grey")
    ax.set_ylim(0, max(ys) * 1.25)
    ax.set_xlabel("seconds since Locust started")
    ax.set_ylabel("gateway RSS (MiB)")
    ax.set_title(f"gateway resident memory\nstart {memory['start_mib']}, peak {memory['peak_mib']}, "
                 f"end {memory['end_mib']} MiB", fontsize=11)
    ax.grid(alpha=0.3)
