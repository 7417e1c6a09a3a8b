"""One load-test run, start to finish: Redis (unless given), the upstream, ``gateway serve``,
Locust headless in a process of its own, then the report.

The order is fixed: start and wait for each process (bounded: Redis 10 s, upstream and gateway
30 s each), run Locust for the duration (it gets ``--run-time`` and ``--stop-timeout``; past
duration + ``LOCUST_MARGIN_S`` the runner stops it) while reading the gateway's resident memory
every ``RSS_SAMPLE_S``, fetch the upstream's record and the gateway's metrics, then stop
everything it started, in reverse order, by PID (15 s grace each). The overload scenario also
starts the probe (``loadtests/probe.py``: the critical trickle timed in a process of its own)
just before Locust, for the same duration, and waits for it (bounded) once Locust is done.
Whatever fails, the ``finally`` stops the children; a Redis given with ``--redis-url`` is only
used, under a key prefix of the run's own, with records that expire in minutes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import resource
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from loadtests import checks, report
from loadtests.journal import Journal
from loadtests.plan import (
    CRITICAL_PACING_S,
    CRITICAL_USERS,
    DIRECT_HELLO,
    ENV_PLAN,
    GATEWAY_HELLO,
    PROBE_FLOOD,
    PROBE_UNLOADED,
    SCENARIOS,
    Plan,
    Scenario,
    api_key_count,
    baseline_seconds,
    gateway_config,
    toml,
)
from loadtests.processes import HOST, Child, StartError, free_port, http_get, http_json

__all__ = ["EXIT_FAILED", "EXIT_INVARIANT", "EXIT_OK", "Options", "run"]

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
EXIT_OK, EXIT_INVARIANT, EXIT_FAILED = 0, 1, 3
REDIS_START_S, SERVER_START_S, STOP_GRACE_S = 10.0, 30.0, 15.0
LOCUST_STOP_TIMEOUT_S = 5  # users get this long to finish their task at the end
LOCUST_MARGIN_S = 40.0  # Locust's own start and report writing, beyond the duration
PROBE_MARGIN_S = 30.0  # the probe's last requests (each bounded by its timeout) and its record
RSS_SAMPLE_S = 0.5  # how often the gateway's resident memory is read while Locust runs


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    scenario: str
    users: int
    duration_s: int
    spawn_rate: float
    redis_url: str | None
    out: Path
    seed: int
    locust_nice: int = 0  # Locust's nice level (its share of a machine it shares with the gateway)
    locust_idle: bool = False  # Locust under SCHED_IDLE: only the CPU time nobody else wants
    cpu_layout: str = "shared"  # "split": the gateway on a CPU of its own (split_cpus)


def _say(message: str) -> None:
    print(f"loadtests: {message}", file=sys.stderr, flush=True)


def _env(**extra: str) -> dict[str, str]:
    """The children's environment: no GATEWAY_* overrides or metrics dir of the caller's,
    the checkout importable, the loopback never proxied."""
    from gateway.config import ENV_OVERRIDES

    drop = {*ENV_OVERRIDES, "GATEWAY_CONFIG", "PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.update(extra)
    return env


def _versions() -> dict[str, str]:
    found: dict[str, str] = {"python": platform.python_version()}
    for name, dist in (("gateway", "gateway"), ("locust", "locust"), ("uvicorn", "uvicorn"),
                       ("redis-py", "redis"), ("matplotlib", "matplotlib")):
        try:
            found[name] = version(dist)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def _redis_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10,
                             check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return next((w[2:] for w in out.split() if w.startswith("v=")), out.strip() or "unknown")


#: Why a split layout cannot be had (``split_cpus`` is None), for the CLI's refusal and the run's.
SPLIT_UNAVAILABLE = "split needs 2 CPUs this process may use and taskset (util-linux)"


def split_cpus(available: set[int]) -> tuple[list[int], list[int]] | None:
    """The CPUs of a split layout: the gateway's (the lowest it may use) and everyone else's
    (the rest); None with fewer than 2 CPUs or without ``taskset`` (util-linux), which pins a
    command before it starts, so every thread it makes inherits the set.

    Why split: on a small machine a process that wakes a peer on its own CPU (a write to the
    upstream or Redis that was waiting for it) is preempted by that peer until the peer sleeps
    again; in production the upstream, the store and the clients are on other machines. The
    overload scenario measures the gateway's shedding, not that hand-off (RESULTS.md, run 9)."""
    if len(available) < 2 or shutil.which("taskset") is None:
        return None
    cpus = sorted(available)
    return cpus[:1], cpus[1:]


class _Run:
    """The state of one run: its children (stopped in reverse order) and its files."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.scenario: Scenario = SCENARIOS[options.scenario]
        self.out = options.out
        self.logs = options.out / "logs"
        self.children: list[Child] = []
        self.settings: dict[str, Any] = {}
        self.gateway: Child | None = None
        self.rss: list[tuple[float, int]] = []  # (time.time(), bytes) of the gateway process
        self.probe: Child | None = None
        self.locust_waited_s: float | None = None  # Locust's runqueue wait, last read while it ran
        self.probe_path = options.out / "probe.json"
        self.cpus: tuple[list[int], list[int]] | None = None  # (gateway's, everyone else's)
        if options.cpu_layout == "split":
            self.cpus = split_cpus(os.sched_getaffinity(0))
            if self.cpus is None:
                msg = f"--cpu-layout {SPLIT_UNAVAILABLE}"
                raise StartError(msg)
            self.settings["cpus"] = {"gateway": self.cpus[0], "others": self.cpus[1]}

    def pinned(self, name: str, command: list[str]) -> list[str]:
        """``command`` run on its CPUs of a split layout (exec'd by taskset: the PID is its own)."""
        if self.cpus is None:
            return command
        cpus = self.cpus[0] if name == "gateway" else self.cpus[1]
        return ["taskset", "-c", ",".join(map(str, cpus)), *command]

    def start_redis(self) -> str:
        if self.options.redis_url:
            self.settings["redis"] = "given (--redis-url)"
            return self.options.redis_url
        binary = shutil.which("redis-server")
        if binary is None:
            msg = "redis-server is not installed (apt-get install redis-server), and no --redis-url"
            raise StartError(msg)
        port = free_port()
        data = self.logs / "redis"
        data.mkdir(parents=True, exist_ok=True)
        child = Child("redis", self.pinned("redis", [
            binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
            "--dir", str(data), "--daemonize", "no"]), self.logs)
        self.children.append(child)
        child.wait_redis(port, REDIS_START_S)
        self.settings["redis"] = f"started: redis-server {_redis_version(binary)}, no persistence"
        _say(f"redis-server on {HOST}:{port} (pid {child.pid})")
        return f"redis://{HOST}:{port}/0"

    def start_upstream(self) -> str:
        port = free_port()
        child = Child("upstream", self.pinned("upstream", [
            sys.executable, "-m", "uvicorn", "loadtests.upstream:create_app", "--factory", "--host",
            HOST, "--port", str(port), "--loop", "uvloop", "--http", "httptools", "--no-access-log",
            "--log-level", "warning", "--no-server-header", "--no-date-header", "--backlog", "2048"]),
            self.logs, env=_env(), cwd=ROOT)
        self.children.append(child)
        url = f"http://{HOST}:{port}"
        child.wait_http(f"{url}/hello", SERVER_START_S)
        _say(f"upstream on {url} (pid {child.pid})")
        return url

    def start_gateway(self, upstream_url: str, store_url: str) -> str:
        port = free_port()
        config = gateway_config(self.scenario, upstream_url=upstream_url, store_url=store_url,
                                key_prefix=f"lt{secrets.token_hex(4)}")
        self.settings["gateway_config"] = config
        path = self.out / "gateway.toml"
        path.write_text(toml(config))
        child = Child("gateway", self.pinned("gateway", [
            sys.executable, "-m", "gateway", "serve", "--config", str(path), "--host", HOST,
            "--port", str(port)]), self.logs, env=_env(), cwd=ROOT)
        self.children.append(child)
        self.gateway = child
        url = f"http://{HOST}:{port}"
        child.wait_http(f"{url}/_gateway/readyz", SERVER_START_S)
        _say(f"gateway on {url} (pid {child.pid}) -> {upstream_url}")
        return url

    def run_locust(self, plan: Plan) -> int:
        o = self.options
        command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
                   "-u", str(o.users), "-r", f"{o.spawn_rate:g}", "-t", f"{o.duration_s}s",
                   "--host", plan.gateway_url, "--csv", str(self.out / "locust"),
                   "--html", str(self.out / "locust.html"), "--only-summary",
                   "--stop-timeout", str(LOCUST_STOP_TIMEOUT_S), "--exit-code-on-error", "0",
                   *self.scenario.user_classes]
        if o.locust_nice:
            command = ["nice", "-n", str(o.locust_nice), *command]  # exec'd: the PID is Locust's
        command = self.pinned("locust", command)
        _say(f"locust: {o.users} users ({', '.join(self.scenario.user_classes)}) for {o.duration_s} s")
        servers = {c.name: c.cpu_seconds() for c in self.children}
        waited = {c.name: c.runqueue_wait_seconds() for c in self.children}
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        if self.scenario.overload:
            self._start_probe(plan)
            servers["probe"] = waited["probe"] = 0.0
        child = Child("locust", command, self.logs, env=_env(**{ENV_PLAN: plan.to_env()}), cwd=ROOT)
        self.children.append(child)
        if o.locust_idle:
            # only the CPU nobody else wants: the flood's own machines would take none of this one's
            try:
                os.sched_setscheduler(child.pid, os.SCHED_IDLE, os.sched_param(0))
            except OSError as exc:  # gone already, or a kernel without the policy
                child.stop(STOP_GRACE_S)
                msg = f"Locust could not be put under SCHED_IDLE: {exc}"
                raise StartError(msg) from None
        status = self._wait_sampling(child, o.duration_s + LOCUST_STOP_TIMEOUT_S + LOCUST_MARGIN_S)
        self._cpu_use(servers, waited, reaped, time.monotonic() - started, o.duration_s)
        if status is None:
            child.stop(STOP_GRACE_S)
            msg = f"locust overstayed {o.duration_s} s + {LOCUST_MARGIN_S:.0f} s and was stopped"
            raise StartError(msg)
        if status != 0 or not (self.out / "locust_stats.csv").exists():
            msg = f"locust exited with {status}: {child.stderr_tail()}"
            raise StartError(msg)
        return status

    def _start_probe(self, plan: Plan) -> None:
        """The critical trickle from a process of its own, as many clients and as paced as
        Locust's critical users, for the run's duration."""
        o = self.options
        command = [sys.executable, "-m", "loadtests.probe", "--url", plan.gateway_url,
                   "--seconds", str(o.duration_s), "--clients", str(CRITICAL_USERS),
                   "--pacing", f"{CRITICAL_PACING_S:g}", "--seed", str(o.seed),
                   "--out", str(self.probe_path)]
        self.probe = Child("probe", self.pinned("probe", command), self.logs, env=_env(), cwd=ROOT)
        self.children.append(self.probe)
        _say(f"probe: {CRITICAL_USERS} clients, one charge each every {CRITICAL_PACING_S:g} s "
             f"(pid {self.probe.pid})")

    def probe_record(self) -> dict[str, Any] | None:
        """Wait (bounded) for the probe to finish and read what it recorded; None without one."""
        if self.probe is None:
            return None
        status = self.probe.wait(PROBE_MARGIN_S)
        if status != 0 or not self.probe_path.exists():
            msg = f"the probe exited with {status}: {self.probe.stderr_tail()}"
            raise StartError(msg)
        record: dict[str, Any] = json.loads(self.probe_path.read_text())
        return record

    def _wait_sampling(self, child: Child, timeout_s: float) -> int | None:
        """Wait for Locust as ``Child.wait`` does, reading the gateway's RSS every ``RSS_SAMPLE_S``
        meanwhile (the overload scenario checks it stays bounded; the others report it)."""
        end = time.monotonic() + timeout_s
        samples = 0
        while True:
            samples += 1
            if samples == 2 and child.running():  # by now Locust runs (nice has exec'd it)
                self._read_locust_priority(child)
                self._read_cpus()
            waited = child.runqueue_wait_seconds()  # gone once Locust is reaped: the last one read
            if waited is not None:
                self.locust_waited_s = waited
            if self.gateway is not None:
                rss = self.gateway.rss_bytes()
                if rss is not None:
                    self.rss.append((time.time(), rss))
            status = child.wait(max(0.0, min(RSS_SAMPLE_S, end - time.monotonic())))
            if status is not None or time.monotonic() >= end:
                return status

    def _read_locust_priority(self, child: Child) -> None:
        """What the kernel says of the running Locust: its nice level, its policy, and whether it
        shares the gateway's scheduling autogroup (None on a kernel without them)."""
        with contextlib.suppress(OSError):  # it just exited
            self.settings["locust_nice_seen"] = os.getpriority(os.PRIO_PROCESS, child.pid)
            idle = os.sched_getscheduler(child.pid) == os.SCHED_IDLE
            self.settings["locust_policy_seen"] = "idle" if idle else "normal"
        group = child.autogroup()
        self.settings["locust_shares_autogroup"] = (
            None if group is None or self.gateway is None else group == self.gateway.autogroup())

    def _read_cpus(self) -> None:
        """The CPUs each running process may use, as the kernel says (``cpus_seen``)."""
        seen: dict[str, list[int]] = {}
        for child in self.children:
            with contextlib.suppress(OSError):  # it just exited
                seen[child.name] = sorted(os.sched_getaffinity(child.pid))
        self.settings["cpus_seen"] = seen

    def _cpu_use(self, before: dict[str, float | None], waited_before: dict[str, float | None],
                 reaped: resource.struct_rusage, wall_s: float, run_s: int) -> None:
        """CPU seconds each process spent while Locust ran, and that over the run's duration (the
        servers idle while Locust starts and stops): on a small machine whoever sits at 100 % of
        a CPU is what the latencies measure. Locust's figure includes its own start and stop.
        Beside it, how long each process's main thread waited, runnable, for a CPU that others
        held (``runqueue_wait_s``): latency the scheduler added, not the process."""
        used: dict[str, float | None] = {}
        waits: dict[str, float | None] = {}
        for child in self.children:
            now, then = child.cpu_seconds(), before.get(child.name)
            used[child.name] = None if now is None or then is None else now - then
            w_now, w_then = child.runqueue_wait_seconds(), waited_before.get(child.name)
            waits[child.name] = None if w_now is None or w_then is None else w_now - w_then
        after = resource.getrusage(resource.RUSAGE_CHILDREN)  # Locust, reaped by now
        used["locust"] = (after.ru_utime + after.ru_stime) - (reaped.ru_utime + reaped.ru_stime)
        waits["locust"] = self.locust_waited_s
        table: dict[str, Any] = {"wall_s": round(wall_s, 1)}
        for name, cpu in used.items():
            if cpu is None:
                table[name] = None
                continue
            table[name] = {"cpu_s": round(cpu, 2), "share_of_one_cpu": round(cpu / run_s, 2)}
            wait = waits.get(name)
            if wait is not None:
                table[name]["runqueue_wait_s"] = round(wait, 2)
        self.settings["cpu_while_locust_ran"] = table

    def stop_all(self) -> None:
        while self.children:
            child = self.children.pop()
            child.stop(STOP_GRACE_S)


def run(options: Options) -> int:
    """Run the scenario, write the report into ``options.out``; the exit status."""
    started = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    options.out.mkdir(parents=True, exist_ok=True)
    try:
        state = _Run(options)
    except StartError as exc:
        _say(f"run failed: {exc}")
        return EXIT_FAILED
    scenario = state.scenario
    journal_path = options.out / "journal.json"
    try:
        store_url = state.start_redis()
        upstream_url = state.start_upstream()
        gateway_url = state.start_gateway(upstream_url, store_url)
        plan = Plan(scenario=scenario.name, gateway_url=gateway_url, direct_url=upstream_url,
                    journal_path=str(journal_path), seed=options.seed,
                    api_keys=api_key_count(scenario, options.users),
                    baseline_s=baseline_seconds(scenario, options.duration_s))
        locust_status = state.run_locust(plan)
        probe = state.probe_record()
        record = http_json(f"{upstream_url}/_record")
        metrics_status, metrics_text = http_get(f"{gateway_url}/_gateway/metrics", timeout_s=10.0)
    except StartError as exc:
        _say(f"run failed: {exc}")
        return EXIT_FAILED
    finally:
        state.stop_all()
    journal: dict[str, Any] = (json.loads(journal_path.read_text()) if journal_path.exists()
                               else Journal().to_dict())
    (options.out / "record.json").write_text(json.dumps(record))
    summary = _summary(state, plan, journal, record,
                       metrics_text.decode() if metrics_status == 200 else "", probe=probe)
    summary["settings"]["locust_exit_status"] = locust_status
    summary["started_at"] = started.isoformat(timespec="seconds").replace("+00:00", "Z")
    summary["wall_s"] = round(time.monotonic() - t0, 1)
    try:
        from loadtests.chart import write_chart

        write_chart(summary, options.out / "chart.png")
    except ImportError as exc:  # the load extra without matplotlib: the rest of the report stands
        _say(f"no chart: {exc} (pip install -e '.[load]')")
    files = sorted(p.name for p in options.out.iterdir() if p.is_file())
    summary["files"] = sorted({*files, "summary.json"})
    report.write_summary(options.out / "summary.json", summary)
    print(report.format_table(summary), flush=True)
    return EXIT_OK if summary["ok"] else EXIT_INVARIANT


def _summary(state: _Run, plan: Plan, journal: dict[str, Any], record: dict[str, Any],
             metrics_text: str, *, probe: dict[str, Any] | None = None) -> dict[str, Any]:
    o, scenario = state.options, state.scenario
    rows = report.read_stats_csv(o.out / "locust_stats.csv")
    routes = report.route_stats(rows, journal.get("latency"))
    flood_started = journal.get("marks", {}).get("flood_started")
    expected = scenario.routes
    if probe is not None:
        probed = report.probe_routes(probe, flood_started)
        routes.update(probed)
        expected = (*expected, *probed)
    invariants = checks.check_requests(routes, expected)
    summary: dict[str, Any] = {
        "scenario": scenario.name, "description": scenario.description, "ok": False,
        "out": str(o.out),
        "settings": {"users": o.users, "spawn_rate": o.spawn_rate, "duration_s": o.duration_s,
                     "seed": o.seed, "locust_nice": o.locust_nice,
                     "locust_policy": "idle" if o.locust_idle else "normal", "cpu_layout": o.cpu_layout,
                     "cpu_count": os.cpu_count(),
                     "machine": platform.machine(),
                     "versions": _versions(), **state.settings},
        "routes": routes,
        "totals": {k: round(sum(r[k] for r in routes.values()), 1) for k in ("count", "failures", "rps")},
    }
    if scenario.direct and {DIRECT_HELLO, GATEWAY_HELLO} <= set(routes):
        direct, via = routes[DIRECT_HELLO], routes[GATEWAY_HELLO]
        summary["overhead"] = {
            "added_latency_ms": report.added_latency(direct, via),
            "added_latency_ms_locust": report.added_latency(direct, via, fine=False),
            "gateway_rps_share": round(via["rps"] / direct["rps"], 3) if direct["rps"] else None,
            "note": "same users, one request each way per iteration: equal counts by design",
        }
    if scenario.ratelimit:
        invariants += checks.check_ratelimit(journal, plan.rate_per_s, plan.burst)
        summary["ratelimit"] = {"rate_per_s": plan.rate_per_s, "burst": plan.burst,
                                "per_key": checks.rate_bounds(journal, plan.rate_per_s, plan.burst)}
    if scenario.payments:
        invariants += checks.check_payments(journal, record)
        kinds: dict[str, int] = {}
        for answers in journal.get("keys", {}).values():
            for kind, n in answers.items():
                kinds[kind] = kinds.get(kind, 0) + n
        summary["payments"] = {"behaviours": journal.get("counts", {}), "answers": kinds,
                               "keys_sent": len(journal.get("keys", {})),
                               "keys_executed": len(record.get("executions", {})),
                               "upstream_charges": record.get("charges"),
                               "upstream_unkeyed": record.get("unkeyed")}
    summary["memory"] = report.memory_summary(state.rss, flood_started if scenario.overload else None)
    if scenario.overload:
        probe_keys = probe["keys"] if probe is not None else None
        summary["overload"] = report.overload_summary(routes, journal, record, baseline_s=plan.baseline_s,
                                                      memory=summary["memory"], probe_keys=probe_keys)
        invariants += checks.check_overload(summary["overload"], journal, record, summary["memory"],
                                            probe_keys)
    summary["errors"] = {
        "failures": summary["totals"]["failures"],
        "failures_csv": _csv_rows(o.out / "locust_failures.csv"),
        "exceptions_csv": _csv_rows(o.out / "locust_exceptions.csv"),
        "client_violations": journal.get("violations", {}),
        "examples": journal.get("examples", []),
    }
    summary["gateway"] = report.gateway_counters(metrics_text) if metrics_text else None
    if scenario.overload:  # what the gateway says it shed, beside what the users saw
        summary["overload"]["gateway_shed"] = (summary["gateway"] or {}).get("gateway_shed_total")
    summary["notes"] = _notes(routes, journal, _text(state.logs / "locust.err"))
    summary["invariants"] = [i.to_dict() for i in invariants]
    summary["ok"] = all(i.ok for i in invariants)
    return summary


def _notes(routes: dict[str, Any], journal: dict[str, Any], locust_log: str) -> list[str]:
    """What a reader of the numbers should know about how they were taken."""
    notes = []
    if "CPU usage" in locust_log:
        notes.append("Locust warned that its process used over 90% of a CPU: its own scheduling "
                     "adds to every response time it measures, on both routes alike")
    for name, route in routes.items():
        if name in (PROBE_UNLOADED, PROBE_FLOOD):
            continue  # the probe's own record, not Locust's
        counted = sum(journal.get("latency", {}).get(name, {}).values())
        if counted != route["count"]:
            notes.append(f"{name}: Locust's CSV counts {route['count']} requests, the journal "
                         f"{counted} (the CSV is rewritten once a second)")
    return notes


def _csv_rows(path: Path, limit: int = 20) -> list[dict[str, str]]:
    return report.read_stats_csv(path)[:limit] if path.exists() else []


def _text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
