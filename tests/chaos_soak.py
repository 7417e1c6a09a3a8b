"""Chaos soak: payments through two ``gateway serve`` on one AOF Redis while both gateways and
Redis are SIGKILLed and restarted, judged from the upstream's own records.

Why: each fault test breaks one thing at one chosen moment; this one overlaps the faults with
steady traffic and checks what a paying client relies on (README, "What a retry gets"): a
payment retried under its one Idempotency-Key runs at most once at the upstream, every payment
ends with an answer, and a 2xx a client was given is what every later retry replays, byte for
byte. Fault times, client start offsets and jitter all come from one seed, so a failing run
names the seed that reproduces its schedule. Bounded (~60 s on 2 cores) so CI runs it
(``tests/test_chaos_soak.py``); standalone::

    .venv/bin/python -m tests.chaos_soak --seed 123    # prints the summary; exit 0 PASS, 1 FAIL
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.redis_process import HOST, RedisProcess, redis_server_binary
from tests.serve_process import GatewayServe, Upstream, serve_config, wait_for

CLIENTS = 12
TRAFFIC_S = 35.0  # payments start only within this window; faults fall inside it
CLIENT_START_SPREAD_S = 1.5
PAYMENT_DEADLINE_S = 20.0  # a payment without a final answer by then has none: a failure
REQUEST_TIMEOUT_S = 15.0
UNKNOWN_RETRIES = 3  # a replayed outcome-unknown is asked again this often (a late outcome may land)
GATEWAY_KILLS_EACH = 2
REDIS_KILLS = 1
REDIS_DOWN_S = (0.8, 1.3)
FAULT_WINDOW_S = (2.5, TRAFFIC_S - 5.0)  # every fault and its restart inside the traffic window
COMPOUND_P = 0.5  # how often a gateway kill follows the Redis restart closely (see schedule)
COMPOUND_AFTER_S = (0.1, 0.8)
IN_FLIGHT_WAIT_S = 2.0  # before a kill, wait (at most this) for payments at the upstream through it
RESTART_DEADLINE_S = 30.0
SETTLE_DEADLINE_S = 10.0
JOIN_SLACK_S = 10.0
PAY_PATH = "/soak/pay"
AOF_ARGS = ("--appendonly", "yes", "--appendfsync", "always")
LOCK_TTL = "2s"
STORE_TIMEOUT = "1s"
DETAILED_KEYS = 25  # violations shown with every attempt; past this, by key only


# ------------------------------------------------------------------------------------ records
@dataclass
class Attempt:
    """One request of a payment (or its re-send) and what came back."""

    phase: str  # "pay" or "resend"
    gateway: int
    incarnation: int
    at_s: float  # since the traffic started
    took_s: float = 0.0
    status: int | None = None
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)  # the ones of interest
    error: str = ""

    @property
    def replayed(self) -> bool:
        return self.headers.get("idempotent-replayed") == "true"

    @property
    def kind(self) -> str:
        """transport | conflict | unknown (a replayed 5xx: a stored outcome) | retry (another
        5xx: nothing stored) | final (2xx, or 4xx other than 409)."""
        if self.status is None:
            return "transport"
        if self.status == 409:
            return "conflict"
        if self.status >= 500:
            return "unknown" if self.replayed else "retry"
        return "final"

    def line(self) -> str:
        where = f"gw{self.gateway}#{self.incarnation}"
        head = f"{self.phase:<6} t={self.at_s:6.2f}s +{self.took_s:5.2f}s {where}"
        if self.status is None:
            return f"{head} ERROR {self.error}"
        flags = " replayed" if self.replayed else ""
        rid = self.headers.get("x-request-id", "-")
        return f"{head} {self.status}{flags} rid={rid} body={self.body[:200]!r}"


@dataclass
class Payment:
    key: str
    client: int
    api_key: str
    body: bytes
    attempts: list[Attempt] = field(default_factory=list)
    final: Attempt | None = None
    gave_up: str = ""
    resend: Attempt | None = None

    def request_headers(self) -> dict[str, str]:
        return {"Idempotency-Key": self.key, "X-Api-Key": self.api_key,
                "Content-Type": "application/json"}


@dataclass(frozen=True)
class Fault:
    at_s: float  # since the traffic started
    target: str  # "gw0", "gw1" or "redis"
    follow_s: float | None = None  # instead of at_s: this long after the previous fault ended


@dataclass
class Violation:
    rule: int
    key: str
    what: str


RULES = {
    0: "the soak itself could not run as planned (a restart, a thread or a fault failed)",
    1: "a key executed more than once at the upstream",
    2: "a 2xx the client got is not what the re-send replays / what the upstream recorded",
    3: "a payment without a final answer",
    4: "a replayed outcome-unknown re-sent as neither the same 502 nor the upstream's response",
}


# ------------------------------------------------------------------------------------ the verdict
def recorded_body(record: dict[str, Any] | None) -> bytes | None:
    """The one body the upstream answered for a key (None when it never finished one)."""
    if not record or not record["bodies"]:
        return None
    return str(record["bodies"][0]).encode()


def judge(payments: list[Payment], records: dict[str, dict[str, Any]]) -> tuple[
        list[Violation], Counter[str]]:
    """The four rules, from the upstream's records; the violations and the counts to report."""
    out: list[Violation] = []
    counts: Counter[str] = Counter()
    keys = {p.key for p in payments}
    for key, rec in sorted(records.items()):
        if rec["started"] > 1:
            out.append(Violation(1, key, f"arrived {rec['started']} times, "
                                         f"answered {rec['finished']} times: {rec['bodies']}"))
        if key not in keys:
            out.append(Violation(1, key, "executed at the upstream but no client sent it"))
    for p in payments:
        record = records.get(p.key)
        upstream_body = recorded_body(record)
        final, resend = p.final, p.resend
        if final is None:
            out.append(Violation(3, p.key, f"no final answer: {p.gave_up}"))
            continue
        if resend is None:
            out.append(Violation(3, p.key, "final answer but no re-send was made"))
            continue
        got_2xx = [a for a in p.attempts if a.status is not None and 200 <= a.status < 300]
        if got_2xx:
            counts["final_2xx"] += 1
            bad = False
            for a in got_2xx:
                if resend.status != a.status or resend.body != a.body:
                    bad = True
                    out.append(Violation(2, p.key, f"the client got {a.status} {a.body!r} "
                                                   f"(t={a.at_s:.2f}s), the re-send got "
                                                   f"{resend.status} {resend.body[:200]!r}"))
                if a.body != upstream_body:
                    bad = True
                    out.append(Violation(2, p.key, f"the client got {a.body!r}, the upstream "
                                                   f"recorded {record and record['bodies']}"))
            counts["resent_matched"] += not bad
        elif final.kind == "unknown":
            counts["final_unknown"] += 1
            counts["unknown_executed"] += upstream_body is not None
            same = resend.status == final.status and resend.body == final.body
            late = (upstream_body is not None and resend.status == 200
                    and resend.body == upstream_body)
            if same or late:
                counts["resent_matched"] += 1
                counts["unknown_resolved_late"] += late
            else:
                out.append(Violation(4, p.key, f"final {final.status} {final.body[:120]!r}, "
                                               f"re-send {resend.status} {resend.body[:200]!r}, "
                                               f"upstream recorded {record and record['bodies']}"))
        else:
            counts["final_other"] += 1  # a 4xx: not judged by the rules, listed as a note
            counts["resent_matched"] += (resend.status, resend.body) == (final.status, final.body)
    counts["executed"] = sum(1 for r in records.values() if r["started"])
    counts["executions"] = sum(int(r["started"]) for r in records.values())
    return out, counts


# ------------------------------------------------------------------------------------ processes
class GatewaySlot:
    """One gateway port; each restart is a new process (an incarnation) on the same port."""

    def __init__(self, index: int, workdir: Path, config: dict[str, Any]) -> None:
        self.index = index
        self.workdir = workdir
        self.config = config
        self.incarnations: list[GatewayServe] = []
        self.current = self._new(port=None)
        self.port = self.current.port

    @property
    def incarnation(self) -> int:
        return len(self.incarnations) - 1

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def _new(self, port: int | None) -> GatewayServe:
        number = len(self.incarnations)
        process = GatewayServe(self.workdir / f"gw{self.index}-{number}", self.config, port=port)
        self.incarnations.append(process)
        return process

    def kill_and_restart(self, pause_s: float) -> float:
        """SIGKILL the serving process (by its PID), reap it, start a new one on the same port;
        the seconds the port was not serving."""
        old = self.current
        old.signal(signal.SIGKILL)
        killed_at = time.monotonic()
        old.wait_exit(timeout_s=5.0)
        old.stop()  # nothing left of its process group
        time.sleep(pause_s)
        self.current = self._new(port=self.port)
        self.current.launch()
        self.current.wait_ready(RESTART_DEADLINE_S)
        return time.monotonic() - killed_at

    def stop_all(self) -> None:
        for process in self.incarnations:
            process.stop()


def _get_json(url: str, timeout_s: float = 5.0) -> Any:
    with httpx.Client(timeout=timeout_s, trust_env=False) as client:
        response = client.get(url)
        response.raise_for_status()
        return response.json()


def _ready(url: str) -> bool:
    try:
        with httpx.Client(timeout=1.0, trust_env=False) as client:
            return client.get(f"{url}/_gateway/readyz").status_code == 200
    except httpx.HTTPError:
        return False


# ------------------------------------------------------------------------------------ the soak
@dataclass
class SoakResult:
    seed: int
    payments: list[Payment]
    records: dict[str, dict[str, Any]]
    violations: list[Violation]
    counts: Counter[str]
    faults: list[str]
    gateway_kills: int
    redis_kills: int
    duration_s: float = 0.0
    workdir: Path | None = None

    @property
    def passed(self) -> bool:
        return not self.violations

    def summary_line(self) -> str:
        c = self.counts
        attempts = [a for p in self.payments for a in p.attempts]
        kinds = Counter(a.kind for a in attempts)
        return (f"chaos-soak seed={self.seed} payments={len(self.payments)} "
                f"executed={c['executed']} executions={c['executions']} "
                f"final_2xx={c['final_2xx']} final_unknown={c['final_unknown']} "
                f"unknown_executed={c['unknown_executed']} "
                f"unknown_resolved_late={c['unknown_resolved_late']} final_other={c['final_other']} "
                f"resent_matched={c['resent_matched']} attempts={len(attempts)} "
                f"transport_errors={kinds['transport']} conflicts={kinds['conflict']} "
                f"unstored_5xx={kinds['retry']} unknown_replays={kinds['unknown']} "
                f"gateway_kills={self.gateway_kills} redis_kills={self.redis_kills} "
                f"duration={self.duration_s:.1f}s verdict={'PASS' if self.passed else 'FAIL'}")

    def details(self) -> str:
        """What went wrong, by rule and key, with every attempt of the keys involved."""
        lines = [f"chaos-soak seed={self.seed}: reproduce with CHAOS_SEED={self.seed} "
                 f"(or python -m tests.chaos_soak --seed {self.seed})"]
        if self.workdir is not None:
            lines.append(f"process logs: {self.workdir}")
        lines.append("faults: " + "; ".join(self.faults))
        answers = Counter(a.error.split(":", 1)[0] if a.status is None
                          else f"{a.status}{' replayed' if a.replayed else ''}"
                          for p in self.payments for a in p.attempts)
        lines.append("attempts by answer: " + ", ".join(f"{k}={n}" for k, n in answers.most_common()))
        by_key = {p.key: p for p in self.payments}
        for rule, text in RULES.items():
            found = [v for v in self.violations if v.rule == rule]
            if found:
                keys = sorted({v.key for v in found})
                lines.append(f"rule {rule} ({text}): {len(keys)} keys: {', '.join(keys)}")
        shown: set[str] = set()
        for v in self.violations:
            lines.append(f"  rule {v.rule} key={v.key}: {v.what}")
            payment = by_key.get(v.key)
            if payment is None or v.key in shown or len(shown) >= DETAILED_KEYS:
                continue
            shown.add(v.key)
            lines.append(f"    body={payment.body!r} upstream={self.records.get(v.key)}")
            lines.extend(f"    {a.line()}" for a in payment.attempts)
            if payment.resend is not None:
                lines.append(f"    {payment.resend.line()}")
        others = [p for p in self.payments if p.final is not None and p.final.kind == "final"
                  and not 200 <= (p.final.status or 0) < 300]
        for p in others[:DETAILED_KEYS]:  # not a rule, but worth a look
            assert p.final is not None
            lines.append(f"  note key={p.key}: final {p.final.line()}")
        return "\n".join(lines)


class Soak:
    """One soak run: start everything, run the traffic and the faults, re-send, judge, stop."""

    def __init__(self, seed: int, workdir: Path, *, clients: int = CLIENTS,
                 traffic_s: float = TRAFFIC_S) -> None:
        self.seed = seed
        self.workdir = workdir
        self.clients = clients
        self.traffic_s = traffic_s
        self.rng = random.Random(f"chaos-soak:{seed}")
        self.abort = threading.Event()
        self.errors: list[str] = []
        self.faults_done: list[str] = []
        self.gateway_kills = 0
        self.redis_kills = 0
        self.t0 = 0.0
        self.payments: list[list[Payment]] = [[] for _ in range(clients)]

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    # ----------------------------------------------------------------------------- schedule
    def schedule(self) -> list[Fault]:
        """The faults, one per equal slice of the fault window, each at a seeded point in it.

        In about half the seeds the gateway kill after the Redis kill is compounded with it: it
        comes ``COMPOUND_AFTER_S`` after Redis is back, while holders are still retrying the
        completions the outage failed."""
        targets = [f"gw{i}" for i in (0, 1) for _ in range(GATEWAY_KILLS_EACH)] + ["redis"] * REDIS_KILLS
        self.rng.shuffle(targets)
        lo, hi = FAULT_WINDOW_S
        hi = min(hi, self.traffic_s - 5.0)
        lo = min(lo, hi)
        span = (hi - lo) / len(targets)
        faults = [Fault(round(lo + (i + self.rng.uniform(0.1, 0.9)) * span, 2), target)
                  for i, target in enumerate(targets)]
        compound = self.rng.random() < COMPOUND_P
        follow = round(self.rng.uniform(*COMPOUND_AFTER_S), 2)
        redis_at = targets.index("redis")
        if compound and redis_at + 1 < len(faults):
            nxt = faults[redis_at + 1]
            faults[redis_at + 1] = Fault(nxt.at_s, nxt.target, follow_s=follow)
        return faults

    # ----------------------------------------------------------------------------- run
    def run(self) -> SoakResult:
        started = time.monotonic()
        redis = RedisProcess(args=AOF_ARGS)
        upstream = Upstream(self.workdir / "upstream")
        config = serve_config(upstream.url, redis.url, f"soak{self.seed}",
                              identity={"sources": ["header:x-api-key"]},
                              idempotency={"lock_ttl": LOCK_TTL},
                              # never reached: it makes each payment's admission the one store
                              # call that takes the bucket and claims the key (ratelimit_take_claim)
                              rate_limit=[{"name": "per-client", "limit": 1_000_000, "period": "1m"}])
        config["store"]["timeout"] = STORE_TIMEOUT
        slots = [GatewaySlot(i, self.workdir, config) for i in (0, 1)]
        threads: list[threading.Thread] = []
        try:
            redis.start()
            upstream.launch()
            for slot in slots:
                slot.current.launch()
            upstream.wait_ready()
            for slot in slots:
                slot.current.wait_ready()
            wait_for(lambda: all(_ready(s.url) for s in slots), "both gateways ready",
                     deadline_s=SETTLE_DEADLINE_S)
            faults = self.schedule()
            self.t0 = time.monotonic()
            fault_thread = threading.Thread(target=self._guarded, name="soak-faults",
                                            args=(self._run_faults, faults, slots, redis, upstream))
            threads.append(fault_thread)
            for i in range(self.clients):
                threads.append(threading.Thread(target=self._guarded, name=f"soak-client-{i}",
                                                args=(self._client, i, slots)))
            for thread in threads:
                thread.start()
            client_end = self.traffic_s + PAYMENT_DEADLINE_S + JOIN_SLACK_S
            self._join(threads[1:], client_end)
            self._join(threads[:1], client_end + RESTART_DEADLINE_S)
            try:
                self._settle(slots, upstream)
            except AssertionError as exc:  # judged anyway: the re-sends then show what is wrong
                self.errors.append(str(exc))
            self._resend(slots)
            records: dict[str, dict[str, Any]] = _get_json(f"{upstream.url}/soak/records")
        finally:
            self.abort.set()
            for thread in threads:
                thread.join(timeout=REQUEST_TIMEOUT_S + 5.0)
            with ExitStack() as stack:  # every stop runs, whichever of them raises
                stack.callback(redis.cleanup)
                stack.callback(upstream.stop)
                for slot in slots:
                    stack.callback(slot.stop_all)
        payments = [p for client in self.payments for p in client]
        violations, counts = judge(payments, records)
        planned = (2 * GATEWAY_KILLS_EACH, REDIS_KILLS)
        if (self.gateway_kills, self.redis_kills) != planned:
            self.errors.append(f"{self.gateway_kills} gateway and {self.redis_kills} Redis kills "
                               f"happened, {planned[0]} and {planned[1]} were planned")
        if self.errors:  # a failed restart or a crashed thread fails the soak, named as such
            violations.insert(0, Violation(0, "-", " | ".join(self.errors)))
        result = SoakResult(self.seed, payments, records, violations, counts, self.faults_done,
                            self.gateway_kills, self.redis_kills, workdir=self.workdir)
        result.duration_s = time.monotonic() - started
        return result

    def _guarded(self, target: Callable[..., None], *args: Any) -> None:
        """Run a thread's work; an exception stops the soak and is reported, not lost."""
        try:
            target(*args)
        except BaseException:
            self.errors.append(f"{threading.current_thread().name}: {traceback.format_exc()}")
            self.abort.set()

    def _join(self, threads: Iterable[threading.Thread], until_s: float) -> None:
        for thread in threads:
            thread.join(timeout=max(0.0, until_s - self.elapsed()))
            if thread.is_alive():
                self.errors.append(f"{thread.name} still running at t={self.elapsed():.1f}s")
                self.abort.set()

    # ----------------------------------------------------------------------------- faults
    def _run_faults(self, faults: list[Fault], slots: list[GatewaySlot], redis: RedisProcess,
                    upstream: Upstream) -> None:
        for fault in faults:
            wait = fault.follow_s if fault.follow_s is not None else fault.at_s - self.elapsed()
            if self.abort.wait(max(0.0, wait)):
                return
            if fault.target == "redis":
                self._wait_in_flight(upstream, None)
                at = self.elapsed()
                redis.kill()
                self.redis_kills += 1
                time.sleep(self.rng.uniform(*REDIS_DOWN_S))
                redis.start()
                self.faults_done.append(f"redis killed t={at:.2f}s, back after {self.elapsed() - at:.2f}s")
            else:
                slot = slots[int(fault.target[2:])]
                self._wait_in_flight(upstream, slot)
                at = self.elapsed()
                self.gateway_kills += 1
                down = slot.kill_and_restart(self.rng.uniform(0.0, 0.3))
                planned = (f"{fault.follow_s:.2f}s after the last fault" if fault.follow_s is not None
                           else f"planned {fault.at_s:.2f}s")
                self.faults_done.append(f"{fault.target} killed t={at:.2f}s ({planned}), "
                                        f"serving again after {down:.2f}s")

    def _wait_in_flight(self, upstream: Upstream, slot: GatewaySlot | None) -> None:
        """Wait (bounded) until payments are at the upstream, through ``slot`` if one is named,
        so the kill catches them mid-execution."""
        host = None if slot is None else f"{HOST}:{slot.port}"
        end = time.monotonic() + IN_FLIGHT_WAIT_S
        while time.monotonic() < end and not self.abort.is_set():
            try:
                in_flight: dict[str, int] = _get_json(f"{upstream.url}/soak/in-flight", 1.0)
            except httpx.HTTPError:
                in_flight = {}
            if (sum(in_flight.values()) >= 2) if host is None else in_flight.get(host, 0) >= 1:
                return
            time.sleep(0.02)

    # ----------------------------------------------------------------------------- clients
    @contextmanager
    def _clients(self, slots: list[GatewaySlot]) -> Iterator[list[httpx.Client]]:
        with ExitStack() as stack:
            yield [stack.enter_context(httpx.Client(base_url=s.url, timeout=REQUEST_TIMEOUT_S,
                                                    trust_env=False)) for s in slots]

    def _client(self, index: int, slots: list[GatewaySlot]) -> None:
        rng = random.Random(f"chaos-soak:{self.seed}:client:{index}")
        if self.abort.wait(rng.uniform(0.0, CLIENT_START_SPREAD_S)):
            return
        api_key = f"soak-client-{index}"
        with self._clients(slots) as clients:
            number = 0
            while self.elapsed() < self.traffic_s and not self.abort.is_set():
                key = f"pay-{self.seed}-c{index:02d}-{number:04d}"
                body = json.dumps({"payment": key, "amount": rng.randint(100, 99_999),
                                   "currency": "EUR"}, separators=(",", ":")).encode()
                payment = Payment(key, index, api_key, body)
                self.payments[index].append(payment)
                self._pay(payment, clients, slots, rng)
                number += 1

    def _pay(self, payment: Payment, clients: list[httpx.Client], slots: list[GatewaySlot],
             rng: random.Random) -> None:
        """Attempts under one key until a final answer, or the payment's deadline."""
        deadline = time.monotonic() + PAYMENT_DEADLINE_S
        unknowns: list[Attempt] = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0.05 or self.abort.is_set():
                if unknowns:  # asked again as often as time allowed: it stands
                    payment.final = unknowns[-1]
                else:
                    payment.gave_up = (f"no final answer after {len(payment.attempts)} attempts "
                                       f"in {PAYMENT_DEADLINE_S:g}s" if left <= 0.05 else "aborted")
                return
            gateway = rng.randrange(len(slots))
            attempt = self._send(clients[gateway], gateway, slots[gateway], payment, "pay",
                                 min(REQUEST_TIMEOUT_S, left))
            payment.attempts.append(attempt)
            kind = attempt.kind
            if kind == "final":
                payment.final = attempt
                return
            if kind == "unknown":
                unknowns.append(attempt)
                if len(unknowns) > UNKNOWN_RETRIES:
                    payment.final = attempt
                    return
                pause = rng.uniform(0.4, 0.6)
            elif kind == "conflict":
                pause = rng.uniform(0.15, 0.35)
            else:  # transport error, 503, a first-hand 502/504
                pause = rng.uniform(0.05, 0.25)
            self.abort.wait(min(pause, max(0.0, deadline - time.monotonic())))

    def _send(self, client: httpx.Client, gateway: int, slot: GatewaySlot, payment: Payment,
              phase: str, timeout_s: float) -> Attempt:
        attempt = Attempt(phase, gateway, slot.incarnation, self.elapsed())
        start = time.monotonic()
        try:
            response = client.post(PAY_PATH, content=payment.body, headers=payment.request_headers(),
                                   timeout=timeout_s)
        except httpx.HTTPError as exc:
            attempt.error = f"{type(exc).__name__}: {exc}"
        else:
            attempt.status = response.status_code
            attempt.body = response.content
            attempt.headers = {name: response.headers[name] for name in
                               ("idempotent-replayed", "x-request-id", "retry-after", "content-type")
                               if name in response.headers}
        attempt.took_s = time.monotonic() - start
        return attempt

    # ----------------------------------------------------------------------------- the end
    def _settle(self, slots: list[GatewaySlot], upstream: Upstream) -> None:
        """Both gateways ready on a live store, nothing left executing at the upstream."""
        if self.abort.is_set():
            return
        wait_for(lambda: all(_ready(s.url) for s in slots), "both gateways ready after the faults",
                 deadline_s=SETTLE_DEADLINE_S)
        wait_for(lambda: not _get_json(f"{upstream.url}/soak/in-flight", 1.0),
                 "the upstream to finish its executions", deadline_s=SETTLE_DEADLINE_S)

    def _resend(self, slots: list[GatewaySlot]) -> None:
        """Every payment with a final answer, once more (same key, same body), in parallel."""
        todo = [p for client in self.payments for p in client if p.final is not None]
        shares = [todo[i::self.clients] for i in range(self.clients)]

        def resend(share: list[Payment]) -> None:
            with self._clients(slots) as clients:
                for n, payment in enumerate(share):
                    gateway = n % len(slots)
                    payment.resend = self._send(clients[gateway], gateway, slots[gateway], payment,
                                                "resend", REQUEST_TIMEOUT_S)

        workers = [threading.Thread(target=self._guarded, name=f"soak-resend-{i}", args=(resend, share))
                   for i, share in enumerate(shares)]
        for worker in workers:
            worker.start()
        self._join(workers, self.elapsed() + REQUEST_TIMEOUT_S * 2)


def run_soak(seed: int, workdir: Path | None = None, *, clients: int = CLIENTS,
             traffic_s: float = TRAFFIC_S) -> SoakResult:
    """One soak; its processes' files in ``workdir`` (a temporary dir, removed on a pass)."""
    own = workdir is None
    where = Path(tempfile.mkdtemp(prefix="gw-soak-")) if workdir is None else workdir
    result = Soak(seed, where, clients=clients, traffic_s=traffic_s).run()
    if own and result.passed:
        shutil.rmtree(where, ignore_errors=True)
        result.workdir = None
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos_soak",
                                     description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=None, help="the run's seed (random when absent)")
    parser.add_argument("--clients", type=int, default=CLIENTS)
    parser.add_argument("--traffic", type=float, default=TRAFFIC_S, help="seconds of traffic")
    parser.add_argument("-v", "--verbose", action="store_true", help="print the faults as they happened")
    args = parser.parse_args(argv)
    if redis_server_binary() is None:
        print("chaos-soak: redis-server is not installed (apt-get install redis-server)", file=sys.stderr)
        return 1
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 1_000_000)
    result = run_soak(seed, clients=args.clients, traffic_s=args.traffic)
    if args.verbose or not result.passed:
        print(result.details())
    print(result.summary_line())
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
