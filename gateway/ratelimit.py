"""RateLimitMiddleware: token buckets in front of an ASGI app, one store call per request.

Policies are compiled once: path prefixes (by segment) and methods pick the policies a request
matches, and every distinct set of matched policies gets its script arguments and its
``RateLimit-Policy`` field built the first time it is seen. Per request there is one pass over
the headers (identity), one ``ratelimit_take`` for all matched policies (all charged or none),
and on the response the IETF fields (draft-ietf-httpapi-ratelimit-headers):

    RateLimit-Policy: "per-client";q=100;w=60
    RateLimit: "per-client";r=42;t=35

In ``GatewayMiddleware`` the take of a request the Idempotency-Key layer claims (its
methods, POST by default) is deferred to that layer (``_DeferredTake``), which makes it with the
claim in one store call where the store can (``Store.ratelimit_take_claim``): a keyed request
with a rate limit costs one round trip less. Its outcome is the same as a take of its own.

A denial is a 429 problem+json with ``Retry-After`` and ``violated-policies``; the app never
sees it. The same client's requests are then answered 429 locally, without a store call, until
the store could allow them again (``denials.py``). When the store fails, each policy's
``on_store_error`` decides: any ``deny`` among the matched policies answers 503, otherwise the
request passes and the failure is logged.

A shadow policy (``mode = "shadow"``) is decided by the same script and charged exactly when
the request would pass with it enforced (``lua/ratelimit_take.lua``), and counted as enforcing it
would count it (``decision="shadow_deny"`` where it would deny, ``allow`` where the request would
pass), with one ``ratelimit.shadow_denied`` log line; but it never refuses a request (no 429, no
503: its ``on_store_error`` is not consulted, so a store failure with only shadow policies
matched fails open), it is not remembered as a local denial, and it never appears in the
``RateLimit``/``RateLimit-Policy`` fields, whose values clients act on. A request that matches
only shadow policies gets no fields at all.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from time import monotonic, perf_counter, time
from typing import TYPE_CHECKING, Any

from gateway._asgi import ASGIApp, Headers, Message, Receive, Scope, Send
from gateway._paths import PathPrefixes, match_form
from gateway._preflight import is_cors_preflight
from gateway._settings import ConfigSetting, StoreSetting, resolve
from gateway.config import IdentityConfig, RateLimitHeaders, RateLimitPolicy, SourceFunction
from gateway.context import RequestContext, context_of
from gateway.denials import LocalDenials
from gateway.errors import ConfigError, StoreError
from gateway.identity import IdentityResolver
from gateway.lifespan import run_lifespan
from gateway.plans import PlanChooser, plan_claims
from gateway.problem import QUOTA_EXCEEDED, STORE_UNAVAILABLE, Renderer, renderer_for
from gateway.requestid import current_request_id
from gateway.store import BucketSpec, BucketState, RateDecision, Store, TakePlan

if TYPE_CHECKING:
    from gateway.metrics import Metrics
    from gateway.tallies import CounterTally

__all__ = ["RateLimitMiddleware"]

_log = logging.getLogger("gateway.ratelimit")
_POLICY_HEADER = b"ratelimit-policy"
_LIMIT_HEADER = b"ratelimit"
# response.rate_limit_headers = "ietf+legacy": the de facto fields, as GitHub sends them
_LEGACY_LIMIT = b"x-ratelimit-limit"
_LEGACY_REMAINING = b"x-ratelimit-remaining"
_LEGACY_RESET = b"x-ratelimit-reset"
_STORE_RETRY_AFTER = b"1"


class _Policy:
    """One policy, compiled for matching and rendering."""

    __slots__ = ("exempt_methods", "item", "methods", "paths", "policy", "spec")

    def __init__(self, policy: RateLimitPolicy) -> None:
        self.policy = policy
        self.spec = BucketSpec.from_policy(policy)
        self.methods = policy.methods
        self.exempt_methods = policy.exempt_methods
        self.paths = PathPrefixes(policy.paths, policy.exempt_paths)
        self.item = f'"{policy.name}";'

    def matches(self, method: str, form: str) -> bool:
        """Whether a request (its ``match_form`` path) is this policy's."""
        if (self.methods and method not in self.methods) or method in self.exempt_methods:
            return False
        return self.paths.matches_form(form)


class _Plan:
    """Everything a given set of matched policies needs, built once per distinct set.

    ``enforced`` and ``shadows`` are the indices (in the take's bucket order) of the enforced
    and the shadow policies; only the enforced ones refuse, and only they are shown."""

    __slots__ = ("allowed", "denied", "deny_on_error", "distinct_keys", "enforced", "errored", "keys",
                 "legacy", "limits", "matched", "names", "policy_field", "policy_pair", "shadow_allowed",
                 "shadow_denied", "shadows", "shown", "take", "visible")

    def __init__(
        self, policies: Sequence[_Policy], metrics: Metrics | None, matched: tuple[int, ...] = (),
        headers: RateLimitHeaders = "ietf",
    ) -> None:
        self.matched = matched  # the policies' indices in config order
        self.take = TakePlan.of([p.spec for p in policies])
        self.keys = tuple(p.policy.key for p in policies)
        self.distinct_keys = tuple(dict.fromkeys(self.keys))
        self.names = tuple(p.policy.name for p in policies)
        self.enforced = tuple(i for i, p in enumerate(policies) if not p.policy.shadow)
        self.shadows = tuple(i for i, p in enumerate(policies) if p.policy.shadow)
        shown = [policies[i] for i in self.enforced]
        self.shown = tuple(zip((p.item.encode() for p in shown), self.enforced, strict=True))
        self.policy_field = ", ".join(
            f"{p.item}q={p.policy.limit};w={p.policy.window_s}" for p in shown
        ).encode()
        self.policy_pair = (_POLICY_HEADER, self.policy_field)
        self.deny_on_error = any(p.policy.on_store_error == "deny" for p in shown)
        # response.rate_limit_headers, decided here once: whether the fields are sent at all
        # (never for shadow policies alone), and whether the legacy X-RateLimit-* go with them
        self.visible = bool(self.enforced) and headers != "none"
        self.legacy = self.visible and headers == "ietf+legacy"
        self.limits = tuple(p.policy.limit for p in shown)
        # gateway_ratelimit_decisions_total children (none without metrics): allowed and denied
        # per enforced policy, shadow_* per shadow policy, errored per policy, each in order
        self.allowed: tuple[CounterTally, ...] = ()
        self.denied: tuple[CounterTally, ...] = ()
        self.shadow_allowed: tuple[CounterTally, ...] = ()
        self.shadow_denied: tuple[CounterTally, ...] = ()
        self.errored: tuple[CounterTally, ...] = ()
        if metrics is not None:
            self.allowed = tuple(metrics.decision(self.names[i], "allow") for i in self.enforced)
            self.denied = tuple(metrics.decision(self.names[i], "deny") for i in self.enforced)
            self.shadow_allowed = tuple(metrics.decision(self.names[i], "allow") for i in self.shadows)
            self.shadow_denied = tuple(metrics.decision(self.names[i], "shadow_deny") for i in self.shadows)
            self.errored = tuple(metrics.decision(n, "error") for n in self.names)

    def passing_fields(self, decision: RateDecision) -> Headers | None:
        """For a decision that lets the request go on with nothing to answer or log (allowed,
        no shadow policy): counted as allowed, and its fields; None for any other, which
        ``RateLimitMiddleware._decided`` acts on."""
        if not decision.allowed or self.shadows:
            return None
        for counter in self.allowed:
            counter.inc()
        return self.fields(decision)

    def fields(self, decision: RateDecision) -> Headers:
        """The response's RateLimit fields for the enforced policies; none when all are shadow
        (or ``rate_limit_headers = "none"``)."""
        if not self.visible:
            return []
        if self.legacy:
            return [self.policy_pair, (_LIMIT_HEADER, self.ratelimit_field(decision)),
                    *self.legacy_fields(decision)]
        return [self.policy_pair, (_LIMIT_HEADER, self.ratelimit_field(decision))]

    def policy_fields(self) -> Headers:
        """``RateLimit-Policy`` alone, for a response whose remaining counts are unknown."""
        return [self.policy_pair] if self.visible else []

    def legacy_fields(self, decision: RateDecision) -> Headers:
        """``X-RateLimit-Limit/Remaining/Reset`` of the most restrictive enforced policy (the
        fewest tokens left; of those, the longest wait): its ``q``, ``r`` and ``t`` as in
        ``RateLimit`` (``_member``), ``Reset`` as GitHub sends it, the epoch second by which
        ``t`` has passed."""
        best: tuple[int, int, int] | None = None  # (r, t, limit)
        for limit, i in zip(self.limits, self.enforced, strict=True):
            b = decision.buckets[i]
            if decision.allowed or not b.wait_ms:
                shown = (b.remaining, -(-b.full_ms // 1000), limit)
            else:
                shown = (0, -(-b.wait_ms // 1000), limit)
            if best is None or (shown[0], -shown[1]) < (best[0], -best[1]):
                best = shown
        assert best is not None
        remaining, wait_s, limit = best
        return [(_LEGACY_LIMIT, b"%d" % limit), (_LEGACY_REMAINING, b"%d" % remaining),
                (_LEGACY_RESET, b"%d" % (math.ceil(time()) + wait_s))]

    def ratelimit_field(self, decision: RateDecision) -> bytes:
        """``RateLimit``: whole tokens left and seconds (rounded up) until full, per enforced
        policy; a denying policy shows r=0 and the seconds until the request's cost is there."""
        buckets, allowed = decision.buckets, decision.allowed
        if len(self.shown) == 1:
            item, i = self.shown[0]
            return _member(item, buckets[i], allowed)
        return b", ".join([_member(item, buckets[i], allowed) for item, i in self.shown])

    def lacking(self, decision: RateDecision, among: Sequence[int]) -> list[int]:
        """Which of the buckets ``among`` lacked the request's cost: a bucket the take did not
        charge and whose cost is not there yet (a charged bucket's wait is the next request's).
        Nothing is charged in a denial, and no shadow bucket unless the request would pass."""
        if decision.would_allow:
            return []
        if decision.allowed:  # the enforced buckets were charged: none of them lacked
            among = [i for i in among if i in self.shadows]
        return [i for i in among if decision.buckets[i].wait_ms > 0]


def _member(item: bytes, bucket: BucketState, allowed: bool) -> bytes:
    """One policy's ``RateLimit`` member: ``"name";r=..;t=..``."""
    if allowed or not bucket.wait_ms:
        return b"%br=%d;t=%d" % (item, bucket.remaining, -(-bucket.full_ms // 1000))
    return b"%br=0;t=%d" % (item, -(-bucket.wait_ms // 1000))


class RateLimitMiddleware:
    """Pure ASGI rate limiting: token buckets decided atomically in the store.

    Args:
        app: the ASGI app to protect.
        rate_limit: the ``[[rate_limit]]`` policies, as dicts shaped like the TOML or as
            ``RateLimitPolicy`` objects; one ``"per-client"`` policy (100 a minute per client)
            when neither this nor ``config`` is given. An empty list is refused.
        identity: the ``[identity]`` section (dict or ``IdentityConfig``); or a callable given the ASGI scope
            (sync or async) returning the client's identity (None for none): the one source.
        store: a store URL, a ``[store]`` dict or ``StoreConfig`` (the middleware then owns the
            store and opens/closes it with the lifespan), or a ``Store`` shared with others.
        metrics: where decisions are counted (``GatewayMiddleware`` passes its own); none when None.
        identity_resolver: the resolver to take identity tags from; ``GatewayMiddleware`` passes
            the one its layers share, so the request context resolves them once per request.
        claim_methods: the methods of the requests an ``IdempotencyMiddleware`` inside this one,
            on the same store, claims: their take is left to it (in the request context), to be
            made with the claim. ``GatewayMiddleware`` sets it; used alone, nothing is deferred.
        defer_every_take: leave every request's take in the request context: a
            ``ConcurrencyLimitMiddleware`` inside this one makes it with its acquire (the
            Idempotency-Key layer, or the stack's last layer, makes any it leaves).
        config: a whole config (TOML path, dict, ``Config``) to take ``[[rate_limit]]``,
            ``[identity]`` and ``[store]`` from, instead of the keywords above.
        limit_preflights: ``request.limit_preflights``: limit CORS preflights too (by default
            they pass, ``gateway/_preflight.py``); from ``config`` when None.
        direct_app: ``GatewayMiddleware`` passes the app itself when every layer inside this
            one only passes on a request whose take is made here (no concurrency limit; the
            Idempotency-Key layer for the methods it does not claim): such a request goes
            straight to it, noted in the context as handed to the app, two frames shorter.
        rate_limit_headers: ``response.rate_limit_headers``: ``"ietf"`` (the RateLimit fields),
            ``"ietf+legacy"`` (and ``X-RateLimit-*``) or ``"none"``; from ``config`` when None.
        renderer: how the layer's own refusals look (``gateway/problem.py``); from
            ``[errors] format`` when None.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        rate_limit: Sequence[Mapping[str, Any] | RateLimitPolicy] | None = None,
        identity: Mapping[str, Any] | IdentityConfig | SourceFunction | None = None,
        store: StoreSetting = None,
        metrics: Metrics | None = None,
        identity_resolver: IdentityResolver | None = None,
        claim_methods: frozenset[str] = frozenset(),
        defer_every_take: bool = False,
        config: ConfigSetting = None,
        limit_preflights: bool | None = None,
        direct_app: ASGIApp | None = None,
        rate_limit_headers: RateLimitHeaders | None = None,
        renderer: Renderer | None = None,
    ) -> None:
        if rate_limit is None and config is None:
            rate_limit = [RateLimitPolicy()]  # the documented default: "per-client", 100 a minute
        config_, self._store, self._owns_store = resolve(
            config=config, rate_limit=rate_limit, identity=identity, store=store
        )
        if not config_.rate_limits:
            where = "the config has no [[rate_limit]] table" if config is not None else "an empty list"
            raise ConfigError([f"rate_limit: RateLimitMiddleware needs at least one policy ({where} "
                               "limits nothing)"])
        config = config_
        self.app = app
        self._metrics = metrics
        self._policies = tuple(_Policy(p) for p in config.rate_limits)
        self._resolver = identity_resolver or IdentityResolver(
            config.identity, (p.key for p in config.rate_limits), claims=plan_claims(config.rate_limits))
        self._plans: dict[tuple[int, ...], _Plan] = {}
        self._headers: RateLimitHeaders = (
            config.response.rate_limit_headers if rate_limit_headers is None else rate_limit_headers)
        self._render = renderer or renderer_for(config.errors.format)
        # per-plan numbers (plans.py): each policy on each of its plans, compiled once, and the
        # decision plans of the (matched policies, plans applied) combinations that occur
        planned = any(p.plans for p in config.rate_limits)
        self._chooser = PlanChooser(config.rate_limits, self._resolver) if planned else None
        self._variants = {(i, x.name): _Policy(p.on_plan(x.name))
                          for i, p in enumerate(config.rate_limits) for x in p.plans}
        self._on_plans: dict[tuple[tuple[int, ...], tuple[str | None, ...]], _Plan] = {}
        self._everywhere = all(p.paths.everything and not p.methods and not p.exempt_methods
                               for p in self._policies)
        self._all = self._plan(tuple(range(len(self._policies)))) if self._policies else None
        self._denials = LocalDenials()
        self._claim_methods = claim_methods
        self._defer_every_take = defer_every_take
        limit = config.request.limit_preflights if limit_preflights is None else limit_preflights
        self._pass_preflights = not limit
        self._direct_app = direct_app

    @property
    def store(self) -> Store:
        return self._store

    def _plan(self, matched: tuple[int, ...]) -> _Plan:
        plan = self._plans.get(matched)
        if plan is None:
            # bounded: one entry per distinct subset of the configured policies that occurs
            policies = [self._policies[i] for i in matched]
            plan = self._plans[matched] = _Plan(policies, self._metrics, matched, self._headers)
        return plan

    async def _plan_applied(self, plan: _Plan, scope: Scope, ctx: RequestContext | None) -> _Plan:
        """``plan`` with the numbers of the client's plans, where its policies have ``plans``."""
        assert self._chooser is not None
        found = ctx.headers if ctx is not None else None
        applied = (await self._chooser.applied_async(plan.matched, scope, found) if self._chooser.awaits
                   else self._chooser.applied(plan.matched, scope, found))
        if applied is None:
            return plan
        key = (plan.matched, applied)
        on_plans = self._on_plans.get(key)
        if on_plans is None:
            # bounded: plans are the configured ones (any other value is the policy's own numbers)
            policies = [self._policies[i] if name is None else self._variants[i, name]
                        for i, name in zip(plan.matched, applied, strict=True)]
            on_plans = self._on_plans[key] = _Plan(policies, self._metrics, plan.matched, self._headers)
        return on_plans

    def _match(self, method: str, path: str) -> _Plan | None:
        if self._everywhere:
            return self._all
        form = match_form(path)
        matched = tuple(i for i, p in enumerate(self._policies) if p.matches(method, form))
        return self._plan(matched) if matched else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan" and self._owns_store:
                await run_lifespan(self.app, scope, receive, send, self._store)
            else:
                await self.app(scope, receive, send)
            return
        plan = self._match(scope["method"], scope["path"])
        if plan is None or (
                self._pass_preflights and scope["method"] == "OPTIONS" and is_cors_preflight(scope)):
            await self.app(scope, receive, send)
            return
        ctx = context_of(scope)
        if self._resolver.awaits:  # an async callable identity source
            tags = await (ctx.tags_async(self._resolver, scope) if ctx is not None
                          else self._resolver.tags_async(scope, plan.distinct_keys))
        elif ctx is not None:
            tags = ctx.tags(self._resolver, scope)
        else:
            tags = self._resolver.tags(scope, plan.distinct_keys)
        if self._chooser is not None:
            plan = await self._plan_applied(plan, scope, ctx)
        values = [tags[k] for k in plan.keys]
        sent_at = monotonic()
        if self._denials.entries:  # a client the store denied is answered here until it could pass
            known = self._denials.answer((plan, *values), sent_at)
            if known is not None:
                if plan.shadows:
                    self._shadowed(plan, known, local=True)
                await self._deny(plan, known, send, local=True)
                return
        if ctx is not None:
            if self._defer_every_take or scope["method"] in self._claim_methods:
                ctx.deferred_take = _DeferredTake(self, plan, values, sent_at, ctx)
                await self.app(scope, receive, send)
                return
            # the take made here, not in ``_take``: one coroutine less on every request
            try:
                decision = await self._store.ratelimit_take(plan.take, values)
            except StoreError as exc:
                fields = await self._failed(plan, exc, send)
            else:
                fields = plan.passing_fields(decision)  # the usual case, without a coroutine
                if fields is None:
                    fields = await self._decided(plan, values, decision, sent_at, send)
            if fields is None:
                return
            ctx.response_headers += fields
            if self._direct_app is None:
                await self.app(scope, receive, send)
            else:
                ctx.app_start = perf_counter()
                await self._direct_app(scope, receive, send)
            return
        await self._without_context(scope, receive, send, plan=plan, values=values, sent_at=sent_at)

    async def _without_context(
        self, scope: Scope, receive: Receive, send: Send, *, plan: _Plan, values: list[str], sent_at: float,
    ) -> None:
        """Used alone (no stack's context): the take, then the app with the fields added by a
        ``send`` wrapper of this layer's own."""
        fields = await self._take(plan, values, sent_at, send)
        if fields is None:
            return
        if not fields:  # only shadow policies matched: the response is the app's, untouched
            await self.app(scope, receive, send)
            return

        async def send_with_fields(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *fields]
            await send(message)

        await self.app(scope, receive, send_with_fields)

    async def _deny(self, plan: _Plan, decision: RateDecision, send: Send, *, local: bool) -> None:
        """429 for a denial: the store's own, or (``local``) one it made earlier, aged."""
        fields = plan.fields(decision)
        denying = plan.lacking(decision, plan.enforced)
        violated = [plan.names[i] for i in denying]
        for counter, i in zip(plan.denied, plan.enforced, strict=False):
            if i in denying:
                counter.inc()
        retry_after = max(-(-decision.buckets[i].wait_ms // 1000) for i in denying)
        _log.info(
            "rate limit denied",
            extra={"event": "ratelimit.denied", "request_id": current_request_id(),
                   "policies": violated, "retry_after_s": retry_after, "local": local},
        )
        await self._render.send(
            send,
            status=429,
            type_=QUOTA_EXCEEDED,
            title="Request cannot be satisfied as assigned quota has been exceeded",
            detail=f"Rate limit exceeded ({', '.join(violated)}); retry in {retry_after}s.",
            headers=[(b"retry-after", str(retry_after).encode()), *fields],
            extensions={"violated-policies": violated},
        )

    async def _take(self, plan: _Plan, values: list[str], sent_at: float, send: Send) -> Headers | None:
        """Make the take: the fields the response carries, or None once a 429 or 503 is sent."""
        try:
            decision = await self._store.ratelimit_take(plan.take, values)
        except StoreError as exc:
            return await self._failed(plan, exc, send)
        return await self._decided(plan, values, decision, sent_at, send)

    async def _decided(
        self, plan: _Plan, values: Sequence[str], decision: RateDecision, sent_at: float, send: Send
    ) -> Headers | None:
        """The store's decision: counted and its fields; a denial (by an enforced policy) is
        remembered for the local answers that follow and answered 429 (None)."""
        if plan.shadows:
            self._shadowed(plan, decision, local=False)
        if not decision.allowed:
            self._denials.remember((plan, *values), decision, sent_at, among=plan.enforced)
            await self._deny(plan, decision, send, local=False)
            return None
        for counter in plan.allowed:
            counter.inc()
        return plan.fields(decision)

    def _shadowed(self, plan: _Plan, decision: RateDecision, *, local: bool) -> None:
        """Count the shadow policies as enforcing them would: ``allow`` each when the request
        would pass, ``shadow_deny`` each that lacked its cost (one with room in a request that
        would be denied anyway counts nothing, as an enforced one); log the would-be 429."""
        if decision.would_allow:
            for counter in plan.shadow_allowed:
                counter.inc()
            return
        denying = plan.lacking(decision, plan.shadows)
        if not denying:
            return
        for counter, i in zip(plan.shadow_denied, plan.shadows, strict=False):
            if i in denying:
                counter.inc()
        # the Retry-After a 429 with every policy enforced would carry: all lacking buckets
        waits = [decision.buckets[i].wait_ms for i in plan.lacking(decision, range(len(plan.names)))]
        _log.info(
            "rate limit shadow policy would deny",
            extra={"event": "ratelimit.shadow_denied", "request_id": current_request_id(),
                   "policies": [plan.names[i] for i in denying],
                   "retry_after_s": max(-(-w // 1000) for w in waits),
                   "enforced": "denied" if not decision.allowed else "allowed", "local": local},
        )

    async def _failed(self, plan: _Plan, exc: StoreError, send: Send) -> Headers | None:
        """A store failure, per ``on_store_error``: 503 (None), or fail open with the policy
        field alone (the policy is still true, the remaining count is unknown and not made up)."""
        if self._store_failed(plan, exc):
            await self._store_unavailable(plan, send)
            return None
        return plan.policy_fields()

    def _store_failed(self, plan: _Plan, exc: StoreError) -> bool:
        """Count and log a store failure; True when ``on_store_error`` denies the request (that
        of an enforced policy: a shadow policy never refuses)."""
        action = "deny" if plan.deny_on_error else "allow"
        for counter in plan.errored:
            counter.inc()
        _log.warning(
            "rate limit store failed; %s per on_store_error", action,
            extra={"event": "ratelimit.store_error", "request_id": current_request_id(),
                   "policies": list(plan.names), "action": action, "error": str(exc)},
        )
        return plan.deny_on_error

    async def _store_unavailable(self, plan: _Plan, send: Send) -> None:
        """The 503 of a policy that does not run unchecked."""
        await self._render.send(
            send,
            status=503,
            type_=STORE_UNAVAILABLE,
            title="Rate limit store unavailable",
            detail="The rate limit could not be checked and this route does not run unchecked.",
            headers=[(b"retry-after", _STORE_RETRY_AFTER), *plan.policy_fields()],
        )


class _DeferredTake:
    """A request's take, made in the stack's request context: by itself (``alone``), or by the
    Idempotency-Key layer with its claim (``decided``/``failed``). Either way the outcome is the
    one a take of its own has: a 429 or 503 answered here, or the fields added to the context
    (fail-open: the policy field alone, the remaining count is unknown and not made up)."""

    __slots__ = ("_ctx", "_limiter", "_rules", "_sent_at", "plan", "tags")

    def __init__(
        self, limiter: RateLimitMiddleware, rules: _Plan, tags: list[str], sent_at: float, ctx: RequestContext
    ) -> None:
        self._limiter = limiter
        self._rules = rules
        self.plan = rules.take
        self.tags = tags
        self._sent_at = sent_at
        self._ctx = ctx

    async def alone(self, send: Send) -> bool:
        return self._added(await self._limiter._take(self._rules, self.tags, self._sent_at, send))

    def passed(self, decision: RateDecision) -> bool:
        fields = self._rules.passing_fields(decision)
        if fields is None:
            return False
        self._ctx.response_headers += fields
        return True

    async def decided(self, decision: RateDecision, send: Send) -> bool:
        fields = await self._limiter._decided(self._rules, self.tags, decision, self._sent_at, send)
        return self._added(fields)

    async def failed(self, error: StoreError, send: Send) -> bool:
        return self._added(await self._limiter._failed(self._rules, error, send))

    def _added(self, fields: Headers | None) -> bool:
        if fields is None:
            return False  # answered
        self._ctx.response_headers += fields
        return True
