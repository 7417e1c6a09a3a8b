"""The load-test runner (``python -m loadtests run``) and the pure parts of its report.

The runs are real: the runner starts Redis, the upstream, ``gateway serve`` and Locust as
processes of its own (short runs: a few seconds, ten users) and the tests read its
``summary.json``. Locust is never imported here (gevent would monkey-patch the test process):
only the runner's child imports it. The unit tests feed the summary and the invariant checks
crafted rows and records, including ones that must fail.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loadtests.checks import (
    P99_RATIO_MAX,
    RSS_FLAT_MARGIN_MIB,
    check_overload,
    check_payments,
    check_ratelimit,
    check_requests,
    rate_bounds,
)
from loadtests.cli import main, parse_duration
from loadtests.journal import Journal, percentile
from loadtests.plan import (
    CRITICAL_FLOOD,
    CRITICAL_UNLOADED,
    CRITICAL_USERS,
    FLOOD_WORK,
    PROBE_FLOOD,
    PROBE_UNLOADED,
    SCENARIOS,
    baseline_seconds,
    gateway_config,
    toml,
)
from loadtests.processes import ROOT_AUTOGROUP, autogroup_name
from loadtests.report import (
    MIB,
    added_latency,
    format_table,
    gateway_counters,
    memory_summary,
    overload_summary,
    probe_routes,
    route_stats,
)
from loadtests.runner import Options, split_cpus
from tests.redis_process import redis_server_binary
from tests.serve_process import REPO_ROOT, ServerProcess, child_env

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUN_MARGIN_S = 150.0  # the runner's own bounds: startup waits, Locust's margin, stops


# ------------------------------------------------------------------------------ pure parts
def test_the_pure_modules_do_not_import_locust() -> None:
    """Importing the runner's pure modules leaves Locust (and gevent's patching) out."""
    assert "locust" not in sys.modules
    assert "gevent" not in sys.modules


@pytest.mark.parametrize(("text", "seconds"), [
    ("60s", 60), ("90", 90), ("2m", 120), ("1m30s", 90), ("1h", 3600), (" 5s ", 5),
])
def test_durations_are_parsed_to_whole_seconds(text: str, seconds: int) -> None:
    """Durations take Locust's forms and a plain number of seconds."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0s", "fast", "5 s", "1.5s", "2h", "s", "-3"])
def test_bad_durations_are_refused(text: str) -> None:
    """A duration that is not 1 s to an hour in a known form is refused."""
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration(text)


@pytest.mark.parametrize(("argv", "option"), [
    (["run", "--scenario", "overhead", "--users", "0"], "--users"),
    (["run", "--scenario", "overhead", "--duration", "soon"], "--duration"),
    (["run", "--scenario", "nope"], "--scenario"),
    (["run", "--scenario", "payments", "--spawn-rate", "-1"], "--spawn-rate"),
    (["run", "--scenario", "payments", "--redis-url", "http://x"], "--redis-url"),
    (["run", "--scenario", "payments", "--seed", "one"], "--seed"),
    (["run", "--scenario", "overload", "--locust-nice", "20"], "--locust-nice"),
    (["run", "--scenario", "mixed", "--users", "2"], "--users"),
    (["run", "--scenario", "overload", "--users", str(CRITICAL_USERS)], "--users"),
    (["run", "--scenario", "overload", "--cpu-layout", "apart"], "--cpu-layout"),
])
def test_a_bad_option_is_exit_2_with_one_line_naming_it(
        argv: list[str], option: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A bad option is exit 2 and one line on stderr that names the option."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert option in err


def test_split_cpus_gives_the_gateway_the_lowest_cpu_and_everyone_else_the_rest() -> None:
    """The split layout's sets never overlap; one CPU has no split."""
    assert split_cpus({0}) is None
    if shutil.which("taskset") is not None:
        assert split_cpus({3, 1, 2}) == ([1], [2, 3])
        assert split_cpus({0, 1}) == ([0], [1])


@pytest.mark.parametrize(("argv", "idle", "layout"), [
    (["--scenario", "overload"], True, "split"),
    (["--scenario", "overload", "--no-locust-idle", "--cpu-layout", "shared"], False, "shared"),
    (["--scenario", "overhead"], False, "shared"),
    (["--scenario", "payments", "--locust-idle", "--cpu-layout", "split"], True, "split"),
])
def test_each_scenario_has_its_own_defaults_for_the_machine_it_shares(
        argv: list[str], idle: bool, layout: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """overload: Locust under SCHED_IDLE and the gateway on a CPU of its own unless told
    otherwise; the other scenarios: neither unless asked."""
    if layout == "split" and split_cpus(os.sched_getaffinity(0)) is None:
        pytest.skip("one CPU (or no taskset): no split layout here")
    seen: list[Options] = []
    monkeypatch.setattr("loadtests.runner.run", lambda options: seen.append(options) or 0)
    assert main(["run", *argv, "--out", str(tmp_path / "out")]) == 0
    assert (seen[0].locust_idle, seen[0].cpu_layout) == (idle, layout)


def test_on_one_cpu_the_overload_scenario_falls_back_to_the_shared_layout(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scenario's own default where a split cannot be had: shared (and the report says so)."""
    seen: list[Options] = []
    monkeypatch.setattr("loadtests.runner.run", lambda options: seen.append(options) or 0)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert main(["run", "--scenario", "overload", "--out", str(tmp_path / "out")]) == 0
    assert seen[0].cpu_layout == "shared"


def test_a_split_layout_on_one_cpu_is_exit_2_naming_the_option(tmp_path: Path) -> None:
    """Asked for where it cannot be had (a process allowed one CPU), the split layout is refused
    before anything starts, in one line."""
    if shutil.which("taskset") is None:
        pytest.skip("taskset (util-linux) is not installed")  # nothing CI runs: Debian has it
    result = subprocess.run(
        ["taskset", "-c", str(min(os.sched_getaffinity(0))), sys.executable, "-m", "loadtests", "run",
         "--scenario", "overload", "--cpu-layout", "split", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=REPO_ROOT, env=child_env(), check=False, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1
    assert "--cpu-layout" in result.stderr
    assert not (tmp_path / "out").exists()


def test_an_out_folder_that_is_not_empty_is_refused(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """--out never overwrites an earlier report."""
    (tmp_path / "summary.json").write_text("{}")
    assert main(["run", "--scenario", "overhead", "--out", str(tmp_path)]) == 2
    assert "--out" in capsys.readouterr().err


STATS_CSV = """\
Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,Min Response Time,\
Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,\
99.99%,100%
GET,direct GET /hello,1000,0,1,0.8,0.2,9.5,19,500.25,0.0,1,1,1,1,2,2,3,3,8,9,9
GET,gateway GET /hello,1000,2,2,2.3,0.9,40.1,19,499.9,1.0,2,3,3,3,3,4,5,6,30,40,40
POST,gateway POST /charges,0,0,0,0,0,0,0,0.0,0.0,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A
,Aggregated,2000,2,2,1.5,0.2,40.1,19,1000.15,1.0,1,2,2,2,3,3,4,5,20,40,40
"""


def _rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_route_stats_come_from_the_csv_rows_without_the_aggregate() -> None:
    """Per-route counts, failures, rps and percentiles are read from Locust's stats rows."""
    routes = route_stats(_rows(STATS_CSV))
    assert set(routes) == {"direct GET /hello", "gateway GET /hello", "gateway POST /charges"}
    via = routes["gateway GET /hello"]
    assert (via["count"], via["failures"], via["rps"]) == (1000, 2, 499.9)
    assert (via["p50_ms"], via["p95_ms"], via["p99_ms"], via["max_ms"]) == (2.0, 4.0, 6.0, 40.1)
    assert routes["gateway POST /charges"]["p99_ms"] is None  # N/A when nothing was sent


def test_fine_percentiles_and_added_latency_come_from_the_journal_histogram() -> None:
    """The journal's 10 us histogram gives the fine percentiles; added = gateway - direct."""
    journal = Journal()
    for i in range(100):
        journal.latency_ms("direct GET /hello", 0.5 + i * 0.01)  # 0.50 .. 1.49 ms
        journal.latency_ms("gateway GET /hello", 1.5 + i * 0.01)  # 1.50 .. 2.49 ms
    routes = route_stats(_rows(STATS_CSV), journal.to_dict()["latency"])
    assert routes["direct GET /hello"]["fine_ms"] == {"p50": 0.99, "p95": 1.44, "p99": 1.48}
    added = added_latency(routes["direct GET /hello"], routes["gateway GET /hello"])
    assert added == {"p50": 1.0, "p95": 1.0, "p99": 1.0}
    coarse = added_latency(routes["direct GET /hello"], routes["gateway GET /hello"], fine=False)
    assert coarse == {"p50": 1.0, "p95": 2.0, "p99": 3.0}


def test_percentile_is_nearest_rank_and_none_when_empty() -> None:
    """Nearest rank over the histogram; an empty one has no percentile."""
    assert percentile({"100": 1, "200": 98, "900": 1}, 99) == 2.0
    assert percentile({"100": 1, "200": 98, "900": 1}, 100) == 9.0
    assert percentile({}, 50) is None


def test_failed_requests_fail_the_run() -> None:
    """Any Locust failure, or a route never exercised, is a failed invariant."""
    routes = route_stats(_rows(STATS_CSV))
    results = {i.name: i for i in check_requests(routes, ["direct GET /hello", "gateway POST /charges"])}
    assert not results["no request failed"].ok
    assert "gateway GET /hello: 2" in results["no request failed"].detail
    assert not results["every route was exercised"].ok


def _payments_journal(keys: dict[str, dict[str, int]]) -> dict[str, Any]:
    journal = Journal()
    for key, answers in keys.items():
        journal.key_sent(key)
        for kind, n in answers.items():
            for _ in range(n):
                journal.key_answer(key, kind)
    for what in ("new", "retry", "burst", "reuse"):
        journal.count(what)
    return journal.to_dict()


def test_payments_checks_pass_when_every_key_ran_once() -> None:
    """A record where each answered key ran once keeps every payments invariant."""
    journal = _payments_journal({"k1": {"fresh": 1, "replayed": 2}, "k2": {"fresh": 1, "conflict": 4}})
    results = check_payments(journal, {"executions": {"k1": 1, "k2": 1}})
    assert all(i.ok for i in results), results


def test_payments_checks_fail_on_a_key_executed_twice() -> None:
    """The upstream's record of a key executed twice fails "no key executed twice"."""
    journal = _payments_journal({"k1": {"fresh": 1, "replayed": 1}, "k2": {"fresh": 1}})
    results = {i.name: i for i in check_payments(journal, {"executions": {"k1": 2, "k2": 1}})}
    twice = results["no key executed twice (upstream record)"]
    assert not twice.ok
    assert "k1 ran 2x" in twice.detail
    assert not results["every key answered 201 executed exactly once (upstream record)"].ok


def test_payments_checks_fail_on_an_answered_key_that_never_ran_or_an_unknown_key() -> None:
    """A 201 for a key the upstream never ran, or a run of a key no client sent, fails."""
    journal = _payments_journal({"k1": {"fresh": 1}})
    results = {i.name: i for i in check_payments(journal, {"executions": {"stranger": 1}})}
    assert not results["every key answered 201 executed exactly once (upstream record)"].ok
    assert not results["the upstream ran only keys the clients sent"].ok


def test_payments_checks_fail_on_client_side_violations() -> None:
    """What the users saw on the wire (a replay that differs, a second execution) fails the run."""
    journal = Journal()
    journal.key_sent("k1")
    journal.key_answer("k1", "fresh")
    journal.violation("replay_differs", "k1: body differs")
    journal.violation("ran_again", "k1: a retry was answered by a new execution")
    results = {i.name: i for i in check_payments(journal.to_dict(), {"executions": {"k1": 1}})}
    replay = results["retries replayed byte for byte with Idempotent-Replayed"]
    assert not replay.ok
    assert "ran_again=1" in replay.detail
    assert not results["every payment behaviour was exercised"].ok


def test_rate_limit_checks_bound_the_allowed_count_by_burst_plus_rate_times_elapsed() -> None:
    """Allowed above burst + rate * elapsed fails; far below it (when saturated) fails too."""
    journal = Journal()
    journal.rate("ok", "allowed", 0.0, 0.0)
    for _ in range(114):
        journal.rate("ok", "allowed", 1.0, 5.0)
    journal.rate("ok", "denied", 1.0, 5.0)
    for _ in range(140):
        journal.rate("over", "allowed", 0.0, 5.0)
    journal.rate("over", "denied", 0.0, 5.0)
    for _ in range(50):
        journal.rate("low", "allowed", 0.0, 5.0)
    journal.rate("low", "denied", 0.0, 5.0)
    data = journal.to_dict()
    table = rate_bounds(data, rate_per_s=20, burst=20)
    assert table["ok"]["bound"] == 121.0  # 20 + 20 * 5 + 1
    results = check_ratelimit(data, rate_per_s=20, burst=20)
    by_name = {i.name.split(",")[0]: i for i in results}
    assert not by_name["rate limit: allowed <= burst + rate * elapsed"].ok
    assert "over: 140 > 121.0" in by_name["rate limit: allowed <= burst + rate * elapsed"].detail
    floor = next(i for i in results if i.name.startswith("rate limit: allowed >= "))
    assert not floor.ok
    assert "low" in floor.detail
    assert not floor.detail.startswith("ok")


def test_the_table_shows_a_failed_invariant() -> None:
    """The printed table marks a failed invariant and the run as FAILED."""
    summary = {"scenario": "payments", "settings": {"users": 1, "duration_s": 1}, "routes": {},
               "ok": False, "out": "x",
               "invariants": [{"name": "no key executed twice", "ok": False, "detail": "k1 ran 2x"}]}
    table = format_table(summary)
    assert "[FAIL] no key executed twice: k1 ran 2x" in table
    assert "FAILED" in table


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_every_scenarios_gateway_config_is_valid(name: str, tmp_path: Path) -> None:
    """The config the runner writes for each scenario passes ``gateway check``."""
    from gateway.config import load_config

    config = gateway_config(SCENARIOS[name], upstream_url="http://127.0.0.1:9", key_prefix="lt",
                            store_url="redis://127.0.0.1:6379/0")
    path = tmp_path / "gateway.toml"
    path.write_text(toml(config))
    load_config(str(path))


def test_the_overload_config_sheds_locally_by_priority_with_no_rate_limit(tmp_path: Path) -> None:
    """overload: POST /charges is the critical class, the local shedder is on, nothing rate-limits."""
    from gateway.config import load_config

    config = gateway_config(SCENARIOS["overload"], upstream_url="http://127.0.0.1:9", key_prefix="lt",
                            store_url="redis://127.0.0.1:6379/0")
    path = tmp_path / "gateway.toml"
    path.write_text(toml(config))
    loaded = load_config(str(path))
    assert "[shedding.local]" in path.read_text()
    assert [(c.name, c.paths, c.methods, c.reserve) for c in loaded.priorities] == [
        ("critical", ("/charges",), frozenset({"POST"}), 0.2)]
    local = loaded.shedding.local
    assert local.enabled
    assert (local.max_in_flight, local.max_loop_lag_s) == (32, 0.05)
    assert not loaded.shedding.fleet.enabled
    assert loaded.rate_limits == ()
    assert loaded.concurrency_limits == ()


@pytest.mark.parametrize(("duration_s", "baseline_s"), [(60, 15), (600, 15), (8, 2), (3, 1)])
def test_the_overload_baseline_is_a_quarter_of_the_run_from_1_to_15_s(duration_s: int,
                                                                     baseline_s: int) -> None:
    """The unloaded phase is a quarter of the run, 1 to 15 s; the other scenarios have none."""
    assert baseline_seconds(SCENARIOS["overload"], duration_s) == baseline_s
    assert baseline_seconds(SCENARIOS["payments"], duration_s) == 0


def test_memory_summary_compares_the_first_and_last_third_from_the_phase_start() -> None:
    """RSS in MiB: start, peak, end, growth, and the thirds of the samples from ``since`` on."""
    samples = [(100.0 + i, (50 + i) * MIB) for i in range(10)]  # 50 .. 59 MiB, one a second
    memory = memory_summary(samples, since=104.0)  # phase: 54 .. 59
    assert (memory["start_mib"], memory["peak_mib"], memory["end_mib"], memory["growth_mib"]) == (
        50.0, 59.0, 59.0, 9.0)
    assert memory["phase_from_s"] == 4.0
    assert (memory["phase_first_third_max_mib"], memory["phase_last_third_max_mib"]) == (55.0, 59.0)
    assert memory["series"][0] == [0.0, 50.0]
    assert memory_summary([]) == {"samples": 0}


def test_gateway_counters_read_the_shed_counts_by_shedder_priority_and_decision() -> None:
    """gateway_shed_total is summed per shedder/priority/decision."""
    text = ('# TYPE gateway_shed counter\n'
            'gateway_shed_total{decision="shed",priority="default",shedder="local"} 41.0\n'
            'gateway_shed_total{decision="shed",priority="critical",shedder="local"} 0.0\n')
    shed = gateway_counters(text)["gateway_shed_total"]
    assert shed == {"local/default/shed": 41, "local/critical/shed": 0}


def _overload_journal(*, critical_other: int = 0, flood_error: int = 0, flood_bad_503: int = 0,
                      unloaded_ms: float = 5.0, flood_ms: float = 8.0,
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """A journal and an upstream record of an overload run: 100 critical charges in each phase."""
    journal, executions = Journal(), dict[str, int]()
    for i in range(200):
        key = f"k{i}"
        journal.key_sent(key)
        journal.count("critical_sent")
        if i < critical_other:
            journal.count("critical_not_201")
            journal.key_answer(key, "other")
            journal.violation("critical_not_201", f"{CRITICAL_FLOOD}: 503 load-shed")
            continue
        journal.count("critical_201")
        journal.key_answer(key, "fresh")
        executions[key] = 1
        journal.latency_ms(CRITICAL_UNLOADED if i < 100 else CRITICAL_FLOOD,
                           unloaded_ms if i < 100 else flood_ms)
    for _ in range(50):
        journal.count("flood_2xx")
        journal.latency_ms(FLOOD_WORK, 55.0)
    for _ in range(500):
        journal.count("flood_shed")
        journal.latency_ms(FLOOD_WORK, 1.0)
    journal.count("flood_error", flood_error)
    for _ in range(flood_bad_503):
        journal.count("flood_other")
        journal.violation("flood_503_not_shed", "503 with Retry-After None: b'upstream down'")
    journal.mark("flood_started", 110.0)
    record = {"executions": executions, "charges": len(executions), "unkeyed": 0, "work": 50}
    return journal.to_dict(), record


class _Checks(dict[str, Any]):
    """The overload invariants, looked up by the start of their name."""

    def __getitem__(self, prefix: str) -> Any:
        found = [i for name, i in self.items() if name.startswith(prefix)]
        assert len(found) == 1, (prefix, list(self))
        return found[0]


def _overload_checks(journal: dict[str, Any], record: dict[str, Any],
                     rss_mib: list[float] | None = None, probe: dict[str, Any] | None = None) -> _Checks:
    latency = journal["latency"]
    routes = {name: {"count": sum(h.values()), "failures": 0, "rps": 1.0,
                     "fine_ms": {f"p{p}": percentile(h, p) for p in (50, 95, 99)}}
              for name, h in latency.items()}
    if probe is not None:
        routes.update(probe_routes(probe, journal["marks"]["flood_started"]))
    rss = rss_mib or [50.0] * 10 + [60.0] * 20
    memory = memory_summary([(100.0 + i, int(m * MIB)) for i, m in enumerate(rss)], since=110.0)
    keys = probe["keys"] if probe is not None else None
    overload = overload_summary(routes, journal, record, baseline_s=10, memory=memory, probe_keys=keys)
    return _Checks({i.name: i for i in check_overload(overload, journal, record, memory, keys)})


def _probe(record: dict[str, Any], *, unloaded_ms: float = 4.0, flood_ms: float = 6.0,
           statuses: dict[int, int] | None = None) -> dict[str, Any]:
    """A probe's record of 50 charges before the flood (t < 110) and 50 after, each run once by
    the upstream (``record`` is updated), except those given another status in ``statuses``."""
    samples, keys = [], {}
    odd = statuses or {}
    for i in range(100):
        key, status = f"probe-{i}", odd.get(i, 201)
        sent_at = 100.0 + i * 0.1 if i < 50 else 110.0 + (i - 50) * 0.1
        samples.append([sent_at, unloaded_ms if i < 50 else flood_ms, status, key])
        keys[key] = status
        if status == 201:
            record["executions"][key] = 1
            record["charges"] += 1
    return {"samples": samples, "keys": keys, "clients": 5, "pacing_s": 0.1}


def test_overload_checks_pass_for_a_served_trickle_a_clean_shed_and_flat_memory() -> None:
    """Every critical charge 201 and run once, p99 within the ratio, the flood shed, RSS flat."""
    journal, record = _overload_journal()
    results = _overload_checks(journal, record)
    assert len(results) == 7
    assert all(i.ok for i in results.values()), list(results.values())


def test_overload_checks_fail_on_a_critical_refusal_or_a_slow_critical_p99() -> None:
    """A critical 503, or a critical p99 above the ratio times the unloaded one, fails."""
    journal, record = _overload_journal(critical_other=1)
    results = _overload_checks(journal, record)
    refused = results["critical: every request"]
    assert not refused.ok
    assert "1 of 200 not 201" in refused.detail
    journal, record = _overload_journal(unloaded_ms=5.0, flood_ms=5.0 * P99_RATIO_MAX + 0.1)
    slow = _overload_checks(journal, record)["critical: p99"]
    assert not slow.ok
    assert "x2.02" in slow.detail


def test_overload_checks_fail_when_the_upstream_record_disagrees() -> None:
    """A critical charge the upstream ran twice, or never, fails the record check."""
    journal, record = _overload_journal()
    record["executions"]["k0"] = 2
    assert not _overload_checks(journal, record)["critical: each 201"].ok
    journal, record = _overload_journal()
    del record["executions"]["k1"]
    record["charges"] -= 1
    assert not _overload_checks(journal, record)["critical: each 201"].ok


def test_overload_checks_fail_on_flood_timeouts_or_a_503_that_is_not_a_shed() -> None:
    """A flood request with no answer, or a 503 without the load-shed problem, fails."""
    journal, record = _overload_journal(flood_error=3, flood_bad_503=2)
    results = _overload_checks(journal, record)
    assert not results["sheddable: no timeouts"].ok
    assert "3 of 555" in results["sheddable: no timeouts"].detail
    shapes = results["sheddable: every non-2xx"]
    assert not shapes.ok
    assert "2 other answers" in shapes.detail
    assert "upstream down" in shapes.detail


def test_probe_routes_split_the_samples_at_the_floods_start() -> None:
    """The probe's samples before the flood mark are the unloaded route, the rest the flood;
    percentiles at 10 us, a non-201 counted as a failure."""
    probe = {"samples": [[99.0, 1.0, 201, "a"], [99.5, 3.0, 201, "b"], [110.0, 9.0, 201, "c"],
                         [111.0, 20.0, 0, "d"]], "keys": {}}
    routes = probe_routes(probe, 110.0)
    assert routes[PROBE_UNLOADED]["count"] == 2
    assert routes[PROBE_UNLOADED]["fine_ms"] == {"p50": 1.0, "p95": 3.0, "p99": 3.0}
    assert routes[PROBE_UNLOADED]["failures"] == 0
    assert routes[PROBE_FLOOD]["count"] == 2
    assert routes[PROBE_FLOOD]["failures"] == 1
    assert routes[PROBE_FLOOD]["max_ms"] == 20.0
    assert list(probe_routes(probe, None)) == [PROBE_UNLOADED]


def test_overload_checks_judge_the_latency_on_the_probe_when_it_ran() -> None:
    """With the probe, its p99 ratio is the one bounded: Locust's slow one is reported beside it,
    a slow probe fails; the probe's charges count in the upstream check."""
    journal, record = _overload_journal(unloaded_ms=5.0, flood_ms=50.0)  # Locust saw x10
    probe = _probe(record)
    results = _overload_checks(journal, record, probe=probe)
    assert all(i.ok for i in results.values()), list(results.values())
    assert "x1.5" in results["critical: p99"].detail
    assert "as Locust's critical users saw it: x10.0" in results["critical: p99"].detail
    assert "upstream charges 300, 201s 300" in results["critical: each 201"].detail
    journal, record = _overload_journal()
    slow = _overload_checks(journal, record, probe=_probe(record, flood_ms=4.0 * P99_RATIO_MAX + 0.1))
    assert not slow["critical: p99"].ok


def test_overload_checks_fail_on_a_probe_charge_refused_lost_or_run_twice() -> None:
    """A probe charge answered 503 or not at all fails the answers; one the upstream ran twice,
    or an execution of a key nobody sent, fails the record check."""
    journal, record = _overload_journal()
    results = _overload_checks(journal, record, probe=_probe(record, statuses={3: 503, 60: 0}))
    refused = results["critical: every request"]
    assert not refused.ok
    assert "probe: 1 refused, 1 errors" in refused.detail
    journal, record = _overload_journal()
    probe = _probe(record)
    record["executions"]["probe-7"] = 2
    assert not _overload_checks(journal, record, probe=probe)["critical: each 201"].ok
    journal, record = _overload_journal()
    probe = _probe(record)
    record["executions"]["probe-stranger"] = 1
    record["charges"] += 1
    assert "unknown keys: probe-stranger" in _overload_checks(journal, record, probe=probe)[
        "critical: each 201"].detail


def test_overload_checks_fail_on_memory_that_keeps_growing() -> None:
    """RSS that grows through the flood (last third above the first + margin) fails."""
    journal, record = _overload_journal()
    growing = [50.0] * 10 + [60.0 + i * (RSS_FLAT_MARGIN_MIB + 4) / 20 for i in range(20)]
    memory = _overload_checks(journal, record, growing)["gateway RSS"]
    assert not memory.ok
    assert "flood thirds" in memory.detail
    assert not _overload_checks(journal, record, [50.0] * 10 + [200.0] * 20)["gateway RSS"].ok


def test_the_table_shows_the_overload_phases_and_memory() -> None:
    """The printed table gives the critical p99 in both phases, the flood's answers and the RSS."""
    journal, record = _overload_journal()
    latency = journal["latency"]
    routes = {name: {"count": sum(h.values()), "failures": 0, "rps": 1.0, "max_ms": 1.0,
                     "fine_ms": {f"p{p}": percentile(h, p) for p in (50, 95, 99)}}
              for name, h in latency.items()}
    memory = memory_summary([(100.0, 50 * MIB), (101.0, 51 * MIB)])
    summary = {"scenario": "overload", "settings": {"users": 200, "duration_s": 60}, "routes": routes,
               "overload": overload_summary(routes, journal, record, baseline_s=10, memory=memory),
               "memory": memory, "ok": True, "out": "x", "invariants": []}
    table = format_table(summary)
    assert "critical p99: unloaded 5.00 ms, under the flood 8.00 ms (x1.60); 200 of 200 answered 201" in table
    assert "flood: 550 sent, 50 2xx, 500 shed (503), 0 errors, 0 other" in table
    assert "gateway RSS (MiB): start 50.0, peak 51.0, end 51.0" in table


# ------------------------------------------------------------------------------ real runs
def _require_tools() -> None:
    missing = [what for what, ok in (("locust (pip install -e '.[load]')",
                                      importlib.util.find_spec("locust") is not None),
                                     ("redis-server", redis_server_binary() is not None)) if not ok]
    if missing:
        message = f"{', '.join(missing)} not installed"
        if os.environ.get("CI"):
            pytest.fail(f"{message}: in CI that is a failure, not a skip")
        pytest.skip(message)


def _run(tmp_path: Path, scenario: str, duration: str, users: int = 10,
         may_fail: tuple[str, ...] = (), extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run a scenario for real; every invariant must hold but those named in ``may_fail``."""
    _require_tools()
    out = tmp_path / scenario
    seconds = parse_duration(duration)
    result = subprocess.run(
        [sys.executable, "-m", "loadtests", "run", "--scenario", scenario, "--users", str(users),
         "--duration", duration, "--out", str(out), *extra],
        capture_output=True, text=True, cwd=REPO_ROOT, env=child_env(), check=False,
        timeout=seconds + RUN_MARGIN_S)
    assert (out / "summary.json").exists(), result.stderr[-3000:]
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    failed = [i for i in summary["invariants"] if not i["ok"] and not i["name"].startswith(may_fail)]
    assert result.returncode in ((0, 1) if may_fail else (0,)), (failed, result.stdout[-3000:],
                                                                  result.stderr[-3000:])
    assert not failed
    assert summary["ok"] or may_fail
    for name in ("locust.html", "locust_stats.csv", "locust_failures.csv", "gateway.toml"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "chart.png").read_bytes()[:8] == PNG_MAGIC
    assert summary["totals"]["count"] > 0
    assert all(route["count"] > 0 for route in summary["routes"].values())
    assert summary["scenario"] in result.stdout  # the short table
    return summary


@pytest.mark.slow
def test_overhead_run_reports_both_routes_and_the_added_latency(tmp_path: Path) -> None:
    """overhead: the same route direct and via the gateway, equal counts, added latency known."""
    summary = _run(tmp_path, "overhead", "4s")
    settings = summary["settings"]
    assert settings["locust_policy"] == settings["locust_policy_seen"] == "normal"  # by default
    assert settings["cpu_layout"] == "shared"  # the overhead scenario's default
    assert settings["cpus_seen"]["gateway"] == sorted(os.sched_getaffinity(0))
    direct, via = summary["routes"]["direct GET /hello"], summary["routes"]["gateway GET /hello"]
    assert direct["count"] == via["count"] > 0
    assert direct["failures"] == via["failures"] == 0
    added = summary["overhead"]["added_latency_ms"]
    assert set(added) == {"p50", "p95", "p99"}
    assert all(isinstance(v, float) for v in added.values())
    assert summary["gateway"]["gateway_requests_total"]["200"] >= via["count"]


@pytest.mark.slow
def test_payments_run_keeps_at_most_once(tmp_path: Path) -> None:
    """payments: no key executed twice by the upstream's own record, every behaviour exercised."""
    summary = _run(tmp_path, "payments", "4s")
    names = {i["name"] for i in summary["invariants"]}
    assert "no key executed twice (upstream record)" in names
    payments = summary["payments"]
    assert payments["keys_executed"] == payments["keys_sent"] > 0
    assert payments["answers"]["replayed"] > 0
    assert payments["answers"]["conflict"] > 0
    assert payments["answers"]["mismatch"] > 0
    outcomes = summary["gateway"]["gateway_idempotency_outcomes_total"]
    assert outcomes["executed"] == payments["upstream_charges"]


@pytest.mark.slow
def test_ratelimit_run_holds_every_key_to_its_rate(tmp_path: Path) -> None:
    """ratelimit: every key driven past its limit, allowed within burst + rate * elapsed."""
    summary = _run(tmp_path, "ratelimit", "3s")
    per_key = summary["ratelimit"]["per_key"]
    assert per_key
    assert all(k["denied"] > 0 and k["allowed"] <= k["bound"] for k in per_key.values())


class _LoadtestsUpstream(ServerProcess):
    """``loadtests/upstream.py`` under uvicorn, as the runner starts it."""

    name = "loadtests-upstream"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "uvicorn", "loadtests.upstream:create_app", "--factory",
                "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]

    def ready_url(self) -> str:
        return f"{self.url}/hello"


def test_the_probe_paces_its_charges_and_records_each(tmp_path: Path) -> None:
    """The probe against a real upstream: each client one charge per pacing period, every one a
    201 with its latency, and its keys exactly the ones the upstream ran, once each."""
    upstream = _LoadtestsUpstream(tmp_path).start()
    try:
        out = tmp_path / "probe.json"
        result = subprocess.run(
            [sys.executable, "-m", "loadtests.probe", "--url", upstream.url, "--seconds", "1.5",
             "--clients", "2", "--pacing", "0.1", "--out", str(out)],
            capture_output=True, text=True, cwd=REPO_ROOT, env=child_env(), check=False, timeout=60)
        assert result.returncode == 0, result.stderr
        with upstream.client() as client:
            ran = client.get("/_record").json()["executions"]
    finally:
        upstream.stop()
    probe = json.loads(out.read_text())
    samples = probe["samples"]
    assert 20 <= len(samples) <= 32
    assert {status for _, _, status, _ in samples} == {201}
    assert all(0 < ms < 1000 for _, ms, _, _ in samples)
    assert ran == dict.fromkeys(probe["keys"], 1)
    assert {key for *_, key in samples} == set(probe["keys"])
    for client in ("lt-probe-0-", "lt-probe-1-"):
        sent = sorted(t for t, _, _, key in samples if key.startswith(client))
        gaps = [b - a for a, b in itertools.pairwise(sent)]
        assert gaps
        assert min(gaps) >= 0.09, gaps  # paced, never faster


def test_the_probe_sends_only_to_the_loopback(tmp_path: Path) -> None:
    """Any target but http://127.0.0.1:PORT is refused before a request is made."""
    result = subprocess.run(
        [sys.executable, "-m", "loadtests.probe", "--url", "http://example.com:80", "--seconds", "1",
         "--out", str(tmp_path / "probe.json")],
        capture_output=True, text=True, cwd=REPO_ROOT, env=child_env(), check=False, timeout=60)
    assert result.returncode == 2
    assert "127.0.0.1" in result.stderr
    assert not (tmp_path / "probe.json").exists()


def test_autogroup_name_reads_a_named_group_and_names_the_root_one() -> None:
    """/proc/PID/autogroup is empty for a task in the root group (a run started from init's
    session, as CI may): that is a group its tasks share, not a kernel without autogroups."""
    assert autogroup_name("/autogroup-85 nice 0\n") == "/autogroup-85"
    assert autogroup_name("") == ROOT_AUTOGROUP
    assert autogroup_name("\n") == ROOT_AUTOGROUP != autogroup_name("/autogroup-1 nice 0")


@pytest.mark.slow
def test_overload_run_serves_every_critical_charge_and_sheds_the_flood(tmp_path: Path) -> None:
    """overload: both phases run, every critical charge is a 201 the upstream ran once, the flood
    gets 503 load-shed and no timeouts, RSS is sampled; the p99 ratio needs the full run."""
    summary = _run(tmp_path, "overload", "8s", users=40, may_fail=("critical: p99",),
                   extra=("--locust-nice", "10"))  # and under SCHED_IDLE: the scenario's default
    settings = summary["settings"]
    assert settings["locust_nice"] == 10
    assert settings["locust_nice_seen"] == 10  # Locust itself, read while it ran
    assert settings["locust_policy"] == settings["locust_policy_seen"] == "idle"
    assert "Locust at nice 10, Locust under SCHED_IDLE" in format_table(summary)
    if Path("/proc/self/autogroup").exists():  # a kernel that shares the CPU between sessions
        assert settings["locust_shares_autogroup"] is True  # so nice and policy rank Locust lower
    if len(os.sched_getaffinity(0)) >= 2 and shutil.which("taskset") is not None:
        # the scenario's default: the gateway alone on one CPU, everything else on the others,
        # as the kernel applied it to each running process
        assert settings["cpu_layout"] == "split"
        gateway_cpus, others = settings["cpus"]["gateway"], settings["cpus"]["others"]
        assert not set(gateway_cpus) & set(others)
        seen = settings["cpus_seen"]
        assert seen["gateway"] == gateway_cpus
        assert {name: seen[name] for name in ("redis", "upstream", "probe", "locust")} == dict.fromkeys(
            ("redis", "upstream", "probe", "locust"), others)
        assert f"the gateway alone on CPU {gateway_cpus[0]}" in format_table(summary)
    cpu = settings["cpu_while_locust_ran"]
    for name in ("gateway", "upstream", "probe", "locust"):
        assert 0.0 <= cpu[name]["runqueue_wait_s"] < 30.0, (name, cpu[name])
    assert "waited, runnable, for a CPU" in format_table(summary)
    overload = summary["overload"]
    assert overload["baseline_s"] == 2
    critical, probe = overload["critical"], overload["probe"]
    assert critical["unloaded"]["count"] > 0
    assert critical["flood"]["count"] > 0
    assert probe["unloaded"]["count"] > 0
    assert probe["flood"]["count"] > 0
    assert probe["answered_201"] == probe["sent"] > 0
    assert critical["answered_201"] + probe["answered_201"] == critical["upstream_charges"]
    flood = overload["sheddable"]
    assert flood["shed_503"] > 0
    assert flood["errors"] == 0
    assert overload["gateway_shed"]["local/default/shed"] == flood["shed_503"]
    assert overload["gateway_shed"]["local/critical/shed"] == 0
    assert summary["memory"]["samples"] > 5
