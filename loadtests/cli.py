"""``python -m loadtests run --scenario NAME --users N --duration 60s ...``: the runner's CLI.

``main(argv) -> int``: a bad option is exit 2 with one line naming it (no usage dump, no
traceback); an invariant that failed is exit 1; a run that could not be carried out (a process
that did not start, Locust that crashed or overstayed) is exit 3. SIGTERM is turned into the
same orderly stop as Ctrl-C, so the children are stopped whatever ends the runner.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import NoReturn

from loadtests.plan import SCENARIOS

__all__ = ["EXIT_USAGE", "MAX_DURATION_S", "MAX_USERS", "default_out", "main", "parse_duration"]

EXIT_USAGE = 2
MAX_DURATION_S = 3600  # a load test here is bounded: an hour at most
MAX_USERS = 5000
REPORTS = Path(__file__).resolve().parent / "reports"
_DURATION = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and no exit from inside."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def parse_duration(text: str) -> int:
    """Whole seconds from ``90``, ``60s``, ``2m``, ``1h30m``, ``1m30s``; 1 s to an hour."""
    text = text.strip()
    match = _DURATION.fullmatch(text)
    if text.isdigit():
        seconds = int(text)
    elif text and match:
        h, m, s = (int(g or 0) for g in match.groups())
        seconds = h * 3600 + m * 60 + s
    else:
        msg = f"expected a duration like 60s, 2m or 1m30s, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    if not 1 <= seconds <= MAX_DURATION_S:
        msg = f"expected a duration from 1s to {MAX_DURATION_S // 60}m, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return seconds


def _users(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_USERS:
        msg = f"expected a whole number of users from 1 to {MAX_USERS}, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return int(text)


def _spawn_rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        rate = -1.0
    if not 0 < rate <= 10_000:
        msg = f"expected users started per second, above 0 and at most 10000, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return rate


def _seed(text: str) -> int:
    if not re.fullmatch(r"-?\d{1,18}", text):
        msg = f"expected a whole number, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return int(text)


def _redis_url(text: str) -> str:
    if not re.fullmatch(r"(redis|rediss|unix)://\S+", text):
        msg = f"expected redis://HOST:PORT/DB, rediss://... or unix:///path, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return text


def _niceness(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 19:
        msg = f"expected a nice level from 0 to 19, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return int(text)


def _build_parser() -> _Parser:
    parser = _Parser(prog="python -m loadtests", description="Load tests of the gateway.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="start Redis, the upstream and the gateway, run a "
                                          "Locust scenario headless, write a report")
    run.add_argument("--scenario", required=True, choices=sorted(SCENARIOS),
                     help="what the users do")
    run.add_argument("--users", type=_users, default=10, help="concurrent Locust users (10)")
    run.add_argument("--duration", type=parse_duration, default=60,
                     help="how long Locust runs: 60s, 2m, 1m30s (60s)")
    run.add_argument("--spawn-rate", type=_spawn_rate, help="users started per second (all in 1 s)")
    run.add_argument("--redis-url", type=_redis_url,
                     help="use this Redis instead of starting one (keys under a prefix of the run's own)")
    run.add_argument("--out", type=Path, help="report folder (loadtests/reports/SCENARIO-UTCSTAMP/)")
    run.add_argument("--seed", type=_seed, default=1, help="seeds the users' choices (1)")
    run.add_argument("--locust-nice", type=_niceness, default=0, metavar="N",
                     help="run Locust (not the probe, gateway, upstream or Redis) at this nice "
                          "level, 0-19 (0): on a machine it shares with what it loads, the "
                          "generator then does not take their CPU, as other machines would not")
    run.add_argument("--locust-idle", action=argparse.BooleanOptionalAction,
                     help="run Locust under SCHED_IDLE, on the CPU time no other process wants: "
                          "the generator then yields the CPU at once, as other machines would "
                          "(the overload scenario's default; --no-locust-idle turns it off)")
    run.add_argument("--cpu-layout", choices=("shared", "split"),
                     help="shared: every process on every CPU; split: the gateway alone on one CPU, "
                          "Redis, the upstream, the probe and Locust on the others, as on their "
                          "own machines (the overload scenario's default; the others': shared)")
    return parser


def default_out(scenario: str, now: dt.datetime | None = None) -> Path:
    stamp = (now or dt.datetime.now(dt.UTC)).strftime("%Y%m%dT%H%M%SZ")
    out = REPORTS / f"{scenario}-{stamp}"
    n = 1
    while out.exists():
        n += 1
        out = REPORTS / f"{scenario}-{stamp}-{n}"
    return out


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through the runner's finally, which stops the children


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _build_parser().parse_args(argv)
    except _UsageError as exc:
        print(f"loadtests: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    least = SCENARIOS[args.scenario].min_users
    if args.users < least:
        print(f"loadtests: argument --users: the {args.scenario} scenario needs at least {least} users, "
              f"got {args.users}", file=sys.stderr)
        return EXIT_USAGE
    if args.out is not None and args.out.exists() and any(args.out.iterdir()):
        print(f"loadtests: argument --out: {str(args.out)!r} exists and is not empty", file=sys.stderr)
        return EXIT_USAGE
    from loadtests.runner import SPLIT_UNAVAILABLE, Options, run, split_cpus

    layout = args.cpu_layout or SCENARIOS[args.scenario].cpu_layout
    if layout == "split" and split_cpus(os.sched_getaffinity(0)) is None:
        if args.cpu_layout == "split":
            print(f"loadtests: argument --cpu-layout: {SPLIT_UNAVAILABLE}", file=sys.stderr)
            return EXIT_USAGE
        layout = "shared"  # the scenario's default, where it cannot be had; the report says which
    options = Options(scenario=args.scenario, users=args.users, duration_s=args.duration,
                      spawn_rate=args.spawn_rate or float(args.users), redis_url=args.redis_url,
                      out=args.out or default_out(args.scenario), seed=args.seed,
                      locust_nice=args.locust_nice,
                      locust_idle=(SCENARIOS[args.scenario].locust_idle if args.locust_idle is None
                                   else args.locust_idle),
                      cpu_layout=layout)
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        return run(options)
    except KeyboardInterrupt:
        print("loadtests: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
