"""A claim's life after ``new``: renewed while its request runs, then settled exactly once.

Renewal: every ``lock_ttl / 3`` the holder extends its lease, so a request may run however long
it takes; a holder that dies stops renewing and its claim is lost ``lock_ttl`` later. One timer
(``gateway.renewals.Renewals``) serves every lease of a middleware, so a request shorter than a third of
``lock_ttl`` costs no timer of its own. A renewal the store does not answer (an outage) is
tried again on the next turn: only the store saying "not yours" gives a claim up.

Settling: ``complete`` stores the outcome, ``release`` frees the key (the request never reached
the upstream). A store error is retried with backoff until the caller's deadline, whatever the
local view of the lease says: the scripts accept a holder's settle after its lease lapsed,
fenced by its owner token, so trying longer can only make the record tell the truth.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, Literal

from gateway.errors import StoreError
from gateway.renewals import Renewals
from gateway.requestid import current_request_id
from gateway.store import LeaseTerms, Store, StoredResponse

__all__ = ["MAX_ATTEMPTS", "Lease", "Renewals", "Settled"]

_log = logging.getLogger("gateway.idempotency")
#: How one settle ends: stored (or freed); refused (the record is not this owner's claim any
#: more); unanswered (the store did not answer in time: the outcome is not stored yet).
Settled = Literal["stored", "refused", "unanswered"]
#: The most store calls one settle makes (each bounded by ``store.timeout``).
MAX_ATTEMPTS = 60
_FIRST_BACKOFF_S = 0.05
_MAX_BACKOFF_S = 2.0


class Lease:
    """The claim ``owner`` holds on ``record``, from the moment the store granted it."""

    __slots__ = ("_interval_s", "_loop", "_owner", "_record", "_renewals", "_renewing", "_store", "_terms",
                 "late", "lost", "settled")

    def __init__(
        self, store: Store, record: str, owner: bytes, terms: LeaseTerms, *, renewals: Renewals,
    ) -> None:
        self._store = store
        self._record = record
        self._owner = owner
        self._terms = terms
        self._loop = asyncio.get_running_loop()
        self._interval_s = terms.lock_ttl_ms / 3000
        self._renewing: asyncio.Task[None] | None = None
        self._renewals = renewals
        renewals.add(self, self._loop.time() + self._interval_s)
        self.lost = False
        self.settled = False
        self.late = False  # a settle goes on in the background, beyond the request

    def renew_now(self) -> None:
        """Extend the lease (``Renewals`` calls this when it is due)."""
        self._renewing = self._loop.create_task(self._renew())

    async def _renew(self) -> None:
        try:
            held = await self._store.idempotency_renew(self._record, self._owner, self._terms)
        except StoreError as exc:
            _log.warning("idempotency claim not renewed; trying again", extra={
                "event": "idempotency.renew_failed", "error": str(exc), "request_id": current_request_id()})
            held = True  # not answered is not "lost": the claim is still ours until the store says so
        self._renewing = None
        if not held:
            if not self.settled:
                self._lost()
            return
        if not self.settled:
            self._renewals.add(self, self._loop.time() + self._interval_s)

    def _lost(self) -> None:
        self.lost = True
        _log.warning("idempotency claim is not this request's any more", extra={
            "event": "idempotency.claim_lost", "request_id": current_request_id()})

    def stop(self) -> None:
        """Stop renewing (the request is settled, or it is abandoned to lapse)."""
        self.settled = True
        self._renewals.discard(self)
        if self._renewing is not None:
            self._renewing.cancel()
            self._renewing = None

    def complete(self, response: StoredResponse, within_s: float) -> Coroutine[Any, Any, Settled]:
        """Store ``response`` as the outcome, trying for at most ``within_s``."""
        return self._settle("complete", response, within_s)

    def release(self, within_s: float) -> Coroutine[Any, Any, Settled]:
        """Free the key (the request never reached the upstream), trying for at most ``within_s``."""
        return self._settle("release", None, within_s)

    async def _settle(self, action: str, response: StoredResponse | None, within_s: float) -> Settled:
        """One settle, resent with backoff while the store does not answer (a resend by the same
        owner is recognised by the scripts); bounded by ``within_s`` and ``MAX_ATTEMPTS``."""
        give_up_at = self._loop.time() + within_s
        backoff = _FIRST_BACKOFF_S
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                if response is not None:
                    done = await self._store.idempotency_complete(
                        self._record, self._owner, response, self._terms)
                else:
                    done = await self._store.idempotency_release(self._record, self._owner, self._terms)
            except StoreError as exc:
                last_chance = attempt == MAX_ATTEMPTS or self._loop.time() + backoff >= give_up_at
                _log.warning("idempotency %s failed; %s", action, "not now" if last_chance else "retrying",
                             extra={"event": f"idempotency.{action}_failed", "attempt": attempt,
                                    "error": str(exc), "request_id": current_request_id()})
                if last_chance:
                    return "unanswered"
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
                continue
            self.stop()
            if not done:
                self._lost()
                return "refused"
            return "stored"
        return "unanswered"  # unreachable: the last attempt returns
