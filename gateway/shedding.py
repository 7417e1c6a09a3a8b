"""LoadSheddingMiddleware: when capacity runs short, shed the least critical requests first.

Stripe's two load shedders ("Scaling your API with rate limiters"), behind ``[[priority]]``
classes listed from the most critical to the most sheddable (a request is in the first class it
matches; one that matches none is in ``shedding.default_class``, ``"default"``: last):

* **local** (``[shedding.local]``, no store call): this process's own in-flight requests and
  event-loop lag, sampled every ``TICK_S``. While either is over its threshold, one more class
  is shed per tick, the most sheddable first; once both are well under (``CALM``), the most
  critical class still shed is let back a ``LET_BACK_STEP`` share per tick (admitted at random
  at that share), so a recovering process is not flooded at once. Past ``max_in_flight`` every
  class but the most critical is shed at once, between ticks. The most critical class is never
  shed locally, unless it is the only class.
* **fleet** (``[shedding.fleet]``): one budget of requests in flight across every gateway
  process, counted in the store (a ``concurrency_acquire`` on one global slot set, its slot held
  as a concurrency limit's is, ``slots.py``). A class may fill it up to ``limit`` minus the
  ``reserve`` shares of the classes above it, so the most critical class always finds room.

A shed request gets ``503`` problem+json (``urn:gateway:problem:load-shed``, its class in
``priority``, ``Retry-After: 1``) before any other decision: it spends no rate-limit tokens. The
answer is built once per class and shedder (``shed_answer``), not per request. Under ``gateway
serve`` the connection itself asks the local shedder first, before a scope or a task exists
(``connection_shed.py``); a request it lets through carries its draw in the scope
(``DRAWN_SCOPE_KEY``), so this layer does not draw for it again.
Each shedder has a kill switch (``enabled``) and a ``mode``: ``"shadow"`` sheds nothing and
counts what it would have shed (``decision="shadow_shed"``).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
from collections.abc import Mapping, Sequence
from random import getrandbits, random
from time import monotonic
from typing import TYPE_CHECKING, Any, Literal

from gateway._asgi import ASGIApp, Receive, Scope, Send
from gateway._paths import PathPrefixes, match_form
from gateway._settings import ConfigSetting, StoreSetting, resolve
from gateway.config import (
    ConcurrencyLimit,
    FleetShedding,
    IdentityConfig,
    LocalShedding,
    PriorityClass,
)
from gateway.errors import ConfigError, StoreError
from gateway.identity import GLOBAL_TAG, TrustedProxies
from gateway.lifespan import run_lifespan
from gateway.problem import STORE_UNAVAILABLE, CannedProblem, Renderer, problem_type, renderer_for
from gateway.requestid import current_request_id
from gateway.slots import SlotHolding, SlotKeeper
from gateway.store import SlotPlan, Store

if TYPE_CHECKING:
    from prometheus_client import Gauge

    from gateway.metrics import Metrics
    from gateway.tallies import CounterTally

__all__ = ["CALM", "DRAWN_SCOPE_KEY", "LET_BACK_STEP", "LOAD_SHED", "SHED_LOG_INTERVAL_S", "TICK_S",
           "LoadSheddingMiddleware", "LocalShedder", "PriorityClasses", "shed_answer"]

_log = logging.getLogger("gateway.shedding")
#: The problem type of a shed request.
LOAD_SHED = problem_type("load-shed")
#: How often the local shedder samples its in-flight count and the event loop's lag.
TICK_S = 0.05
#: The share of a shed class let back per calm tick (all of it after 10 calm ticks).
LET_BACK_STEP = 0.1
#: Calm: in flight at most this share of ``max_in_flight``, and lag at most this share of
#: ``max_loop_lag``; between calm and over, the shed classes stay as they are (hysteresis).
CALM = 0.5
#: The shortest time between two log lines of one shedder, decision and class.
SHED_LOG_INTERVAL_S = 1.0
#: The scope key of a request the connection already drew for (its value: that ``LocalShedder``).
DRAWN_SCOPE_KEY = "gateway.local_shed_drawn"
_RETRY_AFTER = b"1"


def shed_answer(render: Renderer, priority: str, shedder: str) -> CannedProblem:
    """The 503 of a request of class ``priority`` shed by ``shedder`` (``local``, ``fleet``), in
    ``render``'s format."""
    return render.canned(
        status=503,
        type_=LOAD_SHED,
        title="Service overloaded",
        detail=f"The gateway is shedding {priority} requests ({shedder} capacity) so that more "
               "critical ones are served; retry later.",
        headers=[(b"retry-after", _RETRY_AFTER)],
        extensions={"priority": priority},
    )


class PriorityClasses:
    """Which class a request is in: the first listed class it matches, else the default one."""

    def __init__(
        self, priorities: Sequence[PriorityClass], default_class: str, identity: IdentityConfig
    ) -> None:
        classes = list(priorities)
        names = [c.name for c in classes]
        if default_class not in names:
            classes.append(PriorityClass(name=default_class, paths=()))  # matched by nothing: the fallback
            names.append(default_class)
        self.classes = tuple(classes)
        self.names = tuple(names)
        self._default = names.index(default_class)
        self._match = tuple(
            (PathPrefixes(c.paths), c.methods,
             None if c.header is None else (c.header[0].encode("latin-1"), c.header[1].encode("latin-1")))
            for c in classes)
        self._trusted = TrustedProxies(identity.trusted_proxies)

    def __len__(self) -> int:
        return len(self.classes)

    def of(self, scope: Scope) -> int:
        """The index of the request's class, 0 the most critical."""
        return self.of_request(scope["method"], scope["path"], scope["headers"], scope.get("client"))

    def of_request(self, method: str, path: str, headers: Sequence[tuple[bytes, bytes]],
                   client: Sequence[Any] | None) -> int:
        """``of`` from the parts of a request that has no scope yet (the connection's early shed)."""
        form = match_form(path)
        for i, (paths, methods, header) in enumerate(self._match):
            if not paths or (methods and method not in methods) or not paths.matches_form(form):
                continue
            if header is not None and not self._has(headers, client, header):
                continue
            return i
        return self._default

    def _has(self, headers: Sequence[tuple[bytes, bytes]], client: Sequence[Any] | None,
             header: tuple[bytes, bytes]) -> bool:
        """The header match, believed only from a trusted proxy: a client cannot raise its own class."""
        if not client or client[0] not in self._trusted:
            return False
        name, value = header
        return any(n == name and v.strip() == value for n, v in headers)


class LocalShedder:
    """The process's own pressure, sampled every ``TICK_S``, and the share of each class admitted."""

    def __init__(self, config: LocalShedding, classes: int, admitting: Sequence[Gauge] = ()) -> None:
        self._max_in_flight = config.max_in_flight
        self._max_lag_s = config.max_loop_lag_s
        self._classes = classes
        self._spared = 1 if classes > 1 else 0  # the most critical class is never shed, unless alone
        self.admitting = [1.0] * classes  # per class, the share let through
        self._partial = False  # some class is admitted at less than its whole share
        self._gauges = tuple(admitting)
        self.in_flight = 0
        self.lag_s = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0

    def admits(self, k: int, *, drawn: bool = False) -> bool:
        """Whether a request of class ``k`` may go on now; ``drawn``: its share was drawn for
        already (by the connection), and is not drawn again."""
        if self._timer is None:
            self._start()
        if k < self._spared:
            return True
        if self.in_flight >= self._max_in_flight:
            return False  # a flood between two ticks
        share = self.admitting[k]
        return share >= 1.0 or (share > 0.0 and (drawn or random() < share))  # noqa: S311 - a share of traffic, no secret

    def may_shed(self) -> bool:
        """Whether any request could be shed now: past ``max_in_flight``, or a class not wholly
        admitted. False is the common case, and lets the connection skip every other step."""
        return self._partial or self.in_flight >= self._max_in_flight

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        self._due = loop.time() + TICK_S
        # in a context of its own: started by a request, the sampling must not run (and log)
        # under that request's id for the life of the process, nor keep its context alive
        self._timer = loop.call_at(self._due, self._tick, context=contextvars.Context())

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        self.lag_s = max(0.0, now - self._due)  # how late the loop ran this timer
        if self.lag_s > self._max_lag_s or self.in_flight >= self._max_in_flight:
            self._shed_one_more()
        elif self.lag_s <= self._max_lag_s * CALM and self.in_flight <= self._max_in_flight * CALM:
            self._let_back_some()
        self._due = now + TICK_S
        self._timer = loop.call_at(self._due, self._tick)

    def _shed_one_more(self) -> None:
        for k in range(self._classes - 1, self._spared - 1, -1):  # the most sheddable first
            if self.admitting[k] > 0.0:
                self._set(k, 0.0)
                _log.warning("shedding load: class %d of %d shed", k, self._classes, extra={
                    "event": "shedding.local_shed", "class_index": k, "in_flight": self.in_flight,
                    "loop_lag_ms": round(self.lag_s * 1000, 1)})
                return

    def _let_back_some(self) -> None:
        for k in range(self._spared, self._classes):  # the most critical first
            if self.admitting[k] < 1.0:
                self._set(k, min(1.0, round(self.admitting[k] + LET_BACK_STEP, 3)))
                return

    def _set(self, k: int, share: float) -> None:
        self.admitting[k] = share
        self._partial = any(a < 1.0 for a in self.admitting)
        if self._gauges:
            self._gauges[k].set(share)

    def stop(self) -> None:
        """Stop sampling (at shutdown); the next request starts it again."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _ShedLog:
    """At most one log line per shedder, decision and class every ``SHED_LOG_INTERVAL_S``, with
    how many requests it stands for: under a flood a line per shed request would cost more than
    the shedding (measured: 45 us per shed request with one, 9 us without), and the metrics
    count every one anyway."""

    __slots__ = ("_last", "_pending")

    def __init__(self) -> None:
        self._pending: dict[tuple[str, str, str], int] = {}
        self._last: dict[tuple[str, str, str], float] = {}

    def note(self, shedder: str, decision: str, priority: str, request_id: bytes | None = None) -> None:
        """Count one; log when the last line for the key is ``SHED_LOG_INTERVAL_S`` old, naming
        the request that made it (``request_id``, else the current request's)."""
        key = (shedder, decision, priority)
        count = self._pending.get(key, 0) + 1
        now = monotonic()
        if now - self._last.get(key, -SHED_LOG_INTERVAL_S) < SHED_LOG_INTERVAL_S:
            self._pending[key] = count
            return
        self._pending[key] = 0
        self._last[key] = now
        _log.info("%d request(s) %s by the %s load shedder (class %s)", count,
                  "would have been shed" if decision == "shadow_shed" else "shed", shedder, priority,
                  extra={"event": f"shedding.{decision}", "shedder": shedder, "priority": priority,
                         "count": count,
                         "request_id": request_id.decode() if request_id else current_request_id()})


class _Fleet:
    """The fleet budget: per class, a plan for one slot of the global set, up to its allocation."""

    def __init__(self, config: FleetShedding, classes: Sequence[PriorityClass], store: Store) -> None:
        self.config = config
        self.plans: list[SlotPlan] = []
        self.allocations: list[int] = []
        reserved = 0.0
        for cls in classes:
            allocation = max(1, math.floor(config.limit * (1.0 - reserved) + 1e-9))
            self.allocations.append(allocation)
            self.plans.append(SlotPlan.of([ConcurrencyLimit(
                name="fleet", limit=allocation, key="global", lease_ms=config.lease_ms, mode=config.mode)]))
            reserved += cls.reserve
        self.slots = SlotKeeper(store, shortest_lease_ms=config.lease_ms)


class LoadSheddingMiddleware:
    """Pure ASGI load shedding by priority class: the local shedder, then the fleet budget.

    Args:
        app: the ASGI app to protect.
        priority: the ``[[priority]]`` classes, most critical first (dicts shaped like the TOML).
        shedding: the ``[shedding]`` section (dict shaped like the TOML).
        identity: the ``[identity]`` section (its ``trusted_proxies`` gate header matches).
        store: as for the other middlewares; used by the fleet shedder only.
        metrics: where shed requests are counted; none when None.
        config: a whole config (TOML path, dict, ``Config``; ``GatewayMiddleware`` passes its
            own, with its shared ``store``) instead of the sections above.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        priority: Sequence[Mapping[str, Any]] | None = None,
        shedding: Mapping[str, Any] | None = None,
        identity: Mapping[str, Any] | IdentityConfig | None = None,
        store: StoreSetting = None,
        metrics: Metrics | None = None,
        config: ConfigSetting = None,
    ) -> None:
        if config is not None and (priority is not None or shedding is not None):
            msg = "give the settings in config= or as keywords (priority, shedding), not both"
            raise TypeError(msg)
        sections: dict[str, Any] | None = None
        if config is None:
            sections = {"priority": list(priority or ())}
            if shedding is not None:
                sections["shedding"] = shedding
        config_, self._store, self._owns_store = resolve(
            config=config, identity=identity, store=store, sections=sections)
        config = config_
        if not (config.shedding.local.enabled or config.shedding.fleet.enabled):
            raise ConfigError(["shedding: neither shedding.local nor shedding.fleet is enabled: "
                               "LoadSheddingMiddleware would shed nothing"])
        self.app = app
        self._render = renderer_for(config.errors.format)
        self.classes = PriorityClasses(config.priorities, config.shedding.default_class, config.identity)
        names = self.classes.names
        local, fleet = config.shedding.local, config.shedding.fleet
        self._shed: dict[tuple[str, str], tuple[CounterTally, ...]] = {}
        admitting: tuple[Gauge, ...] = ()
        if metrics is not None:
            for shedder in ("local", "fleet"):
                for decision in ("shed", "shadow_shed"):
                    self._shed[shedder, decision] = tuple(metrics.shed(shedder, n, decision) for n in names)
            admitting = tuple(metrics.shed_admitting(n) for n in names)
        self.local = LocalShedder(local, len(names), admitting) if local.enabled else None
        self._local_shadow = local.mode == "shadow"
        self.fleet = _Fleet(fleet, self.classes.classes, self._store) if fleet.enabled else None
        self._shed_log = _ShedLog()
        #: per shedder, the canned 503 of each class
        self.answers = {shedder: tuple(shed_answer(self._render, n, shedder) for n in names)
                        for shedder in ("local", "fleet")}

    @property
    def store(self) -> Store:
        return self._store

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan" and self._owns_store:
                await run_lifespan(self.app, scope, receive, send, self._store, before_close=self.drain)
            else:
                await self.app(scope, receive, send)
            return
        k = self.classes.of(scope)
        local = self.local
        if local is None:
            await self._through_fleet(k, scope, receive, send)
            return
        if (not local.admits(k, drawn=scope.get(DRAWN_SCOPE_KEY) is local)
                and not self._refused("local", k, shadow=self._local_shadow)):
            await self._send_shed(send, k, "local")
            return
        local.in_flight += 1
        try:
            await self._through_fleet(k, scope, receive, send)
        finally:
            local.in_flight -= 1

    async def _through_fleet(self, k: int, scope: Scope, receive: Receive, send: Send) -> None:
        fleet = self.fleet
        if fleet is None:
            await self.app(scope, receive, send)
            return
        holding = await self._take_fleet_slot(fleet, k, send)
        if holding is False:
            return
        if holding is None:
            await self.app(scope, receive, send)
            return
        await fleet.slots.run(self.app, scope, receive, send, holding)

    async def _take_fleet_slot(
        self, fleet: _Fleet, k: int, send: Send
    ) -> SlotHolding | Literal[False] | None:
        """The class's slot of the fleet budget; None to go on without one, False once shed."""
        plan, tags, owner = fleet.plans[k], [GLOBAL_TAG], b"%032x" % getrandbits(128)
        try:
            decision = await self._store.concurrency_acquire(plan, tags, owner)
        except StoreError as exc:
            fleet.slots.release_unheard(plan, tags, owner)
            deny = fleet.config.on_store_error == "deny" and fleet.config.mode == "enforce"
            _log.warning("fleet load shedder store failed; %s per on_store_error",
                         "deny" if deny else "allow", extra={
                             "event": "shedding.store_error", "error": str(exc),
                             "request_id": current_request_id()})
            if deny:
                await self._render.send(
                    send, status=503, type_=STORE_UNAVAILABLE, title="Load shedder store unavailable",
                    detail="The fleet's capacity could not be checked and it does not run unchecked.",
                    headers=[(b"retry-after", _RETRY_AFTER)])
                return False
            return None
        # a full budget refuses an enforced shedder (not allowed), a shadow one only would have
        if not decision.would_allow and not self._refused("fleet", k, shadow=decision.allowed):
            await self._send_shed(send, k, "fleet")
            return False
        return fleet.slots.hold(plan, tags, owner, count=1 if decision.would_allow else 0)

    def _refused(self, shedder: str, k: int, *, shadow: bool) -> bool:
        """Count a shed decision; True when it is a shadow one (the request goes on)."""
        decision = "shadow_shed" if shadow else "shed"
        counters = self._shed.get((shedder, decision))
        if counters:
            counters[k].inc()
        self._shed_log.note(shedder, decision, self.classes.names[k])
        return shadow

    def count_shed(self, k: int, request_id: bytes) -> None:
        """Count and log one request of class ``k`` the local shedder shed before it reached this
        layer (the connection's early shed), as ``_refused`` would."""
        counters = self._shed.get(("local", "shed"))
        if counters:
            counters[k].inc()
        self._shed_log.note("local", "shed", self.classes.names[k], request_id)

    async def _send_shed(self, send: Send, k: int, shedder: str) -> None:
        await self.answers[shedder][k].send(send)

    async def drain(self, within_s: float = 10.0) -> None:
        """At shutdown: stop sampling, and wait for the fleet slots being given back."""
        if self.local is not None:
            self.local.stop()
        if self.fleet is not None:
            await self.fleet.slots.drain(within_s)
