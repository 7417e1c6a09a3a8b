"""Instructions per request through ``GatewayMiddleware``, in-process, counted by valgrind.

A benchmark, not a test. Wall-clock and CPU-time figures move by 10 % and more on a shared
2-core machine, and between machines of one kind; the number of instructions a request costs
does not (callgrind counts them, whatever else runs). Each figure is the difference between a
run of ``--small`` and one of ``--large`` requests (same warm-up, same start-up), divided by the
difference: what one more request costs, start-up and imports taken out.

The config is the cluster benchmark's (``cluster_scaleout.gateway_config``: a per-client and a
``global`` policy that never deny, idempotency on its defaults; ``--one-policy`` keeps the
per-client one only), around ``loadtests.inprocess``'s trivial app, driven by its driver without
HTTP: 32 at a time, ``x-api-key`` cycling over 1,000 clients. ``--store redis`` starts a
redis-server of its own; ``--store cluster`` a 3-master Redis Cluster (``tests/redis_cluster.py``),
where every request's two buckets sit in two slots. Workloads: ``get`` (the rate limit) and
``post`` (a new Idempotency-Key each: take and claim in one call, then the completion).

    .venv/bin/python -m loadtests.instructions --store redis --store cluster --workload get

Needs ``valgrind``. Stops what it started, by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONCURRENCY = 32
WARMUP = 2048
CLIENTS = 1000  # x-api-key values: the per-client buckets spread over a cluster's slots


@dataclass(frozen=True)
class Case:
    """What is counted: the store (its URL, a cluster or not), the workload, the policies."""

    url: str
    cluster: bool
    workload: str
    one_policy: bool


# ---------------------------------------------------------------- the driven process

async def _drive(case: Case, requests: int, run: str) -> None:
    """``requests`` requests after a warm-up, through ``loadtests.inprocess``'s driver."""
    from gateway import GatewayMiddleware
    from loadtests.cluster_scaleout import gateway_config
    from loadtests.inprocess import Driver, endpoint

    config = gateway_config(case.url, "30s", cluster=case.cluster)  # valgrind is slow: no timeouts
    config["store"]["key_prefix"] = f"instr-{run}"  # each run's own buckets and records
    if case.one_policy:
        config["rate_limit"] = config["rate_limit"][:1]
    driver = Driver(GatewayMiddleware(endpoint, config), case.workload == "post", clients=CLIENTS)
    lifespan = await driver.start()
    try:
        await driver.burst(WARMUP, CONCURRENCY)
        await driver.burst(requests, CONCURRENCY)
    finally:
        await driver.stop(lifespan)


# ---------------------------------------------------------------- the runner

def _collected(log: str) -> int:
    match = re.search(r"Collected : (\d+)", log)
    if match is None:
        msg = f"callgrind printed no total:\n{log[-2000:]}"
        raise RuntimeError(msg)
    return int(match.group(1))


def _count(case: Case, requests: int, run: str) -> int:
    with tempfile.TemporaryDirectory(prefix="gw-instr-") as tmp:
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/out",
                   sys.executable, "-m", "loadtests.instructions", "--drive", case.url,
                   "--workload", case.workload, "--requests", str(requests), "--run", run]
        if case.cluster:
            command.append("--cluster")
        if case.one_policy:
            command.append("--one-policy")
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1800, check=False)
        if done.returncode != 0:
            msg = f"the driven run failed ({done.returncode}):\n{done.stderr[-3000:]}"
            raise RuntimeError(msg)
        return _collected(done.stderr)


def _per_request(case: Case, small: int, large: int) -> float:
    low = _count(case, small, "s")
    high = _count(case, large, "large")
    return (high - low) / (large - small)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.instructions",
                                     description="Instructions per request, counted by valgrind.")
    parser.add_argument("--store", action="append", choices=("redis", "cluster"),
                        help="redis, cluster, or both (repeat the option); redis when not given")
    parser.add_argument("--workload", action="append", choices=("get", "post"), help="get when not given")
    parser.add_argument("--small", type=int, default=1024)
    parser.add_argument("--large", type=int, default=5120)
    parser.add_argument("--one-policy", action="store_true", help="the per-client policy alone")
    # the driven process (run under valgrind by this runner)
    parser.add_argument("--drive", help=argparse.SUPPRESS)
    parser.add_argument("--cluster", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--run", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive:
        case = Case(args.drive, args.cluster, args.workload[0], args.one_policy)
        try:
            import uvloop
        except ImportError:  # the asyncio loop then: counts differ from a uvloop run's
            asyncio.run(_drive(case, args.requests, args.run))
        else:
            uvloop.run(_drive(case, args.requests, args.run))
        return 0
    if shutil.which("valgrind") is None:
        print("loadtests.instructions: valgrind is needed (apt-get install valgrind)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    from loadtests.cluster_scaleout import interrupts_as_exceptions

    with interrupts_as_exceptions():  # SIGTERM too runs the finally that stops our servers
        _print_counts(args.store or ["redis"], args.workload or ["get"], args)
    return 0


def _print_counts(stores: list[str], workloads: list[str], args: argparse.Namespace) -> None:
    """Start the stores asked for, print each workload's count on each, stop them (by PID)."""
    from tests.redis_cluster import RedisCluster
    from tests.redis_process import RedisProcess

    started: list[Any] = []
    try:
        urls: dict[str, str] = {}
        if "redis" in stores:
            server = RedisProcess()
            started.append(server)
            server.start()
            urls["redis"] = server.url
        if "cluster" in stores:
            nodes = RedisCluster(3)
            started.append(nodes)
            nodes.start()
            urls["cluster"] = f"redis://{nodes.nodes[0].address}"
        policies = "the per-client policy" if args.one_policy else "per-client + global policies"
        for workload in workloads:
            for store in stores:
                case = Case(urls[store], store == "cluster", workload, args.one_policy)
                per = _per_request(case, args.small, args.large)
                print(f"{workload:4} {store:7} ({policies}): {per / 1000:,.1f}k instructions per request",
                      flush=True)
    finally:
        for thing in reversed(started):
            thing.cleanup()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")  # the driven runs hash alike
    raise SystemExit(main())
