"""The gateway's Prometheus metrics: one ``Metrics`` object per stack, its own registry.

No global state (DESIGN.md): each ``GatewayMiddleware`` builds its own ``Metrics`` on a private
``CollectorRegistry``, so two stacks in one process never collide. Under ``gateway serve
--workers N`` the CLI sets ``PROMETHEUS_MULTIPROC_DIR`` before any worker imports
prometheus_client; values then live in per-process files and ``exposition()`` sums them over the
workers (prometheus_client's multiprocess mode), so whichever worker answers a scrape reports
the whole server.

Label values are bounded: policy names come from the config, outcomes and decisions from fixed
sets, status codes from 100-599, store operations from the scripts. Children are bound once, and
the counters and histograms the hot path touches are tallies (``tallies.py``): a request adds
to plain numbers, folded into the children whenever the registry is read (and once a second
while the app runs, for the other workers' scrapes).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from gateway.store.breaker import BREAKER_STATES, BreakerState
from gateway.tallies import CounterTally, Tallies

__all__ = [
    "CONCURRENCY_DECISIONS",
    "CONTENT_TYPE",
    "IDEMPOTENCY_OUTCOMES",
    "RATELIMIT_DECISIONS",
    "REFUSAL_REASONS",
    "STORE_ERROR_KINDS",
    "STORE_OPERATIONS",
    "UPSTREAM_ERRORS",
    "Metrics",
    "multiprocess_dir",
]

#: The Prometheus text exposition format, version 0.0.4.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: shadow_deny: a shadow policy (mode = "shadow") that would have denied; the request was not refused for it
RATELIMIT_DECISIONS = ("allow", "deny", "error", "shadow_deny")
CONCURRENCY_DECISIONS = ("allow", "deny", "shadow_deny", "error")
IDEMPOTENCY_OUTCOMES = ("executed", "replayed", "in_flight", "mismatch", "invalid", "store_error")
STORE_OPERATIONS = (
    "ratelimit_take",
    "ratelimit_refund",
    "ratelimit_take_claim",
    "ratelimit_take_acquire",
    "idempotency_claim",
    "idempotency_complete",
    "idempotency_release",
    "idempotency_renew",
    "concurrency_acquire",
    "concurrency_release",
    "concurrency_renew",
    "ping",
)
UPSTREAM_ERRORS = ("unreachable", "timeout", "broken")
#: why a request was refused before any decision (gateway/request_check.py)
REFUSAL_REASONS = ("http_version", "host", "duplicate_header", "expect", "path")
#: timeout, no or broken connection, an error reply, refused by the open breaker without a call
STORE_ERROR_KINDS = ("timeout", "unavailable", "script", "circuit_open")

# a store call is sub-millisecond on loopback and bounded by store.timeout (100 ms by default)
_STORE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0)


def multiprocess_dir() -> str | None:
    """The multiprocess directory when prometheus_client runs in multiprocess mode."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """The metric families the contract names, plus latency histograms, with bound children."""

    def __init__(self, policies: Iterable[str] = (), concurrency_limits: Iterable[str] = ()) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        # first in the registry: any read of it folds the pending counts before the others show
        self.tallies = Tallies()
        reg.register(self.tallies)
        tallies = self.tallies
        self.requests = Counter(
            "gateway_requests", "HTTP requests through the gateway (not /_gateway/*), by status code.",
            ["code"], registry=reg,
        )
        self._decisions = Counter(
            "gateway_ratelimit_decisions",
            "Rate-limit decisions per matched policy: allow, deny, error when the store failed, "
            "shadow_deny when a shadow policy would have denied.",
            ["policy", "decision"], registry=reg,
        )
        self._concurrency_decisions = Counter(
            "gateway_concurrency_decisions",
            "Concurrency-limit decisions per matched limit: allow, deny, shadow_deny (a shadow "
            "limit that would have refused), or error when the store failed.",
            ["limit", "decision"], registry=reg,
        )
        # livesum: under --workers N, the slots every live worker holds
        self._concurrency_in_flight = Gauge(
            "gateway_concurrency_in_flight",
            "Requests holding a slot of each concurrency limit in this gateway (every worker's, summed).",
            ["limit"], multiprocess_mode="livesum", registry=reg,
        )
        self._shed = Counter(
            "gateway_shed",
            "Requests shed by a load shedder (local, fleet) per priority class: shed (503), "
            "shadow_shed (a shadow shedder would have shed it; it went on).",
            ["shedder", "priority", "decision"], registry=reg,
        )
        # liveall: each worker's own share (the local shedder is per process)
        self._shed_admitting = Gauge(
            "gateway_shed_admitting",
            "The share of each priority class the local load shedder lets through (1: all, 0: none).",
            ["priority"], multiprocess_mode="liveall", registry=reg,
        )
        outcomes = Counter(
            "gateway_idempotency_outcomes", "Keyed requests by what the idempotency layer did.",
            ["outcome"], registry=reg,
        )
        store_latency = Histogram(
            "gateway_store_latency_seconds", "Time of one store call, errors and timeouts included.",
            ["operation"], buckets=_STORE_BUCKETS, registry=reg,
        )
        upstream_latency = Histogram(
            "gateway_upstream_latency_seconds",
            "From handing a request to the upstream (the proxied service or the wrapped app) to "
            "its response start.",
            buckets=_LATENCY_BUCKETS, registry=reg,
        )
        added_latency = Histogram(
            "gateway_added_latency_seconds",
            "Time the gateway adds before a response starts: time to response start minus the "
            "upstream latency (all of it when the gateway answers itself).",
            buckets=_LATENCY_BUCKETS, registry=reg,
        )
        upstream_errors = Counter(
            "gateway_upstream_errors", "Proxied requests that got no whole answer from the upstream.",
            ["kind"], registry=reg,
        )
        store_errors = Counter(
            "gateway_store_errors", "Store calls that failed, by operation and kind (timeout, "
            "unavailable, script, circuit_open: refused by the open breaker without a call).",
            ["operation", "kind"], registry=reg,
        )
        # livesum: under --workers N, how many live workers are in each state
        self._breaker_state = Gauge(
            "gateway_store_breaker_state",
            "Store circuit breaker: 1 for the current state (closed, open, half_open), 0 otherwise.",
            ["state"], multiprocess_mode="livesum", registry=reg,
        )
        self._breaker_opened = Counter(
            "gateway_store_breaker_opened",
            "Times the store circuit breaker opened (a failed half-open probe opens it again).",
            registry=reg,
        )
        refused = Counter(
            "gateway_requests_refused",
            "Requests refused before any decision, as ambiguous: http_version, host, "
            "duplicate_header, expect, path.",
            ["reason"], registry=reg,
        )
        self.breaker_changed("closed")
        self.refused = {r: refused.labels(reason=r) for r in REFUSAL_REASONS}
        self.outcome = {o: tallies.counter(outcomes.labels(outcome=o)) for o in IDEMPOTENCY_OUTCOMES}
        self.store_error = {(op, kind): store_errors.labels(operation=op, kind=kind)
                            for op in STORE_OPERATIONS for kind in STORE_ERROR_KINDS}
        self.store_latency = {op: tallies.histogram(store_latency.labels(operation=op), _STORE_BUCKETS)
                              for op in STORE_OPERATIONS}
        self.upstream_latency = tallies.histogram(upstream_latency, _LATENCY_BUCKETS)
        self.added_latency = tallies.histogram(added_latency, _LATENCY_BUCKETS)
        self.upstream_error = {k: upstream_errors.labels(kind=k) for k in UPSTREAM_ERRORS}
        # status codes are bound on first use: at most 500 distinct children
        self._codes: dict[int, CounterTally] = {}
        self._counter_tallies: dict[tuple[object, ...], CounterTally] = {}
        for name in policies:
            for decision in RATELIMIT_DECISIONS:
                # exported at 0 from the start, so a rate() over a fresh series is defined
                self._decisions.labels(policy=name, decision=decision)
        for name in concurrency_limits:
            self._concurrency_in_flight.labels(limit=name).set(0)
            for decision in CONCURRENCY_DECISIONS:
                self._concurrency_decisions.labels(limit=name, decision=decision)

    def concurrency_decision(self, limit: str, decision: str) -> CounterTally:
        """The counter of one concurrency limit's decisions of one kind."""
        return self._bound(self._concurrency_decisions, limit=limit, decision=decision)

    def concurrency_in_flight(self, limit: str) -> Gauge:
        """The gauge of the requests holding a slot of one concurrency limit here."""
        return self._concurrency_in_flight.labels(limit=limit)

    def shed(self, shedder: str, priority: str, decision: str) -> CounterTally:
        """The counter of one shedder's decisions of one kind for one priority class (a tally:
        under a flood most requests are shed, and each one counts)."""
        return self._bound(self._shed, shedder=shedder, priority=priority, decision=decision)

    def shed_admitting(self, priority: str) -> Gauge:
        """The gauge of the share of one class the local shedder admits (set to 1 here)."""
        gauge = self._shed_admitting.labels(priority=priority)
        gauge.set(1)
        return gauge

    def decision(self, policy: str, decision: str) -> CounterTally:
        """The counter of one policy's decisions of one kind."""
        return self._bound(self._decisions, policy=policy, decision=decision)

    def _bound(self, family: Counter, **labels: str) -> CounterTally:
        """The one tally of a counter's child (bounded: the label values come from the config
        and fixed sets)."""
        key = (family, *labels.values())
        tally = self._counter_tallies.get(key)
        if tally is None:
            tally = self._counter_tallies[key] = self.tallies.counter(family.labels(**labels))
        return tally

    def breaker_changed(self, state: BreakerState) -> None:
        """Show the store breaker's new state (and count it when it opens)."""
        for name in BREAKER_STATES:
            self._breaker_state.labels(state=name).set(1 if name == state else 0)
        if state == "open":
            self._breaker_opened.inc()

    def count_response(self, status: int) -> None:
        """Count one response by its status code."""
        child = self._codes.get(status)
        if child is None:
            child = self._codes[status] = self.tallies.counter(self.requests.labels(code=str(status)))
        child.pending += 1

    def fold(self) -> None:
        """Fold the pending counts into the registry (on the event loop, before a scrape that
        renders in another thread)."""
        self.tallies.fold()

    def exposition(self) -> bytes:
        """The text a scrape gets: this process's registry, or every worker's in multiprocess mode.

        May run in a worker thread: call ``fold`` on the event loop first."""
        path = multiprocess_dir()
        if path is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
