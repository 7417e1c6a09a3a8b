"""One request's context: made once by the stack's entry layer, added to by every layer after it.

``GatewayMiddleware``'s outermost layer (``entry.py``) puts a ``RequestContext`` in the scope;
the layers inside it read and add to it instead of doing the same work again:

* the headers a decision reads are read once, by the request check's one pass over the header
  list (``HeaderValues``), and identity tags are resolved once from them, by the stack's one
  ``IdentityResolver``, for the rate limit and the Idempotency-Key scope alike;
* the response fields a layer wants added (``RateLimit``, ``RateLimit-Policy``) go into
  ``response_headers``, and the entry's one ``send`` wrapper adds them, with ``X-Request-Id``, at
  ``http.response.start``, where it also counts the response and its timings;
* ``app_start`` is when the request reached the app (or the upstream); ``counted`` is cleared for
  the gateway's own ``/_gateway/*`` answers;
* ``deferred_take`` is a rate-limit take the rate limit left to the Idempotency-Key layer, which
  makes it with its claim in one store call (or alone, before it answers or runs the app).

A layer used alone (no context in its scope) does all of this itself, as before.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from gateway._asgi import Headers, Scope, Send

if TYPE_CHECKING:
    from gateway.errors import StoreError
    from gateway.identity import IdentityResolver
    from gateway.store import RateDecision, TakePlan

__all__ = ["CONTEXT_SCOPE_KEY", "DeferredTake", "HeaderValues", "RequestContext", "context_of"]

#: Where a request's scope carries its ``RequestContext``.
CONTEXT_SCOPE_KEY = "gateway.context"


class HeaderValues:
    """The values of the headers in ``names`` that one request carries, from one pass.

    A name the stack refuses twice (``request_check.decided_headers``) has its one line's value;
    ``x-forwarded-for`` its non-empty lines joined with commas (one list, RFC 9110 §5.3);
    ``content-length`` its last line; ``x-request-id`` its first line, ``request_id_repeated``
    telling whether more followed. A name not in ``names`` was not looked for: a layer that
    needs it reads the header list itself."""

    __slots__ = ("names", "request_id_repeated", "values")

    def __init__(self, names: frozenset[bytes], values: dict[bytes, bytes]) -> None:
        self.names = names
        self.values = values
        self.request_id_repeated = False


class DeferredTake(Protocol):
    """A rate-limit take not made yet: the rate limit's part of a keyed request's admission.

    Its methods answer the request themselves when the rate limit stops it (429, or 503 per
    ``on_store_error``) and return False; True means the request goes on, its ``RateLimit``
    fields added to the context."""

    plan: TakePlan
    tags: list[str]  # per bucket, as ``Store.ratelimit_take`` takes them

    async def alone(self, send: Send) -> bool:
        """Make the take by itself (a store call of its own)."""
        ...

    def passed(self, decision: RateDecision) -> bool:
        """True when ``decision`` lets the request go on with nothing to answer or log (allowed,
        no shadow policy): counted and its fields added, without a coroutine. False: ``decided``
        must act on it."""
        ...

    async def decided(self, decision: RateDecision, send: Send) -> bool:
        """Act on a decision the store made with the claim."""
        ...

    async def failed(self, error: StoreError, send: Send) -> bool:
        """Act on a store failure of the call that carried the take."""
        ...


class RequestContext:
    """What the layers of one stack share about one HTTP request."""

    __slots__ = ("_resolver", "_tags", "app_start", "counted", "deferred_take", "headers", "response_headers",
                 "start")

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.app_start = 0.0  # stays 0 when the gateway answered itself
        self.counted = True
        self.response_headers: Headers = []
        self._resolver: IdentityResolver | None = None
        self._tags: Mapping[str, str] = {}
        self.deferred_take: DeferredTake | None = None
        self.headers: HeaderValues | None = None  # set by the request check

    def take_deferred(self) -> DeferredTake | None:
        """The deferred rate-limit take, once: whoever takes it must make it."""
        deferred, self.deferred_take = self.deferred_take, None
        return deferred

    def tags(self, resolver: IdentityResolver, scope: Scope) -> Mapping[str, str]:
        """Every key tag ``resolver`` knows for this request, resolved on first use only."""
        if self._resolver is not resolver:
            self._tags = resolver.tags(scope, found=self.headers)
            self._resolver = resolver
        return self._tags

    async def tags_async(self, resolver: IdentityResolver, scope: Scope) -> Mapping[str, str]:
        """``tags`` for a resolver that ``awaits`` (an async callable identity source)."""
        if self._resolver is not resolver:
            self._tags = await resolver.tags_async(scope, found=self.headers)
            self._resolver = resolver
        return self._tags


def context_of(scope: Scope) -> RequestContext | None:
    """The request's context, when a stack's entry layer made one."""
    ctx = scope.get(CONTEXT_SCOPE_KEY)
    return ctx if isinstance(ctx, RequestContext) else None
