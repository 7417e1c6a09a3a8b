"""GatewayMiddleware: the whole stack built from one config, sharing one store and one metrics.

Order of a request (DESIGN.md "One request, in order"): the entry (``entry.py``, one layer: the
request id, the request's context, the refusal of ambiguous requests and the normal path
(``request_check.py``), ``/_gateway/*`` (``ops.py``), and the one send wrapper that decorates
and counts every response), then load shedding by priority, then rate limit, then concurrency
limit, then the Idempotency-Key gate, then the app: a denied request is never claimed, and a
replay still counts against the client's rate limit and carries its current RateLimit fields.
For a request the Idempotency-Key layer claims, the rate limit's take is made with the claim, in
one store call where the store can; for any other request a concurrency limit admits, with its
acquire the same way. The layers share one identity resolver, so the context resolves a
request's tags once. Lifespan opens the store at startup (and, once the app has started, freezes
the heap built so far out of the garbage collector's scans); at shutdown, settles that outlived
their requests finish before the store closes. Other non-HTTP scopes pass through untouched.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from gateway._asgi import ASGIApp, Receive, Scope, Send
from gateway._settings import with_identity
from gateway.concurrency import ConcurrencyLimitMiddleware
from gateway.config import Config, SourceFunction, load_config
from gateway.connection_shed import ConnectionShedder
from gateway.entry import StackEntry
from gateway.idempotency import IdempotencyMiddleware
from gateway.identity import IdentityResolver
from gateway.lifespan import SHUTDOWN_DRAIN_S, run_lifespan
from gateway.metrics import Metrics
from gateway.ops import OpsRoutes, UpstreamTimer
from gateway.plans import plan_claims
from gateway.problem import renderer_for
from gateway.ratelimit import RateLimitMiddleware
from gateway.request_check import RequestCheck
from gateway.shedding import LoadSheddingMiddleware
from gateway.store import Store, store_from_config

__all__ = ["METRICS_FOLD_S", "GatewayMiddleware"]

#: How often the hot path's pending counts are folded into the metrics while the app runs.
METRICS_FOLD_S = 1.0


class GatewayMiddleware(StackEntry):
    """The gateway in front of an ASGI app: the stack's entry (``entry.py``) in front of the
    layers this config needs, so a request's first frame is the entry's own.

    Args:
        app: the ASGI app to protect.
        config: a TOML path, a dict of the same shape, a ``Config``, or None for the defaults
            (the embedded ``memory://`` store, no rate limit, idempotency on its defaults).
        store: a store to use instead of the one ``[store]`` describes; its owner opens and
            closes it.
        metrics: the metrics to count in (``gateway serve`` shares one with its proxy); a new
            ``Metrics`` on its own registry when None.
        identity: a callable given the ASGI scope (sync or async), returning the client's
            identity (``str``/``bytes``; None for none): the one identity source, in place of
            ``identity.sources`` (to chain it with others, list it in ``sources`` in a dict config).
        date_header: add ``Date`` to every response without one (``gateway serve`` sets it, since
            it turns uvicorn's off so the upstream's passes through: the gateway's own answers
            and replays then carry one, RFC 9110 §6.6.1). Off in-process: the server adds it.
    """

    def __init__(
        self,
        app: ASGIApp,
        config: str | os.PathLike[str] | Mapping[str, Any] | Config | None = None,
        *,
        store: Store | None = None,
        metrics: Metrics | None = None,
        identity: SourceFunction | None = None,
        date_header: bool = False,
    ) -> None:
        self.config = with_identity(load_config(config), identity)
        self.metrics = metrics if metrics is not None else Metrics(
            (p.name for p in self.config.rate_limits), (c.name for c in self.config.concurrency_limits))
        self._owns_store = store is None
        self.store: Store = (
            store_from_config(self.config.store, metrics=self.metrics) if store is None else store
        )
        # one resolver for every layer: the request context resolves a request's tags once
        keys = (*(p.key for p in self.config.rate_limits), *(c.key for c in self.config.concurrency_limits),
                "identity")
        resolver = IdentityResolver(self.config.identity, keys, claims=plan_claims(self.config.rate_limits))
        # [errors] format: every layer's refusals written by one renderer
        renderer = renderer_for(self.config.errors.format)
        self._idempotency = IdempotencyMiddleware(
            UpstreamTimer(app),
            idempotency=self.config.idempotency,
            identity=self.config.identity,
            store=self.store,
            metrics=self.metrics,
            identity_resolver=resolver,
            renderer=renderer,
            # a claimed request: its take made with the claim, the timer would only stamp it
            direct_app=app,
        )
        inner: ASGIApp = self._idempotency
        claim_methods = frozenset(self.config.idempotency.methods)
        self._concurrency: ConcurrencyLimitMiddleware | None = None
        if self.config.concurrency_limits:
            inner = self._concurrency = ConcurrencyLimitMiddleware(
                inner,
                concurrency_limit=self.config.concurrency_limits,
                identity=self.config.identity,
                store=self.store,
                metrics=self.metrics,
                identity_resolver=resolver,
                claim_methods=claim_methods,
                limit_preflights=self.config.request.limit_preflights,
                renderer=renderer,
            )
        if self.config.rate_limits:
            inner = RateLimitMiddleware(
                inner,
                rate_limit=self.config.rate_limits,
                identity=self.config.identity,
                store=self.store,
                metrics=self.metrics,
                identity_resolver=resolver,
                # their take is made with the claim, one store call for both (ratelimit.py)
                claim_methods=claim_methods,
                # and any other, with a concurrency limit's acquire (concurrency.py)
                defer_every_take=self._concurrency is not None,
                limit_preflights=self.config.request.limit_preflights,
                rate_limit_headers=self.config.response.rate_limit_headers,
                renderer=renderer,
                # a request it takes for itself passes every layer inside untouched: to the app
                direct_app=app if self._concurrency is None else None,
            )
        shedding = self.config.shedding
        self._shedding: LoadSheddingMiddleware | None = None
        if shedding.local.enabled or shedding.fleet.enabled:  # first: a shed request costs nothing more
            inner = self._shedding = LoadSheddingMiddleware(
                inner, config=self.config, store=self.store, metrics=self.metrics)
        self.app = app
        check = RequestCheck(self.config, metrics=self.metrics)
        ops = OpsRoutes(store=self.store, metrics=self.metrics, config=self.config.ops,
                        trusted_proxies=self.config.identity.trusted_proxies)
        #: what ``gateway serve``'s connection asks before a request reaches this stack (the
        #: local shedder's early refusal, ``connection_shed.py``); None when it has nothing to shed
        self.connection_shedder: ConnectionShedder | None = None
        local = self._shedding.local if self._shedding is not None else None
        if self._shedding is not None and local is not None and shedding.local.mode == "enforce":
            self.connection_shedder = ConnectionShedder(self._shedding, local, check, ops, self.metrics,
                                                        date_header=date_header)
        super().__init__(
            inner,
            metrics=self.metrics,
            check=check,
            ops=ops,
            date_header=date_header,
        )

    async def not_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan" and self._owns_store:
            await run_lifespan(self._inner, scope, receive, send, self.store, before_close=self._drain,
                               after_startup=self._started)
            return
        await self._inner(scope, receive, send)

    def _started(self) -> None:
        # pending counts reach the registry at least once a second (a scrape in another worker)
        self.metrics.tallies.fold_every(METRICS_FOLD_S)

    async def _drain(self) -> None:
        await self._idempotency.drain(SHUTDOWN_DRAIN_S)
        if self._concurrency is not None:
            await self._concurrency.drain(SHUTDOWN_DRAIN_S)
        if self._shedding is not None:
            await self._shedding.drain(SHUTDOWN_DRAIN_S)
        self.metrics.tallies.stop_folding()
