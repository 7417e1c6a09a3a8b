"""Per-plan limits: which ``plans`` entry of a rate-limit policy applies to a request.

A policy with ``plan`` (where the client's plan is read) and ``plans`` (each plan's ``limit``,
``burst`` and ``cost``) decides a request with the numbers of the client's plan; a client on no
listed plan (no value, an unknown name, a token that does not verify) gets the policy's own.
The plan is read from:

* ``jwt:CLAIM``: a claim of the request's bearer JWT, verified as the ``jwt:`` identity sources
  are (``bearer.py``; one verification and one cache entry serve both);
* ``header:NAME``: a header set by a proxy in ``identity.trusted_proxies``, believed only when the
  direct peer is one (a client could otherwise name its own plan);
* a callable (in-process), given the ASGI scope, sync or async.

``RateLimitMiddleware`` compiles each policy's plans once; per request, ``PlanChooser.applied``
gives the plan that applies to each matched policy, and the middleware picks the compiled
decision plan of that combination (one per combination that occurs: bounded by the config).

The bucket is the client's, whatever its plan: a client that upgrades mid-window keeps the whole
tokens it has (capped at the new ``burst``) and refills at the new rate from its next request
on; one that downgrades is capped at the smaller ``burst`` at once. No plan change can hand a
client a fresh full bucket (``lua/ratelimit_take.lua`` keeps whole tokens across a changed unit).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from gateway.config import RateLimitPolicy
from gateway.context import HeaderValues
from gateway.identity import IdentityResolver, header_name

__all__ = ["PlanChooser", "plan_claims", "plan_headers"]

_log = logging.getLogger("gateway.plans")
_MAX_PLAN = 64  # plan names are at most 64 characters (config): a longer value names none


def plan_claims(policies: Sequence[RateLimitPolicy]) -> tuple[str, ...]:
    """The JWT claims the policies' plans are read from."""
    return tuple(dict.fromkeys(p.plan[len("jwt:"):] for p in policies
                               if isinstance(p.plan, str) and p.plan.startswith("jwt:")))


def plan_headers(policies: Sequence[RateLimitPolicy]) -> set[bytes]:
    """The request headers the policies' plans are read from (each a decided header)."""
    return {header_name(p.plan) for p in policies if isinstance(p.plan, str) and p.plan.startswith("header:")}


class _Reader:
    """One plan source, compiled."""

    __slots__ = ("awaits", "claim", "fn", "header")

    def __init__(self, source: Any) -> None:
        import inspect

        self.claim = ""
        self.header = b""
        self.fn = None
        self.awaits = False
        if callable(source):
            self.fn = source
            self.awaits = inspect.iscoroutinefunction(source) or inspect.iscoroutinefunction(
                getattr(source, "__call__", None))  # noqa: B004 - an object whose __call__ is async
        elif source.startswith("jwt:"):
            self.claim = source[len("jwt:"):]
        else:
            self.header = header_name(source)


class PlanChooser:
    """The plans of a middleware's policies (in config order), and which applies per request.

    Args:
        policies: the middleware's policies; those without ``plans`` always use their own numbers.
        resolver: the identity resolver whose JWT verifier and trusted proxies plans use.
    """

    __slots__ = ("_names", "_readers", "_resolver", "awaits")

    def __init__(self, policies: Sequence[RateLimitPolicy], resolver: IdentityResolver) -> None:
        self._resolver = resolver
        readers: dict[Any, _Reader] = {}  # one per distinct source: read once per request
        self._readers: tuple[_Reader | None, ...] = tuple(
            readers.setdefault(p.plan, _Reader(p.plan)) if p.plans and p.plan is not None else None
            for p in policies)
        self._names = tuple(frozenset(x.name for x in p.plans) for p in policies)
        self.awaits = any(r.awaits for r in readers.values())

    def applied(
        self, matched: Sequence[int], scope: Mapping[str, Any], found: HeaderValues | None
    ) -> tuple[str | None, ...] | None:
        """Per matched policy, the plan that applies (None: its own numbers); None when no
        matched policy has plans or none applies."""
        return self._applied(matched, self._values(matched, scope, found, {}))

    async def applied_async(
        self, matched: Sequence[int], scope: Mapping[str, Any], found: HeaderValues | None
    ) -> tuple[str | None, ...] | None:
        """``applied``, awaiting the async callable plan sources."""
        called: dict[int, str | None] = {}
        for i in matched:
            reader = self._readers[i]
            if reader is not None and reader.awaits and id(reader) not in called:
                assert reader.fn is not None
                try:
                    called[id(reader)] = _name(await reader.fn(scope))
                except Exception:  # the app's code: logged; the policy's own numbers apply
                    _failed(reader)
                    called[id(reader)] = None
        return self._applied(matched, self._values(matched, scope, found, called))

    def _applied(
        self, matched: Sequence[int], values: dict[int, str | None]
    ) -> tuple[str | None, ...] | None:
        out: list[str | None] = []
        for i in matched:
            reader = self._readers[i]
            value = values.get(id(reader)) if reader is not None else None
            out.append(value if value is not None and value in self._names[i] else None)
        return tuple(out) if any(v is not None for v in out) else None

    def _values(
        self, matched: Sequence[int], scope: Mapping[str, Any], found: HeaderValues | None,
        values: dict[int, str | None],
    ) -> dict[int, str | None]:
        """Each matched policy's plan source read once: ``values`` by ``id(reader)``."""
        headers: Mapping[bytes, bytes] | None = None
        for i in matched:
            reader = self._readers[i]
            if reader is None or id(reader) in values:
                continue
            value: str | None = None
            if reader.fn is not None:
                try:
                    value = _name(reader.fn(scope))
                except Exception:  # the app's code: logged; the policy's own numbers apply
                    _failed(reader)
            elif reader.claim:
                if headers is None:
                    headers = self._resolver.header_values(scope, found)
                claims = self._resolver.claims(headers)
                value = claims.get(reader.claim) if claims else None
            elif self._resolver.peer_trusted(scope):  # a header plan: only a trusted proxy's word
                raw = _header(scope, found, reader.header)
                value = raw.decode("latin-1") if raw and len(raw) <= _MAX_PLAN else None
            values[id(reader)] = value
        return values


def _header(scope: Mapping[str, Any], found: HeaderValues | None, name: bytes) -> bytes | None:
    if found is not None and name in found.names:
        return found.values.get(name)
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def _name(value: object) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return value if isinstance(value, str) and value else None


def _failed(reader: _Reader) -> None:
    source = getattr(reader.fn, "__qualname__", repr(reader.fn))
    _log.warning("plan source raised; the policy's own numbers apply", exc_info=True,
                 extra={"event": "plans.source_error", "source": source})
