"""Scale-out on a Redis Cluster: one gateway process vs two, same client load (issue 5).

A benchmark, not a test. It starts a 3-master Redis Cluster (``tests/redis_cluster.py``, loopback,
no persistence, no replicas) and gateway processes: uvicorn (uvloop, httptools, no access log)
serving ``GatewayMiddleware`` around a trivial ASGI app, store ``{url: <one node>, cluster: true}``,
two rate-limit policies with limits nothing reaches (a per-client one, and a global one whose
bucket lives on one master, so every request spans two slots and takes the parallel slot-group
path), idempotency on its defaults. Gateway A is pinned to CPU 0, gateway B to CPU 1.

Two workloads: ``GET /hello`` with an ``x-api-key`` cycling over ``--keys`` values (identities,
hence buckets, spread over all masters; rate limit only) and ``POST /charge`` with the same keys
and a unique ``Idempotency-Key`` per request (rate limit, then claim + complete). Each run is two
wrk processes at once (``-t1``, half of ``--connections`` each): in mode ``one`` both aim at A, in
mode ``two`` one aims at A and one at B, so the client side is identical and only the number of
gateway processes changes. Rounds interleave the modes (and alternate which goes first).
Mode ``redis`` is the comparison row: both wrk aim at gateway R (pinned to CPU 0, like A), the
same config on one plain ``redis-server`` (no cluster), so a request's gateway CPU on the cluster
can be set against the same request on one Redis, measured in the same run. With ``--apart``,
modes ``one-apart`` and ``redis-apart`` repeat ``one`` and ``redis`` with the Redis nodes and both
wrk pinned to CPU 1 for the run, so the measured gateway has CPU 0 to itself: whether 3 Redis
nodes (against 1) waking on the gateway's core is what makes the cluster cost it more.

The machine may have 2 cores (this one does): the Redis nodes and wrk are not pinned and compete
with the gateways. So every run records CPU time from /proc (utime + stime deltas) per gateway,
for the Redis nodes and (from the reaped children's rusage) for wrk, and the whole machine's busy
share from /proc/stat: whether a gateway was CPU-bound, and whether the machine was, shows there.

    .venv/bin/python -m loadtests.cluster_scaleout --seconds 10 --rounds 3

Writes loadtests/results/cluster-scaleout.md and .json (``--out STEM`` names other files).
Kills only the processes it started (also on Ctrl-C and SIGTERM) and removes its temp dirs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import os
import platform
import re
import resource
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from importlib.metadata import version
from pathlib import Path
from types import FrameType
from typing import Any

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

ROOT = Path(__file__).resolve().parent.parent
MODULE = "loadtests.cluster_scaleout"
HOST = "127.0.0.1"
CONFIG_ENV = "CLUSTER_SCALEOUT_CONFIG"  # the gateway's config, JSON, for the uvicorn child
# Buckets of BURST tokens refilled at LIMIT per hour: no request of the whole benchmark drains one
# (nothing is denied), and they refill slowly enough to stay in Redis like real ones do. A bucket
# that is full again expires; with a huge refill rate every bucket would be full within a
# millisecond, and every take would create a fresh key.
LIMIT, PERIOD, BURST = 1000, "1h", 100_000_000
MODES = ("one", "two", "redis")
# --apart: these modes too, ``one`` and ``redis`` again with the Redis nodes and wrk pinned to
# APART_CPU, the CPU the measured gateway is not on
APART = {"one-apart": "one", "redis-apart": "redis"}
APART_CPU = 1
HELLO = b'{"message":"hello"}'
CHARGE = b'{"charge":"ch_1","status":"succeeded"}'


def gateway_config(store_url: str, store_timeout: str, *, cluster: bool = True) -> dict[str, Any]:
    return {
        "store": {"url": store_url, "cluster": cluster, "timeout": store_timeout},
        "rate_limit": [
            {"name": "per-client", "limit": LIMIT, "period": PERIOD, "burst": BURST},
            {"name": "global", "limit": LIMIT, "period": PERIOD, "burst": BURST, "key": "global"},
        ],
        "idempotency": {"ttl": "10m"},  # the default 24 h would only keep the benchmark's records longer
    }


# ---------------------------------------------------------------- the gateway (uvicorn child)

async def endpoint(scope: Message, receive: Receive, send: Send) -> None:
    """GET /hello and POST /charge (body read, discarded): the cheapest app worth protecting."""
    if scope["type"] != "http":
        return
    more = scope["method"] == "POST"
    while more:
        message = await receive()
        more = message["type"] == "http.request" and message.get("more_body", False)
    status, body = (201, CHARGE) if scope["method"] == "POST" else (200, HELLO)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


def __getattr__(name: str) -> Any:
    """``gateway_app``: built on first access in the uvicorn child, so importing connects nowhere."""
    if name == "gateway_app":
        from gateway import GatewayMiddleware

        app = GatewayMiddleware(endpoint, json.loads(os.environ[CONFIG_ENV]))
        globals()[name] = app
        return app
    raise AttributeError(name)


# ---------------------------------------------------------------- wrk scripts

# Each wrk runs one thread; `init` gets: a prefix unique to this run and wrk, the number of
# distinct API keys, and where in the key cycle to start. Statuses >= 300 are counted per code.
WRK_COMMON = """
local n, i, prefix, threads = 1, 0, "x", {}
codes = {}  -- a global: done() reads it from each thread with thread:get
function setup(thread) table.insert(threads, thread) end
function init(args) prefix = args[1]; n = tonumber(args[2]); i = tonumber(args[3]) end
function response(status) if status >= 300 then codes[status] = (codes[status] or 0) + 1 end end
function done()
  for _, t in ipairs(threads) do
    for code, count in pairs(t:get("codes")) do io.write(string.format("STATUS %d %d\\n", code, count)) end
  end
end
"""
WRK_GET = WRK_COMMON + """
function request()
  i = i + 1
  return wrk.format("GET", "/hello", {["x-api-key"] = "client-" .. (i % n)})
end
"""
WRK_POST = WRK_COMMON + """
local body = '{"amount":100,"currency":"eur"}'
function request()
  i = i + 1
  return wrk.format("POST", "/charge", {["x-api-key"] = "client-" .. (i % n),
    ["Idempotency-Key"] = prefix .. "-" .. i, ["Content-Type"] = "application/json"}, body)
end
"""
WORKLOADS = {"GET /hello (rate limit)": "get.lua", "POST /charge (rate limit + idempotency)": "post.lua"}


# ---------------------------------------------------------------- the runner (parent process)

def call(port: int, method: str, path: str, headers: dict[str, str] | None = None,
         body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    import http.client

    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat (idle + iowait are not busy)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    total = sum(values[:8])  # guest time is already inside user
    return total - values[3] - values[4], total


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Gateway:
    """One uvicorn process serving ``gateway_app``, pinned to ``cpu``; stopped by its PID."""

    def __init__(self, name: str, cpu: int, tmp: Path, config: dict[str, Any]) -> None:
        with socket.socket() as s:
            s.bind((HOST, 0))
            self.port = int(s.getsockname()[1])
        self.name, self.cpu, self.log = name, cpu, tmp / f"gateway-{name}.log"
        argv = ["taskset", "-c", str(cpu), sys.executable, "-m", "uvicorn", f"{MODULE}:gateway_app",
                "--host", HOST, "--port", str(self.port), "--loop", "uvloop", "--http", "httptools",
                "--no-access-log", "--no-server-header", "--no-date-header", "--log-level", "warning"]
        env = {**os.environ, CONFIG_ENV: json.dumps(config)}
        for name_ in ("GATEWAY_STORE_URL", "GATEWAY_UPSTREAM_URL", "PROMETHEUS_MULTIPROC_DIR"):
            env.pop(name_, None)
        with self.log.open("wb") as log:  # taskset execs: the PID is uvicorn's
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                if call(self.port, "GET", "/_gateway/readyz")[0] == 200:
                    return
            time.sleep(0.05)
        msg = f"gateway {self.name} not ready in {timeout}s (exit {self.proc.poll()}): {self.log_tail()}"
        raise RuntimeError(msg)

    def log_tail(self, chars: int = 1500) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.proc.pid)

    def store_errors(self) -> dict[str, float]:
        """Counters that say something failed: store errors by operation, and error decisions."""
        from prometheus_client.parser import text_string_to_metric_families

        status, _, text = call(self.port, "GET", "/_gateway/metrics")
        if status != 200:
            msg = f"gateway {self.name}: /_gateway/metrics answered {status}"
            raise RuntimeError(msg)
        found: dict[str, float] = {}
        for family in text_string_to_metric_families(text.decode()):
            for sample in family.samples:
                if sample.name == "gateway_store_errors_total":
                    label = f"store_error:{sample.labels['operation']}:{sample.labels['kind']}"
                elif (sample.name == "gateway_ratelimit_decisions_total"
                      and sample.labels["decision"] != "allow"):
                    label = f"ratelimit:{sample.labels['decision']}"
                elif (sample.name == "gateway_idempotency_outcomes_total"
                      and sample.labels["outcome"] == "store_error"):
                    label = "idempotency:store_error"
                elif sample.name == "gateway_store_breaker_opened_total":
                    label = "breaker_opened"
                else:
                    continue
                found[label] = found.get(label, 0.0) + sample.value
        return found

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@contextlib.contextmanager
def interrupts_as_exceptions() -> Iterator[None]:
    """SIGTERM (and SIGHUP) raise like Ctrl-C does, so every `finally` below runs and stops our PIDs."""
    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def parse_wrk(out: str) -> dict[str, Any]:
    def find(pattern: str, default: str = "0") -> list[str]:
        match = re.search(pattern, out, re.MULTILINE)
        return list(match.groups()) if match else [default]

    def ms(pct: str) -> float:
        match = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.MULTILINE)
        if match is None:
            return float("nan")
        return float(match[1]) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[match[2]]

    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {"requests": int(find(r"(\d+) requests in")[0]), "p50_ms": ms("50"), "p99_ms": ms("99"),
            "sock_errors": sum(map(int, errors.groups())) if errors else 0,
            "non2xx": int(find(r"Non-2xx or 3xx responses: (\d+)")[0]),
            "statuses": {m[0]: int(m[1]) for m in re.findall(r"^STATUS (\d+) (\d+)$", out, re.MULTILINE)}}


def run_wrks(ports: list[int], script: Path, *, seconds: float, connections: int, keys: int,
             tag: str, cpu: int | None = None) -> list[dict[str, Any]]:
    """One wrk per port, all at once, each with ``connections`` connections (pinned to ``cpu``
    when given); killed if we stop early."""
    procs: list[subprocess.Popen[str]] = []
    try:
        for index, port in enumerate(ports):
            start_at = index * keys // len(ports)  # the two wrks walk the key cycle half a turn apart
            pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
            argv = [*pin, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script),
                    f"http://{HOST}:{port}", "--", f"{tag}-w{index}-{uuid.uuid4().hex[:8]}", str(keys),
                    str(start_at)]
            procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        results = []
        for port, proc in zip(ports, procs, strict=True):
            out, _ = proc.communicate(timeout=seconds + 30)
            if proc.returncode != 0:
                msg = f"wrk exited {proc.returncode}: {out[-1500:]}"
                raise RuntimeError(msg)
            results.append({"port": port, **parse_wrk(out)})
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


@contextlib.contextmanager
def pinned(pids: Iterable[int], cpu: int | None) -> Iterator[None]:
    """With ``cpu``, the processes ``pids`` run on that CPU alone until the block ends, then on
    every CPU again; without it, nothing changes."""
    if cpu is None:
        yield
        return
    pids, every = list(pids), os.sched_getaffinity(0)
    try:
        for pid in pids:
            os.sched_setaffinity(pid, {cpu})
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(pid, every)


def settle(pids: Iterable[int], timeout: float = 30.0) -> None:
    """Wait (bounded) until our processes are quiet: < 20 ms of CPU in 200 ms, all together."""
    pids = list(pids)
    deadline, last = time.monotonic() + timeout, -1.0
    while (now := sum(cpu_seconds(p) for p in pids)) - last > 0.02 and time.monotonic() < deadline:
        last = now
        time.sleep(0.2)


def verify_requests(gw: Gateway) -> None:
    """The gateway decides: both policies shown, a keyed POST runs once and replays."""
    status, headers, body = call(gw.port, "GET", "/hello", {"x-api-key": f"verify-{gw.name}"})
    policy = headers.get("ratelimit-policy", "")
    if status != 200 or body != HELLO or '"per-client"' not in policy or '"global"' not in policy:
        msg = f"gateway {gw.name}: GET /hello gave {status} {headers} {body!r}"
        raise RuntimeError(msg)
    keyed = {"x-api-key": "verify", "Idempotency-Key": f"verify-{gw.name}",
             "Content-Type": "application/json"}
    first = call(gw.port, "POST", "/charge", keyed, b"{}")
    again = call(gw.port, "POST", "/charge", keyed, b"{}")
    if first[0] != 201 or again[0] != 201 or again[1].get("idempotent-replayed") != "true" \
            or again[2] != first[2]:
        msg = f"gateway {gw.name}: keyed POST gave {first}, then {again}"
        raise RuntimeError(msg)


def verify(gateways: list[Gateway], cluster: Any) -> dict[str, Any]:
    """Both gateways decide on the cluster: both policies shown, a keyed POST runs once and replays,
    and the buckets sit on the masters their slots name. Returns where the global bucket lives."""
    from gateway.identity import GLOBAL_TAG
    from gateway.store.layout import KeyLayout

    for gw in gateways:
        verify_requests(gw)
    global_key = KeyLayout("gw").buckets([GLOBAL_TAG], [b"global"])[0]
    port = cluster.node_for_key(global_key).port
    if not cluster.node(port).call("EXISTS", global_key):
        msg = f"the global bucket {global_key!r} is not on master {port}, its slot's"
        raise RuntimeError(msg)
    return {"global_bucket_key": global_key.decode(), "global_bucket_master": port}


def busy_pct_over(seconds: float) -> float:
    """How busy the whole machine is now (100 = one core), over ``seconds``."""
    before = machine_busy()
    time.sleep(seconds)
    after = machine_busy()
    return 100 * (os.cpu_count() or 1) * (after[0] - before[0]) / max(1, after[1] - before[1])


def timed_run(ports: list[int], script: Path, *, gateways: list[Gateway], watched: dict[str, int],
              args: argparse.Namespace, tag: str, apart: int | None = None) -> dict[str, Any]:
    """One measured run: wrk on ``ports`` at once, with the CPU and the gateways' error counters
    it cost (deltas over the run). With ``apart``, the Redis nodes and wrk run on that CPU alone."""
    with pinned((p for k, p in watched.items() if k.startswith("redis")), apart):
        settle(watched.values())
        errors_before = [g.store_errors() for g in gateways]
        cpu_before = {k: cpu_seconds(p) for k, p in watched.items()}
        wrk_before, busy_before, start = children_cpu(), machine_busy(), time.monotonic()
        wrks = run_wrks(ports, script, seconds=args.seconds, connections=args.connections // 2,
                        keys=args.keys, tag=tag, cpu=apart)
        wall = time.monotonic() - start
        busy_after, wrk_cpu = machine_busy(), children_cpu() - wrk_before
        cpu = {k: cpu_seconds(p) - cpu_before[k] for k, p in watched.items()}
    errors = {}
    for gw, before in zip(gateways, errors_before, strict=True):
        for label, value in gw.store_errors().items():
            if value - before.get(label, 0.0):
                errors[f"{gw.name} {label}"] = value - before.get(label, 0.0)
    requests = sum(w["requests"] for w in wrks)
    statuses: dict[str, int] = {}
    for w in wrks:
        for code, count in w["statuses"].items():
            statuses[code] = statuses.get(code, 0) + count
    busy_share = (busy_after[0] - busy_before[0]) / max(1, busy_after[1] - busy_before[1])
    busy_s = (os.cpu_count() or 1) * wall * busy_share
    gateway_s = [cpu[f"gateway {g.name}"] for g in gateways]
    redis_s = sum(v for k, v in cpu.items() if k.startswith("redis"))
    per_req = 1e6 / max(1, requests)
    return {
        "wall_s": wall, "requests": requests, "rps": requests / args.seconds,
        "p50_ms": statistics.mean(w["p50_ms"] for w in wrks), "p99_ms": max(w["p99_ms"] for w in wrks),
        "non2xx": sum(w["non2xx"] for w in wrks), "statuses": statuses,
        "sock_errors": sum(w["sock_errors"] for w in wrks), "gateway_errors": errors,
        "cpu_pct": {k: 100 * v / wall for k, v in cpu.items()},
        "gateway_cpu_pct": [100 * v / wall for v in gateway_s],
        "gateway_cpu_us_per_req": sum(gateway_s) * per_req,
        "redis_cpu_pct": 100 * redis_s / wall, "redis_cpu_us_per_req": redis_s * per_req,
        "wrk_cpu_pct": 100 * wrk_cpu / wall, "wrk_cpu_us_per_req": wrk_cpu * per_req,
        "machine_busy_pct": 100 * busy_s / wall, "machine_cpu_us_per_req": busy_s * per_req,
        # not charged to our processes: kernel work (softirq), this runner, anyone else's
        "other_cpu_pct": 100 * (busy_s - sum(cpu.values()) - wrk_cpu) / wall,
        "per_wrk": wrks,
    }


def measure(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from tests.redis_cluster import RedisCluster
    from tests.redis_process import RedisProcess

    runs: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    cluster: RedisCluster | None = None
    single: RedisProcess | None = None
    gateways: list[Gateway] = []
    with tempfile.TemporaryDirectory(prefix="cluster-scaleout-") as tmp_name, interrupts_as_exceptions():
        tmp = Path(tmp_name)
        scripts = {"get.lua": tmp / "get.lua", "post.lua": tmp / "post.lua"}
        scripts["get.lua"].write_text(WRK_GET)
        scripts["post.lua"].write_text(WRK_POST)
        try:
            info["busy_before_start_pct"] = busy_pct_over(2.0)
            print(f"machine busy before starting anything: {info['busy_before_start_pct']:.0f}% "
                  f"(of {100 * (os.cpu_count() or 1)})", flush=True)
            cluster = RedisCluster(masters=3, replicas=0).start()
            masters = cluster.masters()
            info["masters"] = [m.port for m in masters]
            print(f"cluster up in {cluster.startup_s:.1f} s: masters {info['masters']}", flush=True)
            single = RedisProcess().start()
            config = gateway_config(cluster.url, args.store_timeout)
            gateways = [Gateway("A", 0, tmp, config), Gateway("B", 1, tmp, config),
                        Gateway("R", 0, tmp, gateway_config(single.url, args.store_timeout, cluster=False))]
            for gw in gateways:
                gw.wait_ready()
            info.update(verify(gateways[:2], cluster))
            verify_requests(gateways[2])
            targets = {"one": [gateways[0].port] * 2, "two": [g.port for g in gateways[:2]],
                       "redis": [gateways[2].port] * 2}
            targets.update({apart: targets[mode] for apart, mode in APART.items()})
            assert single.pid is not None
            watched = {**{f"gateway {g.name}": g.proc.pid for g in gateways},
                       **{f"redis {n.port}": n.pid for n in cluster.nodes},
                       f"redis {single.port}": single.pid}
            print(f"verified; global bucket on master {info['global_bucket_master']}; warming up "
                  f"({args.warmup} s per workload and mode)", flush=True)
            modes = (*MODES, *APART) if args.apart else MODES
            for script, mode in itertools.product(WORKLOADS.values(), modes):
                run_wrks(targets[mode], scripts[script], seconds=args.warmup,
                         connections=args.connections // 2, keys=args.keys, tag="warm")
            for rnd, (workload, script) in itertools.product(range(1, args.rounds + 1), WORKLOADS.items()):
                for mode in (modes if rnd % 2 else modes[::-1]):
                    measured = timed_run(targets[mode], scripts[script], gateways=gateways, watched=watched,
                                         args=args, tag=f"r{rnd}-{mode}",
                                         apart=APART_CPU if mode in APART else None)
                    run = {"round": rnd, "workload": workload, "mode": mode, **measured}
                    runs.append(run)
                    print(f"round {rnd} {workload:40} {mode}: {run['rps']:7,.0f} rps"
                          f"  p99 {run['p99_ms']:6.1f} ms"
                          f"  gateway CPU % {' + '.join(f'{c:.0f}' for c in run['gateway_cpu_pct'])}"
                          f"  redis {run['redis_cpu_pct']:.0f}%  wrk {run['wrk_cpu_pct']:.0f}%"
                          f"  machine {run['machine_busy_pct']:.0f}% (other {run['other_cpu_pct']:.0f}%)"
                          f"  non-2xx {run['non2xx']}  gateway error counters {run['gateway_errors'] or 0}",
                          flush=True)
            info["keys_per_master"] = {m.port: int(m.call("DBSIZE")) for m in masters}
            info["gateway_log_tails"] = {g.name: g.log_tail(3000) for g in gateways}
        finally:
            for gw in gateways:
                gw.stop()
            if cluster is not None:
                cluster.cleanup()
            if single is not None:
                single.cleanup()
    return runs, info


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    one = {(r["round"], r["workload"]): r["rps"] for r in runs if r["mode"] == "one"}
    rows = []
    modes = dict.fromkeys(r["mode"] for r in runs)
    for workload, mode in itertools.product(dict.fromkeys(r["workload"] for r in runs), modes):
        mine = [r for r in runs if (r["workload"], r["mode"]) == (workload, mode)]
        row: dict[str, Any] = {
            "workload": workload, "mode": mode, "rps": [r["rps"] for r in mine],
            "ratio_to_one": [r["rps"] / one[r["round"], workload] for r in mine],
            "non2xx": sum(r["non2xx"] for r in mine), "sock_errors": sum(r["sock_errors"] for r in mine),
            "statuses": {}, "gateway_errors": {},
        }
        for r in mine:
            for code, count in r["statuses"].items():
                row["statuses"][code] = row["statuses"].get(code, 0) + count
            for named, count in r["gateway_errors"].items():  # "A store_error:..." -> summed over A, B
                label = named.split(" ", 1)[1]
                row["gateway_errors"][label] = row["gateway_errors"].get(label, 0) + count
        for key in ("rps", "ratio_to_one"):
            row[key + "_median"] = statistics.median(row[key])
        for key in ("p50_ms", "p99_ms", "gateway_cpu_us_per_req", "redis_cpu_pct", "redis_cpu_us_per_req",
                    "wrk_cpu_pct", "wrk_cpu_us_per_req", "machine_busy_pct", "machine_cpu_us_per_req",
                    "other_cpu_pct"):
            row[key + "_median"] = statistics.median(r[key] for r in mine)
        row["redis_node_cpu_pct_median"] = {
            int(k.split()[1]): statistics.median(r["cpu_pct"][k] for r in mine)
            for k in mine[0]["cpu_pct"] if k.startswith("redis ")}
        row["gateway_cpu_pct_median"] = [statistics.median(r["gateway_cpu_pct"][i] for r in mine)
                                         for i in range(len(mine[0]["gateway_cpu_pct"]))]
        rows.append(row)
    return rows


def machine() -> str:
    model = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    model_name = re.search(r"^Model name:\s*(.*)$", lscpu, re.MULTILINE)
    name = model_name[1] if model_name else model[1] if model else "?"
    return f"{name}, {os.cpu_count()} cores"


def versions() -> str:
    redis_server = subprocess.run(["redis-server", "--version"], capture_output=True, text=True,
                                  check=False).stdout
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False).stdout
    server = re.search(r"v=(\S+)", redis_server)
    wrk_version = re.search(r"wrk (\S+)", wrk)
    libs = ", ".join(f"{p} {version(p)}" for p in ("redis", "uvicorn", "uvloop", "httptools"))
    return (f"Python {platform.python_version()}, {libs}, redis-server {server[1] if server else '?'}, "
            f"wrk {wrk_version[1] if wrk_version else '?'}")


def render(rows: list[dict[str, Any]], info: dict[str, Any], command: str, args: argparse.Namespace) -> str:
    when = f"{dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}"
    half, cores = args.connections // 2, os.cpu_count() or 1
    lines = [
        "# Scale-out on a Redis Cluster: one gateway process vs two", "",
        f"Generated by `{command}` on {when} ({machine()}; {versions()}).", "",
        f"**{cores} cores for everything**: the gateways (A pinned to CPU 0, B to CPU 1), the 3 "
        "Redis masters and the 2 wrk processes (not pinned) all share them, so this measures how far a "
        "second process helps on this box, not how a gateway scales on dedicated cores.", "",
        f"Cluster: 3 masters, no replicas, loopback, no persistence. Gateway: uvicorn (uvloop, httptools, "
        "no access log) serving `GatewayMiddleware` around a trivial ASGI app, store `cluster = true`, "
        f"`timeout = \"{args.store_timeout}\"`, other store settings default (`max_connections = 64`, "
        f"breaker 5 failures / 1s); policies `per-client` and `global` (key `global`), both "
        f"{LIMIT}/{PERIOD} with burst {BURST:,}: nothing is denied, and the buckets stay in Redis as real "
        "ones do. Every request spans two slots (its client's and the global bucket's, on master "
        f"{info['global_bucket_master']}): two EVALSHAs in parallel. Idempotency on its defaults "
        "(ttl 10m).", "",
        f"Load: two wrk processes at once, each `-t1 -c{half} -d{args.seconds}s` ({args.connections} "
        f"connections in all), `x-api-key` cycling over {args.keys:,} values; mode `one`: both wrk on "
        "gateway A; mode `two`: one on A, one on B; mode `redis` (the comparison): both wrk on "
        "gateway R (CPU 0), the same config on one plain redis-server (no cluster, same run)"
        + ("; modes `one-apart` and `redis-apart` (`--apart`): `one` and `redis` again with the Redis "
           f"nodes and both wrk pinned to CPU {APART_CPU} (the gateway's core its own). "
           if args.apart else ". ") +
        "POST: a unique `Idempotency-Key` per request "
        f"(claim, then complete). {args.warmup} s warm-up per workload and mode, then {args.rounds} "
        "rounds, the modes interleaved (alternating which goes first). Medians over rounds; the ratio "
        "is two / one within each round.", "",
        "CPU % is CPU time / wall time (100 = one core): per gateway process (A, B), the 3 Redis nodes "
        f"together, both wrk, and the whole machine (/proc/stat busy time, out of {100 * cores}). CPU "
        "µs/req: the same CPU time per request served (machine: everything, kernel networking included). "
        "Other: machine busy time not charged to the gateways, Redis or wrk (kernel softirq work for "
        "loopback traffic, this runner, anything else running; before the cluster started the machine "
        f"was {info['busy_before_start_pct']:.0f} % busy over 2 s). "
        "Errors: wrk's non-2xx responses (by status) and socket errors; the gateways' own counters "
        "(/_gateway/metrics: store errors by operation and kind, rate-limit `error` decisions, breaker "
        "openings), all rounds.", "",
        "| workload | processes | rps median (min-max) | two / one, median (min-max) | p50 ms | p99 ms "
        "| gateway CPU % (A, B) | Redis CPU % | wrk CPU % | machine busy % (other) "
        "| CPU µs/req: gateway, Redis, wrk, machine | non-2xx | socket errors | gateway error counters |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        med = {k[:-7]: v for k, v in r.items() if k.endswith("_median")}
        ratio = "—" if r["mode"] != "two" else \
            f"{med['ratio_to_one']:.2f} ({min(r['ratio_to_one']):.2f}-{max(r['ratio_to_one']):.2f})"
        used = {"one": med["gateway_cpu_pct"][:1], "two": med["gateway_cpu_pct"][:2],
                "redis": med["gateway_cpu_pct"][2:3]}[APART.get(r["mode"], r["mode"])]
        statuses = ", ".join(f"{c}: {n}" for c, n in sorted(r["statuses"].items()))
        counters = ", ".join(f"{label} {n:.0f}" for label, n in sorted(r["gateway_errors"].items())) or "0"
        lines.append(
            f"| {r['workload']} | {r['mode']} "
            f"| {med['rps']:,.0f} ({min(r['rps']):,.0f}-{max(r['rps']):,.0f}) "
            f"| {ratio} | {med['p50_ms']:.1f} | {med['p99_ms']:.1f} | {', '.join(f'{c:.0f}' for c in used)} "
            f"| {med['redis_cpu_pct']:.0f} | {med['wrk_cpu_pct']:.0f} "
            f"| {med['machine_busy_pct']:.0f} ({med['other_cpu_pct']:.0f}) "
            f"| {med['gateway_cpu_us_per_req']:.0f}, {med['redis_cpu_us_per_req']:.0f}, "
            f"{med['wrk_cpu_us_per_req']:.0f}, {med['machine_cpu_us_per_req']:.0f} "
            f"| {r['non2xx']}{f' ({statuses})' if statuses else ''} | {r['sock_errors']} | {counters} |")
    keys = ", ".join(f"{port}: {count:,}" for port, count in info["keys_per_master"].items())
    lines += ["", f"Keys per master at the end (buckets + idempotency records): {keys}.", ""]
    for workload in dict.fromkeys(r["workload"] for r in rows):
        mine = {r["mode"]: r for r in rows if r["workload"] == workload}
        one, two, single = mine["one"], mine["two"], mine["redis"]
        alone = one["gateway_cpu_pct_median"][0]
        med2 = {k[:-7]: v for k, v in two.items() if k.endswith("_median")}
        other_us = med2["machine_cpu_us_per_req"] - med2["gateway_cpu_us_per_req"] \
            - med2["redis_cpu_us_per_req"] - med2["wrk_cpu_us_per_req"]
        # one process is bound by its core: 1 / gateway µs; two by the machine: cores / machine µs
        bound = cores * one["gateway_cpu_us_per_req_median"] / med2["machine_cpu_us_per_req"]
        nodes = {port: pct for port, pct in med2["redis_node_cpu_pct"].items() if port in info["masters"]}
        global_port = info["global_bucket_master"]
        verdict = "CPU-bound, the gateway process was the limit" if alone >= 90 else \
            "not CPU-bound, something else limited it"
        lines.append(
            f"- {workload}: **two / one = {med2['ratio_to_one']:.2f}**. One process: gateway A used "
            f"{alone:.0f} % of its core while the machine was {one['machine_busy_pct_median']:.0f} % busy: "
            f"{verdict}. Two: the machine was {med2['machine_busy_pct']:.0f} % busy (of {100 * cores}), "
            "the gateways got "
            f"{' and '.join(f'{c:.0f} %' for c in med2['gateway_cpu_pct'][:2])} of a core; each request cost "
            f"{med2['machine_cpu_us_per_req']:.0f} µs of machine CPU: gateway "
            f"{med2['gateway_cpu_us_per_req']:.0f}, Redis {med2['redis_cpu_us_per_req']:.0f}, wrk "
            f"{med2['wrk_cpu_us_per_req']:.0f}, other {other_us:.0f}. A saturated machine bounds the ratio "
            f"by {cores} x gateway µs (alone) / machine µs (two) = {bound:.2f}. Redis per master (two): "
            + ", ".join(f"{port}{' (global bucket)' if port == global_port else ''} {pct:.0f} %"
                        for port, pct in sorted(nodes.items())) + ".")
        apart = (f", the Redis nodes and wrk on CPU {APART_CPU} (modes `one-apart`, `redis-apart`: the "
                 "gateway's core its own)")
        for on_cluster, on_one, where in ((one, single, ""),
                                          (mine.get("one-apart"), mine.get("redis-apart"), apart)):
            if on_cluster is None or on_one is None:
                continue  # no --apart
            cluster_us = on_cluster["gateway_cpu_us_per_req_median"]
            single_us = on_one["gateway_cpu_us_per_req_median"]
            lines.append(
                f"- {workload}, cluster vs one Redis{where}: gateway CPU per request {cluster_us:.0f} µs "
                f"on the cluster (one process) against {single_us:.0f} µs on one Redis: "
                f"**{cluster_us / single_us:.2f}x**; "
                f"rps {on_cluster['rps_median']:,.0f} against {on_one['rps_median']:,.0f}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="seconds per timed run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2, help="seconds of warm-up per workload and mode")
    parser.add_argument("--connections", type=int, default=64, help="in all (split over two wrk)")
    parser.add_argument("--keys", type=int, default=10_000, help="distinct x-api-key values")
    parser.add_argument("--apart", action="store_true",
                        help=f"also modes one-apart and redis-apart (Redis nodes and wrk on CPU {APART_CPU})")
    parser.add_argument("--store-timeout", default="100ms", help="store.timeout (the default is 100ms)")
    parser.add_argument("--out", default="loadtests/results/cluster-scaleout",
                        help="results path without suffix (.md and .json are written)")
    args = parser.parse_args()
    if args.connections < 2 or args.connections % 2:
        parser.error("--connections must be even (it is split over two wrk processes)")
    command = shlex.join([".venv/bin/python", "-m", MODULE, *sys.argv[1:]])
    runs, info = measure(args)
    rows = summarize(runs)
    print(table := render(rows, info, command, args))
    out = Path(args.out) if Path(args.out).is_absolute() else ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table)
    out.with_suffix(".json").write_text(json.dumps(
        {"command": command, "machine": machine(), "versions": versions(), "args": vars(args),
         "cluster": info, "summary": rows, "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
