"""Per-route limits beside the route: a FastAPI dependency and a Starlette endpoint decorator.

    limits = RouteLimits(store="redis://127.0.0.1:6379/0")
    limits.install(app)     # the 429/503 problem handler, the fields, the store's lifespan

    @app.post("/charges", dependencies=[Depends(limits.limit("10/minute", name="create-charge"))])
    async def create_charge(): ...

    @limits.decorate("5/minute", name="report")      # Starlette: an endpoint taking the request
    async def report(request): ...

Each limit is one ``[[rate_limit]]`` policy (``"10/minute"`` is ``limit = 10, period = "1m"``;
every other key as in the config, ``plan``/``plans`` included) decided by a
``RateLimitMiddleware`` of its own on the ``RouteLimits``' one store: the same script, the same
local denial cache, the same ``RateLimit``/``RateLimit-Policy`` fields and the same 429
(``quota-exceeded``) and 503 problem responses, written by ``problem.py``. It is not a second
limiter: the route's check runs that middleware on the request's scope, in front of a terminal
app that only notes the request was let through (and collects the fields the middleware adds).

The policy's ``name`` keys its buckets (``{prefix}:v1:rl:{tag}:name``): two routes with one name
share a bucket, so names are unique per ``RouteLimits``; a limit without one is named
``route-N`` in the order limits are made (the same in every process running the same code).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import inspect
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from gateway._asgi import ASGIApp, Headers, Message, Receive, Scope, Send
from gateway._config_read import identity_source
from gateway._settings import ConfigSetting, StoreSetting, resolve
from gateway.config import IdentityConfig, RateLimitPolicy, SourceFunction, load_config
from gateway.context import CONTEXT_SCOPE_KEY
from gateway.errors import ConfigError
from gateway.metrics import Metrics
from gateway.problem import renderer_for
from gateway.ratelimit import RateLimitMiddleware

__all__ = ["RateLimitExceeded", "RouteLimit", "RouteLimits"]

_SPEC = re.compile(r"\s*([0-9]+)\s*/\s*([0-9A-Za-z.]+)\s*")
_UNITS = {"second": "1s", "seconds": "1s", "minute": "1m", "minutes": "1m", "hour": "1h", "hours": "1h",
          "day": "1d", "days": "1d", "s": "1s", "m": "1m", "h": "1h", "d": "1d"}
_ALLOWED = "gateway.route_allowed"  # scope key: the check's terminal app was reached
_FIELDS = "gateway.route_fields"  # scope key: fields for ``install``'s layer to add to the response
Endpoint = Callable[[Request], Any]


class RateLimitExceeded(Exception):
    """Raised by a route's dependency when the limit refuses the request: ``response`` is the
    gateway's problem+json answer (429, or 503 per ``on_store_error``), with its headers."""

    def __init__(self, response: Response) -> None:
        super().__init__(f"rate limit refused the request ({response.status_code})")
        self.response = response


class RouteLimits:
    """The store, identity and metrics that a set of per-route limits share.

    Args:
        store: a store URL, ``[store]`` dict or ``StoreConfig`` (owned: opened at startup by
            ``install``'s lifespan, or at the first request, and closed at shutdown), or a
            ``Store`` shared with a ``GatewayMiddleware`` (``gw.store``; its owner opens it).
        identity: the ``[identity]`` section, or a callable given the scope (the one source).
        config: a whole config (path, dict, ``Config``) to take ``[store]``, ``[identity]`` and
            ``[request]`` from, instead of ``store``/``identity``.
        metrics: where decisions are counted (``gw.metrics`` to count with a stack); none when None.
    """

    def __init__(
        self,
        *,
        store: StoreSetting = None,
        identity: Mapping[str, Any] | IdentityConfig | SourceFunction | None = None,
        config: ConfigSetting = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.config, self.store, self._owns_store = resolve(config=config, identity=identity, store=store)
        self._metrics = metrics
        self._names: set[str] = set()
        self._opened = False
        self._opening = asyncio.Lock()

    def limit(self, spec: str | None = None, *, name: str | None = None, **policy: Any) -> RouteLimit:
        """A limit for one route: ``spec`` is ``"N/unit"`` (``second``, ``minute``, ``hour``,
        ``day``) or ``"N/<duration>"`` (``"100/5m"``); ``policy`` any other ``[[rate_limit]]``
        key (``burst``, ``cost``, ``key``, ``plan``, ``plans``, ``mode``, ``on_store_error``).
        Raises ``ConfigError`` (one line per problem) for a bad one, ``ValueError`` for a name
        already used."""
        entry: dict[str, Any] = dict(policy)
        if spec is not None:
            entry.update(_parse_spec(spec))
        entry["name"] = name or f"route-{len(self._names) + 1}"
        if entry["name"] in self._names:
            msg = f"a route limit named {entry['name']!r} exists: its buckets would be shared; name each one"
            raise ValueError(msg)
        for key in ("paths", "methods", "exempt_paths", "exempt_methods"):
            if key in entry:
                msg = f"{key} is the route's business: a route limit applies to every request of its route"
                raise TypeError(msg)
        parsed = _policy(self.config.identity, entry)
        self._names.add(parsed.name)
        return RouteLimit(self, parsed)

    def decorate(self, spec: str | None = None, *, name: str | None = None, **policy: Any
                 ) -> Callable[[Endpoint], Callable[[Request], Awaitable[Response]]]:
        """A Starlette endpoint decorator of ``limit(spec, name=..., **policy)``."""
        return self.limit(spec, name=name, **policy).wrap

    def install(self, app: Any) -> None:
        """Make ``app`` (FastAPI or Starlette, before it starts) answer a refusal with the
        gateway's problem response, add the ``RateLimit`` fields to every limited route's
        response, and open and close the store with its lifespan."""
        app.add_exception_handler(RateLimitExceeded, _problem_response)
        app.add_middleware(_RouteFields)
        router = app.router
        inner = router.lifespan_context

        @contextlib.asynccontextmanager
        async def lifespan(app_: Any) -> AsyncIterator[Any]:
            await self.open()
            try:
                async with inner(app_) as state:
                    yield state
            finally:
                await self.close()

        router.lifespan_context = lifespan

    async def open(self) -> None:
        """Open an owned store (once; ``install``'s lifespan, or the first request, calls it)."""
        if self._opened or not self._owns_store:
            return
        async with self._opening:
            if not self._opened:
                await self.store.open()
                self._opened = True

    async def close(self) -> None:
        """Close an owned store."""
        if self._opened:
            self._opened = False
            await self.store.close()


class RouteLimit:
    """One route's limit: a FastAPI dependency (``Depends(limit)``) and, through ``wrap``, a
    Starlette endpoint decorator."""

    def __init__(self, owner: RouteLimits, policy: RateLimitPolicy) -> None:
        self.policy = policy
        self._owner = owner
        self._limiter = RateLimitMiddleware(
            _reached, rate_limit=[policy], identity=owner.config.identity, store=owner.store,
            metrics=owner._metrics, limit_preflights=owner.config.request.limit_preflights,
            rate_limit_headers=owner.config.response.rate_limit_headers,
            renderer=renderer_for(owner.config.errors.format))

    async def check(self, scope: Scope) -> tuple[Headers, Response | None]:
        """Decide ``scope``'s request: (the fields for its response, None) when it may go on;
        (the fields, the problem response) when the limit refused it."""
        await self._owner.open()
        allowed: list[bool] = []
        # the middleware alone, never a stack's context: its fields come back to us
        own = {k: v for k, v in scope.items() if k != CONTEXT_SCOPE_KEY}
        own[_ALLOWED] = allowed
        start: Message = {}
        body: list[bytes] = []

        async def capture(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
            elif message["type"] == "http.response.body":
                body.append(message.get("body", b""))

        await self._limiter(own, _no_body, capture)
        headers: Headers = list(start.get("headers", ()))
        if allowed:
            return headers, None
        response = Response(b"".join(body), status_code=start.get("status", 500))
        response.raw_headers = headers  # as problem.py wrote them: content type and length included
        return headers, response

    async def __call__(self, request: Request, response: Response) -> None:
        """The FastAPI dependency: raises ``RateLimitExceeded`` with the problem response when
        the limit refuses the request; else its ``RateLimit`` fields go on the response."""
        fields, refused = await self.check(request.scope)
        if refused is not None:
            raise RateLimitExceeded(refused)
        pending = request.scope.get(_FIELDS)
        if isinstance(pending, list):
            pending.extend(fields)  # install's layer adds them, whatever the endpoint returns
        else:
            for name, value in fields:  # FastAPI merges these when the endpoint returns data
                response.headers.append(name.decode("latin-1"), value.decode("latin-1"))

    def wrap(self, endpoint: Endpoint) -> Callable[[Request], Awaitable[Response]]:
        """``endpoint`` (a Starlette endpoint taking the request, sync or async) behind this limit."""
        is_async = inspect.iscoroutinefunction(endpoint)

        @functools.wraps(endpoint)
        async def limited(request: Request) -> Response:
            fields, refused = await self.check(request.scope)
            if refused is not None:
                return refused
            if is_async:
                response: Response = await endpoint(request)
            else:
                from starlette.concurrency import run_in_threadpool

                response = await run_in_threadpool(endpoint, request)
            response.raw_headers.extend(fields)
            return response

        return limited


def _policy(identity: IdentityConfig, entry: dict[str, Any]) -> RateLimitPolicy:
    """``entry`` checked as a ``[[rate_limit]]`` table is, its ``plan`` against ``identity``."""
    plan = entry.get("plan")
    if plan is not None:
        entry = {**entry, "plan": "header:x-route-plan"}  # a stand-in: the real one is checked below
    trusting = {"trusted_proxies": ["127.0.0.1/32"]}  # so the stand-in passes
    (parsed,) = load_config({"identity": trusting, "rate_limit": [entry]}).rate_limits
    if plan is None or callable(plan):
        return dataclasses.replace(parsed, plan=plan)
    source = identity_source(plan)
    if source is None or not source.startswith(("jwt:", "header:")):
        problem = f'expected "jwt:CLAIM", "header:NAME" or a callable, got {plan!r}'
    elif source.startswith("jwt:") and identity.jwt is None:
        problem = f"{source!r} needs [identity.jwt]: the algorithms and the key that verify the token"
    elif source.startswith("header:") and not identity.trusted_proxies:
        problem = f"{source!r} is believed only from identity.trusted_proxies, and there are none"
    else:
        return dataclasses.replace(parsed, plan=source)
    raise ConfigError([f"rate_limit[0].plan: {problem}"])


def _parse_spec(spec: str) -> dict[str, Any]:
    match = _SPEC.fullmatch(spec) if isinstance(spec, str) else None
    if match is None:
        raise ConfigError([f'limit: expected "N/second", "N/minute", "N/hour", "N/day" or "N/<duration>" '
                           f'(e.g. "100/5m"), got {spec!r}'])
    unit = match.group(2)
    return {"limit": int(match.group(1)), "period": _UNITS.get(unit.lower(), unit)}


async def _reached(scope: Scope, receive: Receive, send: Send) -> None:
    """The check's terminal app: the limit let the request through (its fields are on this start)."""
    scope[_ALLOWED].append(True)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def _no_body() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _problem_response(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RateLimitExceeded)
    return exc.response


class _RouteFields:
    """``install``'s layer: the fields route limits leave in the scope go on the response start."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        fields: Headers = []
        scope[_FIELDS] = fields

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start" and fields:
                message["headers"] = [*message.get("headers", ()), *fields]
            await send(message)

        await self.app(scope, receive, sending)
