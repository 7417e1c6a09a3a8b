"""ConcurrencyLimitMiddleware: at most ``limit`` of a client's requests in flight at once.

Stripe's concurrent-requests limiter ("you can only have 20 API requests in progress at the
same time"): a token bucket limits how often a client may start requests, this limits how many
it may have running, which is what a slow endpoint hammered by retries needs.

Per request that matches ``[[concurrency_limit]]`` policies (path prefixes by segment, methods):
one ``concurrency_acquire`` takes a slot of every matched limit, all or none, in the store
(``lua/concurrency_acquire.lua``: store clock, every key with a TTL, one slot set per limit and
key value, so every process shares the count). The slots are given back
(``concurrency_release``) when the response ends, before its last body message goes out, so a
client's next request never finds its finished one still holding a slot; or, without a whole
response, when the app's call ends: the client went away, the app raised, or the request was
cancelled (the release then goes on in a task of its own). A
request that outlives a third of its lease renews its slots on one shared timer
(``gateway.renewals``); a gateway that dies holding slots stops renewing, and its slots are free
again ``lease`` after its last renewal.

A refusal is a 429 problem+json (``urn:gateway:problem:concurrency-limit-exceeded``) with
``Retry-After: 1`` and ``violated-policies``; the app never sees it. When the store fails, each
enforced limit's ``on_store_error`` decides, as for rate limits: any ``deny`` answers 503,
otherwise the request goes on without a slot and the failure is logged.

``mode = "shadow"`` limits are decided and counted like enforced ones (a slot is taken only
when enforcing them would have admitted the request) and refuse nothing: a shadow refusal is
logged and counted as ``shadow_deny``, and the request goes on untouched.

In ``GatewayMiddleware`` the rate limit leaves the take of a request this layer admits to it
(``ctx.deferred_take``), and both are decided in one store call where the store can
(``Store.ratelimit_take_acquire``); for the methods the Idempotency-Key layer claims, the take
stays with the claim, and the slot is taken first, by itself.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from random import getrandbits
from typing import TYPE_CHECKING, Any, Literal

from gateway._asgi import ASGIApp, Receive, Scope, Send
from gateway._paths import PathPrefixes, match_form
from gateway._preflight import is_cors_preflight
from gateway._settings import ConfigSetting, StoreSetting, resolve
from gateway.config import ConcurrencyLimit, IdentityConfig, SourceFunction
from gateway.context import DeferredTake, context_of
from gateway.errors import ConfigError, StoreError
from gateway.identity import IdentityResolver
from gateway.lifespan import run_lifespan
from gateway.problem import STORE_UNAVAILABLE, Renderer, problem_type, renderer_for
from gateway.requestid import current_request_id
from gateway.slots import SlotHolding, SlotKeeper
from gateway.store import SlotDecision, SlotPlan, Store

if TYPE_CHECKING:
    from prometheus_client import Gauge

    from gateway.metrics import Metrics
    from gateway.tallies import CounterTally

__all__ = ["CONCURRENCY_LIMITED", "ConcurrencyLimitMiddleware"]

_log = logging.getLogger("gateway.concurrency")
#: The problem type of a concurrency refusal.
CONCURRENCY_LIMITED = problem_type("concurrency-limit-exceeded")
_RETRY_AFTER = b"1"  # a slot frees when some request ends: soon, but nobody can say when


class _Limit:
    """One limit, compiled for matching."""

    __slots__ = ("exempt_methods", "limit", "methods", "paths")

    def __init__(self, limit: ConcurrencyLimit) -> None:
        self.limit = limit
        self.methods = limit.methods
        self.exempt_methods = limit.exempt_methods
        self.paths = PathPrefixes(limit.paths, limit.exempt_paths)

    def matches(self, method: str, form: str) -> bool:
        if (self.methods and method not in self.methods) or method in self.exempt_methods:
            return False
        return self.paths.matches_form(form)


class _Rules:
    """Everything a given set of matched limits needs, built once per distinct set."""

    __slots__ = ("allowed", "denied", "deny_on_error", "enforced", "errored", "held", "keys", "limits",
                 "names", "plan", "shadow_denied")

    def __init__(self, limits: Sequence[ConcurrencyLimit], metrics: Metrics | None) -> None:
        self.limits = tuple(limits)
        self.plan = SlotPlan.of(limits)
        self.keys = tuple(c.key for c in limits)
        self.names = tuple(c.name for c in limits)
        self.enforced = tuple(c.mode == "enforce" for c in limits)
        self.deny_on_error = any(c.on_store_error == "deny" and c.mode == "enforce" for c in limits)
        self.allowed: tuple[CounterTally, ...] = ()
        self.denied: tuple[CounterTally, ...] = ()
        self.shadow_denied: tuple[CounterTally, ...] = ()
        self.errored: tuple[CounterTally, ...] = ()
        self.held: tuple[Gauge, ...] = ()
        if metrics is not None:
            self.allowed = tuple(metrics.concurrency_decision(n, "allow") for n in self.names)
            self.denied = tuple(metrics.concurrency_decision(n, "deny") for n in self.names)
            self.shadow_denied = tuple(metrics.concurrency_decision(n, "shadow_deny") for n in self.names)
            self.errored = tuple(metrics.concurrency_decision(n, "error") for n in self.names)
            self.held = tuple(metrics.concurrency_in_flight(n) for n in self.names)


class ConcurrencyLimitMiddleware:
    """Pure ASGI concurrency limiting: in-flight slots counted atomically in the store.

    Args:
        app: the ASGI app to protect.
        concurrency_limit: the ``[[concurrency_limit]]`` policies, as dicts shaped like the TOML
            or as ``ConcurrencyLimit`` objects; one ``"concurrent"`` limit (20 in flight per
            client) when neither this nor ``config`` is given. An empty list is refused.
        identity: the ``[identity]`` section (dict or ``IdentityConfig``); or a callable given the ASGI scope
            (sync or async) returning the client's identity (None for none): the one source.
        store: a store URL, a ``[store]`` dict or ``StoreConfig`` (the middleware then owns the
            store and opens/closes it with the lifespan), or a ``Store`` shared with others.
        metrics: where decisions and slots held are counted; none when None.
        identity_resolver: the resolver to take identity tags from (``GatewayMiddleware`` passes
            the one its layers share).
        claim_methods: in ``GatewayMiddleware``, the methods the Idempotency-Key layer claims:
            their deferred rate-limit take stays for it, to be made with the claim; the take of
            any other request this layer admits is made here, with the acquire.
        config: a whole config (TOML path, dict, ``Config``) to take ``[[concurrency_limit]]``,
            ``[identity]`` and ``[store]`` from, instead of the keywords above.
        limit_preflights: ``request.limit_preflights``: limit CORS preflights too (by default
            they pass, ``gateway/_preflight.py``); from ``config`` when None.
        renderer: how the layer's own refusals look (``gateway/problem.py``); from
            ``[errors] format`` when None.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        concurrency_limit: Sequence[Mapping[str, Any] | ConcurrencyLimit] | None = None,
        identity: Mapping[str, Any] | IdentityConfig | SourceFunction | None = None,
        store: StoreSetting = None,
        metrics: Metrics | None = None,
        identity_resolver: IdentityResolver | None = None,
        claim_methods: frozenset[str] = frozenset(),
        config: ConfigSetting = None,
        limit_preflights: bool | None = None,
        renderer: Renderer | None = None,
    ) -> None:
        if concurrency_limit is None and config is None:
            concurrency_limit = [ConcurrencyLimit()]  # the documented default: 20 in flight per client
        config_, self._store, self._owns_store = resolve(
            config=config, concurrency_limit=concurrency_limit, identity=identity, store=store
        )
        if not config_.concurrency_limits:
            where = "the config has no [[concurrency_limit]] table" if config is not None else "an empty list"
            raise ConfigError([f"concurrency_limit: ConcurrencyLimitMiddleware needs at least one limit "
                               f"({where} limits nothing)"])
        config = config_
        self.app = app
        self._metrics = metrics
        self._limits = tuple(_Limit(c) for c in config.concurrency_limits)
        self._resolver = identity_resolver or IdentityResolver(
            config.identity, (c.key for c in config.concurrency_limits))
        self._rules: dict[tuple[int, ...], _Rules] = {}
        self._everywhere = all(c.paths.everything and not c.methods and not c.exempt_methods
                               for c in self._limits)
        self._all = self._rules_of(tuple(range(len(self._limits)))) if self._limits else None
        self.slots = SlotKeeper(self._store, shortest_lease_ms=min(
            (c.limit.lease_ms for c in self._limits), default=30_000))
        self._claim_methods = claim_methods
        self._render = renderer or renderer_for(config.errors.format)
        limit = config.request.limit_preflights if limit_preflights is None else limit_preflights
        self._pass_preflights = not limit

    @property
    def store(self) -> Store:
        return self._store

    def _rules_of(self, matched: tuple[int, ...]) -> _Rules:
        rules = self._rules.get(matched)
        if rules is None:
            # bounded: one entry per distinct subset of the configured limits that occurs
            rules = self._rules[matched] = _Rules([self._limits[i].limit for i in matched], self._metrics)
        return rules

    def _match(self, method: str, path: str) -> _Rules | None:
        if self._everywhere:
            return self._all
        form = match_form(path)
        matched = tuple(i for i, c in enumerate(self._limits) if c.matches(method, form))
        return self._rules_of(matched) if matched else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan" and self._owns_store:
                await run_lifespan(self.app, scope, receive, send, self._store, before_close=self.drain)
            else:
                await self.app(scope, receive, send)
            return
        rules = self._match(scope["method"], scope["path"])
        if rules is None or (self._pass_preflights and is_cors_preflight(scope)):
            await self.app(scope, receive, send)
            return
        ctx = context_of(scope)
        if self._resolver.awaits:  # an async callable identity source
            tags_of = await (ctx.tags_async(self._resolver, scope) if ctx is not None
                             else self._resolver.tags_async(scope))
        else:
            tags_of = ctx.tags(self._resolver, scope) if ctx is not None else self._resolver.tags(scope)
        tags = [tags_of[k] for k in rules.keys]
        owner = b"%032x" % getrandbits(128)
        deferred = None
        if ctx is not None and scope["method"] not in self._claim_methods:
            deferred = ctx.take_deferred()
        if deferred is None:
            holding = await self._acquire(rules, tags, owner, send)
        elif self._store.combines_slots(deferred.tags, tags):
            holding = await self._take_and_acquire(rules, tags, owner, deferred, send)
        elif await deferred.alone(send):  # where they cannot share a call: the take first, as alone
            holding = await self._acquire(rules, tags, owner, send)
        else:
            return
        if holding is False:
            return
        if holding is None:  # fail-open: no slot, nothing to give back
            await self.app(scope, receive, send)
            return

        await self.slots.run(self.app, scope, receive, send, holding)

    async def _acquire(
        self, rules: _Rules, tags: list[str], owner: bytes, send: Send
    ) -> SlotHolding | Literal[False] | None:
        """The slots, None to go on without them (fail-open), False once a 429 or 503 is sent."""
        try:
            decision = await self._store.concurrency_acquire(rules.plan, tags, owner)
        except StoreError as exc:
            self.slots.release_unheard(rules.plan, tags, owner)
            return await self._failed(rules, exc, send)
        return await self._decided(rules, tags, owner, decision, send)

    async def _take_and_acquire(
        self, rules: _Rules, tags: list[str], owner: bytes, deferred: DeferredTake, send: Send
    ) -> SlotHolding | Literal[False] | None:
        """The rate limit's take and the acquire in one store call; each layer's outcome as if
        it had made its own call, the rate limit's first."""
        try:
            decision, slots = await self._store.ratelimit_take_acquire(
                deferred.plan, deferred.tags, rules.plan, tags, owner)
        except StoreError as exc:
            self.slots.release_unheard(rules.plan, tags, owner)
            if not await deferred.failed(exc, send):
                return False
            return await self._failed(rules, exc, send)
        if slots is None:  # the rate limit denied: nothing charged, no slot taken
            await deferred.decided(decision, send)
            return False
        if slots.allowed and not await deferred.decided(decision, send):
            self.slots.release_unheard(rules.plan, tags, owner)  # answered after all: no slot kept
            return False
        # refused: the take's tokens are back, so the rate limit counts nothing either
        return await self._decided(rules, tags, owner, slots, send)

    async def _decided(
        self, rules: _Rules, tags: list[str], owner: bytes, decision: SlotDecision, send: Send
    ) -> SlotHolding | Literal[False]:
        """Count the decision; a refusal is answered (False), else the slots the request holds."""
        refused = [i for i, free in enumerate(decision.free) if not free]
        shadow_refused = [i for i in refused if not rules.enforced[i]]
        for i in shadow_refused:
            if rules.shadow_denied:
                rules.shadow_denied[i].inc()
        if shadow_refused:
            _log.info("concurrency limit would refuse (shadow)", extra={
                "event": "concurrency.shadow_denied", "request_id": current_request_id(),
                "policies": [rules.names[i] for i in shadow_refused],
                "in_flight": [decision.in_flight[i] for i in shadow_refused]})
        if not decision.allowed:
            await self._refuse(rules, [i for i in refused if rules.enforced[i]], decision, send)
            return False
        if rules.allowed:
            for i, free in enumerate(decision.free):
                if free:
                    rules.allowed[i].inc()
        # enforced slots are taken when allowed; shadow ones only when every limit had room
        held = [i for i, enforced in enumerate(rules.enforced) if enforced or decision.would_allow]
        return self.slots.hold(rules.plan, tags, owner, count=len(held),
                               gauges=[rules.held[i] for i in held] if rules.held else (), names=rules.names)

    async def _refuse(self, rules: _Rules, refused: list[int], decision: SlotDecision, send: Send) -> None:
        names = [rules.names[i] for i in refused]
        for i in refused:
            if rules.denied:
                rules.denied[i].inc()
        _log.info("concurrency limit refused", extra={
            "event": "concurrency.denied", "request_id": current_request_id(), "policies": names,
            "in_flight": [decision.in_flight[i] for i in refused]})
        limits = ", ".join(f"{rules.names[i]}: {rules.limits[i].limit}" for i in refused)
        await self._render.send(
            send,
            status=429,
            type_=CONCURRENCY_LIMITED,
            title="Too many concurrent requests",
            detail=f"Too many requests in flight at once ({limits}); retry when one has finished.",
            headers=[(b"retry-after", _RETRY_AFTER)],
            extensions={"violated-policies": names},
        )

    async def _failed(self, rules: _Rules, exc: StoreError, send: Send) -> Literal[False] | None:
        """A store failure, per the enforced limits' ``on_store_error``: 503 (False) or go on (None)."""
        action = "deny" if rules.deny_on_error else "allow"
        for counter in rules.errored:
            counter.inc()
        _log.warning("concurrency limit store failed; %s per on_store_error", action, extra={
            "event": "concurrency.store_error", "request_id": current_request_id(),
            "policies": list(rules.names), "action": action, "error": str(exc)})
        if not rules.deny_on_error:
            return None
        await self._render.send(
            send,
            status=503,
            type_=STORE_UNAVAILABLE,
            title="Concurrency limit store unavailable",
            detail="The concurrency limit could not be checked and this route does not run unchecked.",
            headers=[(b"retry-after", _RETRY_AFTER)],
        )
        return False

    async def drain(self, within_s: float = 10.0) -> None:
        """Wait (at most ``within_s``) for the slot releases still under way (at shutdown)."""
        await self.slots.drain(within_s)
