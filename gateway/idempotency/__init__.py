"""Idempotency-Key deduplication: ``IdempotencyMiddleware`` and the hook a proxy app uses.

Modules: ``request`` (key syntax, body buffer, fingerprint, record name), ``capture`` (keep a
streaming response, replay it), ``lease`` (renew, then settle once), ``problems`` (the layer's
own answers), ``middleware`` (the flow).
"""

from __future__ import annotations

from gateway.idempotency.middleware import IdempotencyMiddleware, mark_not_sent, mark_outcome_unknown

__all__ = ["IdempotencyMiddleware", "mark_not_sent", "mark_outcome_unknown"]
