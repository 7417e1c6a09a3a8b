"""CORS preflights: the browser's own ``OPTIONS`` before a cross-origin request, not the client's.

A browser sends one before a cross-origin request that is not "simple" (Fetch, "CORS-preflight
request": ``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``), and may send it
again for every such request. Charging it to the client's rate limit or holding a concurrency
slot for it would halve what a browser client may do, so by default the limits let it through
(``request.limit_preflights = true`` limits it like any request). It can run nothing but the
upstream's CORS answer.
"""

from __future__ import annotations

from gateway._asgi import Scope

__all__ = ["is_cors_preflight"]

_ORIGIN = b"origin"
_REQUEST_METHOD = b"access-control-request-method"


def is_cors_preflight(scope: Scope) -> bool:
    """Whether the request is a CORS preflight (only ever true for ``OPTIONS``)."""
    if scope["method"] != "OPTIONS":
        return False
    names = {name for name, _ in scope["headers"]}
    return _ORIGIN in names and _REQUEST_METHOD in names
