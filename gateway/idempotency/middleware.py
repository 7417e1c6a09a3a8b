"""IdempotencyMiddleware: a keyed request runs at most once; its retries get its response.

Per keyed request (configured method, key header present): check the key (400), buffer the
body (413 past ``max_body_bytes``), fingerprint it, and claim the record in one store call. In
``GatewayMiddleware`` that call also carries the request's rate-limit take, left to this layer in
the request context (``Store.ratelimit_take_claim``: the claim is made only when every bucket
is charged); where the store cannot combine them, and before any answer of this layer's own,
the take is made first, by itself, as the rate limit would have made it. Then:

* ``new``: run the app with the body replayed through ``receive`` (then the real ``receive``,
  so disconnects still arrive) while ``Capture`` streams the response out and keeps it; the
  lease is renewed while the app runs; the outcome is stored before the last byte goes out.
* ``in_flight`` → 409 with ``Retry-After``; ``mismatch`` → 422; ``done`` → the stored response,
  replayed without calling the app; ``unknown`` (a lost claim) → 502 outcome unknown.

Whatever happens after a claim, a retry never runs the request a second time: an exception
from the app or a response that broke off is stored as outcome unknown (502); a response too
large to keep is stored as its status plus a ``response-not-stored`` problem. What a client
is told is what its retries get: a store failure while completing is retried for up to
``completion_timeout`` with the response's end held back; past that the response is cut off
and the holder goes on trying in the background (``LATE_SETTLE_S``), its late outcome
replacing an outcome-unknown record its lapsed claim became. Only an app that says the
upstream was certainly never reached (``mark_not_sent``) frees the key for a retry; so does a
claim call that timed out (503): it may have been granted or still be on its way, and nothing
ran under it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from random import getrandbits
from typing import TYPE_CHECKING, Any, TypeVar

from gateway._asgi import ASGIApp, Receive, Scope, Send
from gateway._paths import PathPrefixes
from gateway._settings import ConfigSetting, StoreSetting, resolve
from gateway.config import IdempotencyConfig, IdentityConfig, SourceFunction
from gateway.context import DeferredTake, context_of
from gateway.errors import StoreError, StoreScriptError, StoreUnanswered
from gateway.idempotency import problems
from gateway.idempotency.canonical import canonical_json
from gateway.idempotency.capture import Capture, send_replay
from gateway.idempotency.lease import Lease, Renewals, Settled
from gateway.idempotency.request import (
    BodyTooLarge,
    ClientGone,
    fingerprint,
    is_json_media_type,
    parse_key,
    read_body,
    record_name,
    replaying,
)
from gateway.identity import ANONYMOUS_TAG, IdentityResolver
from gateway.lifespan import SHUTDOWN_DRAIN_S, run_lifespan
from gateway.problem import Renderer, renderer_for
from gateway.requestid import (
    bind_request_id,
    current_request_id,
    sending_request_id,
    take_request_id,
    unbind_request_id,
)
from gateway.store import Claim, LeaseTerms, Store

if TYPE_CHECKING:
    from gateway.metrics import Metrics
    from gateway.tallies import CounterTally

__all__ = ["ATTEMPT_SCOPE_KEY", "IdempotencyMiddleware", "mark_not_sent", "mark_outcome_unknown"]

_log = logging.getLogger("gateway.idempotency")
#: Where a keyed request's scope carries its attempt, for ``mark_not_sent``.
ATTEMPT_SCOPE_KEY = "gateway.idempotency"
# tries to free a claim whose grant was never heard: backoff from 50 ms doubling to 2 s, 40 tries
_FREE_FIRST_BACKOFF_S = 0.05
_FREE_MAX_BACKOFF_S = 2.0
_FREE_MAX_TRIES = 40
#: With notices, the longest a waiting duplicate goes without looking at the record itself
#: (a notice lost with a broken connection costs at most this).
SAFETY_LOOK_S = 5.0
#: Without notices (a Redis Cluster), it looks after 50 ms, doubling to this.
MAX_POLL_S = 1.0
_FIRST_POLL_S = 0.05
_LEASE_MARGIN_S = 0.05  # a lease's end as the store sees it, plus its clock's rounding
#: How long a settle goes on in the background once ``completion_timeout`` has passed (at most
#: ``lease.MAX_ATTEMPTS`` store calls): the holder's outcome still lands after a long outage.
LATE_SETTLE_S = 120.0
_CONTENT_LENGTH = b"content-length"
_CONTENT_TYPE = b"content-type"
# extensions that send a response without body messages, which Capture could not keep
_BODYLESS_EXTENSIONS = ("http.response.pathsend", "http.response.zerocopysend")


_T = TypeVar("_T")
# a lease's complete (of one response) or release, given how long it may try
_Settling = Callable[[float], Awaitable[Settled]]

# gateway_idempotency_outcomes_total: what each claim outcome counts as
_OUTCOME_METRIC = {"new": "executed", "done": "replayed", "unknown": "replayed", "in_flight": "in_flight",
                   "mismatch": "mismatch"}


class _Attempt:
    """What the app below tells the idempotency layer about a claimed request."""

    __slots__ = ("not_sent", "outcome_unknown")

    def __init__(self) -> None:
        self.not_sent = False
        self.outcome_unknown = False


def mark_not_sent(scope: Scope) -> None:
    """Say that this request certainly never reached the upstream (e.g. connection refused).

    The claim is then released instead of completed, and a retry runs the request. Call it
    before sending the response; it does nothing outside a keyed request.
    """
    attempt = scope.get(ATTEMPT_SCOPE_KEY)
    if isinstance(attempt, _Attempt):
        attempt.not_sent = True


def mark_outcome_unknown(scope: Scope) -> None:
    """Say that the response about to be sent is the gateway's own outcome-unknown answer (the
    upstream timed out or broke after the request was sent): it is stored whatever its status,
    never released by ``release_statuses``. It does nothing outside a keyed request."""
    attempt = scope.get(ATTEMPT_SCOPE_KEY)
    if isinstance(attempt, _Attempt):
        attempt.outcome_unknown = True


class IdempotencyMiddleware:
    """Pure ASGI Idempotency-Key deduplication, decided atomically in the store.

    Args:
        app: the ASGI app to protect.
        idempotency: the ``[idempotency]`` section (dict or ``IdempotencyConfig``).
        identity: the ``[identity]`` section: keys are scoped to the client it names; or a
            callable given the ASGI scope (sync or async) returning the client's identity (None
            for none): the one source.
        store: a store URL, a ``[store]`` dict or ``StoreConfig`` (the middleware then owns the
            store and opens/closes it with the lifespan), or a ``Store`` shared with others.
        metrics: where outcomes are counted (``GatewayMiddleware`` passes its own); none when None.
        identity_resolver: the resolver to take the identity tag from; ``GatewayMiddleware``
            passes the one its layers share, so the request context resolves it once per request.
        config: a whole config (TOML path, dict, ``Config``) to take ``[idempotency]``,
            ``[identity]`` and ``[store]`` from, instead of the keywords above.
        renderer: how the layer's own answers (and stored outcome-unknown records) look
            (``gateway/problem.py``); from ``[errors] format`` when None.
        direct_app: ``GatewayMiddleware`` passes the app itself (``app`` being its timer): a
            claimed request, whose rate-limit take this layer has made, is handed straight to
            it, noted in the request's context as handed to the app, a frame shorter.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        idempotency: Mapping[str, Any] | IdempotencyConfig | None = None,
        identity: Mapping[str, Any] | IdentityConfig | SourceFunction | None = None,
        store: StoreSetting = None,
        metrics: Metrics | None = None,
        identity_resolver: IdentityResolver | None = None,
        config: ConfigSetting = None,
        renderer: Renderer | None = None,
        direct_app: ASGIApp | None = None,
    ) -> None:
        config_, self._store, self._owns_store = resolve(
            config=config, idempotency=idempotency, identity=identity, store=store
        )
        config = config_
        self.app = app
        self._direct_app = direct_app
        settings = config.idempotency
        self._header_display = settings.header
        self._header = settings.header.lower().encode("latin-1")
        self._methods = settings.methods
        self._required = PathPrefixes(settings.required_paths)
        self._limit = settings.max_body_bytes
        self._deny_on_error = settings.on_store_error == "deny"
        self._terms = LeaseTerms.from_config(settings)
        self._completion_timeout_s = settings.completion_timeout_s
        self._json_fingerprint = settings.fingerprint == "json"
        self._release_statuses = settings.release_statuses
        self._wait_s = settings.wait_timeout_s if settings.on_in_flight == "wait" else 0.0
        self._render = renderer or renderer_for(config.errors.format)
        self._resolver = identity_resolver or IdentityResolver(config.identity, ("identity",))
        # settles that outlive their request (shielded, or cancelled mid-settle)
        self._settling: set[asyncio.Task[Any]] = set()
        self._renewals = Renewals()
        self._outcomes: Mapping[str, CounterTally] = metrics.outcome if metrics is not None else {}

    @property
    def store(self) -> Store:
        return self._store

    async def drain(self, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) for settles that outlived their requests; True when none
        is left. Called at shutdown, before the store closes, so no claim is left to lapse."""
        if self._settling:
            await asyncio.wait(set(self._settling), timeout=timeout_s)
        return not self._settling

    def _count(self, outcome: str) -> None:
        counter = self._outcomes.get(outcome)
        if counter is not None:
            counter.inc()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in self._methods:
            if scope["type"] == "lifespan" and self._owns_store:
                # settles that outlived their requests finish before the store it owns closes
                await run_lifespan(self.app, scope, receive, send, self._store,
                                   before_close=lambda: self.drain(SHUTDOWN_DRAIN_S))
            else:
                await self.app(scope, receive, send)
            return
        ctx = context_of(scope)
        deferred = ctx.take_deferred() if ctx is not None else None
        raw_key = None
        lines = 0
        length = b""
        wanted = self._header
        found = ctx.headers if ctx is not None else None
        if found is not None and wanted in found.names:  # read once by the stack's request check
            raw_key = found.values.get(wanted)
            lines = 0 if raw_key is None else 1  # a second line was refused there
            length = found.values.get(_CONTENT_LENGTH, b"")
        else:
            for name, value in scope["headers"]:
                if name == wanted:
                    raw_key = value
                    lines += 1
                elif name == _CONTENT_LENGTH:
                    length = value
        if raw_key is None:
            if deferred is not None and not await deferred.alone(send):
                return  # the rate limit answered
            if self._required and self._required.matches(scope["path"]):
                self._count("invalid")
                await problems.send_missing_key(self._render, send, self._header_display)
            else:
                await self.app(scope, receive, send)
            return
        if ctx is None and current_request_id() is None:
            # alone, with no request-id layer outside: every answer to a keyed request carries
            # its X-Request-Id, the first response and its replays alike (as in the stack)
            rid, scope = take_request_id(scope)
            token = bind_request_id(rid, scope)
            try:
                await self._checked(scope, receive, sending_request_id(send, rid), raw_key, lines=lines,
                                    length=length, deferred=deferred)
            finally:
                unbind_request_id(token)
            return
        await self._checked(scope, receive, send, raw_key, lines=lines, length=length, deferred=deferred)

    async def _checked(
        self, scope: Scope, receive: Receive, send: Send, raw_key: bytes, *, lines: int, length: bytes,
        deferred: DeferredTake | None,
    ) -> None:
        """A request carrying the key header: its key and declared length checked (400, 413)."""
        key = parse_key(raw_key) if lines == 1 else None
        if key is None or (length.isdigit() and int(length) > self._limit):
            # the rate limit's answer comes first, as when it made its take before this layer
            if deferred is not None and not await deferred.alone(send):
                return
            self._count("invalid")
            if key is None:
                await problems.send_bad_key(self._render, send, self._header_display)
            else:
                await problems.send_body_too_large(self._render, send, self._limit)
            return
        await self._keyed(scope, receive, send, key, deferred)

    async def _keyed(
        self, scope: Scope, receive: Receive, send: Send, key: bytes, deferred: DeferredTake | None
    ) -> None:
        """Buffer, fingerprint and claim a request with a valid key (and make its deferred
        rate-limit take), then act on the claim."""
        ctx = context_of(scope)
        if self._resolver.awaits:  # an async callable identity source
            tags = await (ctx.tags_async(self._resolver, scope) if ctx is not None
                          else self._resolver.tags_async(scope))
        else:
            tags = ctx.tags(self._resolver, scope) if ctx is not None else self._resolver.tags(scope)
        identity = tags["identity"]
        if identity == ANONYMOUS_TAG:
            # a shared "anonymous" scope would let one client read another's response
            if deferred is not None and not await deferred.alone(send):
                return
            self._count("invalid")
            await problems.send_identity_missing(self._render, send, self._header_display)
            return
        try:
            body = await read_body(receive, self._limit)
        except BodyTooLarge:
            if deferred is not None and not await deferred.alone(send):
                return
            self._count("invalid")
            await problems.send_body_too_large(self._render, send, self._limit)
            return
        except ClientGone:
            return  # nothing was claimed and nothing ran
        record = record_name(identity, key)
        owner = b"%032x" % getrandbits(128)  # unique, never shown to a client: no syscall needed
        digest = fingerprint(scope, self._fingerprinted(scope, body))
        claim = await self._claim(scope, receive, send, body, digest, record=record, owner=owner,
                                  deferred=deferred)
        if claim is not None and claim.outcome == "in_flight" and self._wait_s > 0:
            claim = await self._wait_for_first(send, record, digest, owner, claim)
        if claim is None:
            return  # answered: denied by the rate limit, or the store failed
        outcome = claim.outcome
        self._count(_OUTCOME_METRIC[outcome])
        if outcome == "new":
            lease = Lease(self._store, record, owner, self._terms, renewals=self._renewals)
            await self._run(scope, replaying(body, receive), send, lease)
        elif outcome == "done":
            assert claim.response is not None
            _event("idempotency.replayed", "replaying the stored response", status=claim.response.status)
            render = self._render
            await send_replay(send, claim.response, render.replay_headers, render.replay_defaults())
        elif outcome == "in_flight":
            _event("idempotency.in_flight", "the key's first request is still running")
            await problems.send_in_flight(self._render, send)
        elif outcome == "mismatch":
            _event("idempotency.mismatch", "the key was used with another request")
            await problems.send_mismatch(self._render, send)
        else:
            _event("idempotency.replayed", "outcome unknown: the key's claim was lost", status=502)
            await problems.send_outcome_unknown(self._render, send, replayed=True)

    async def _claim(
        self, scope: Scope, receive: Receive, send: Send, body: bytes, digest: bytes, *, record: str,
        owner: bytes, deferred: DeferredTake | None,
    ) -> Claim | None:
        """Claim the record, with the deferred rate-limit take in the same store call where the
        store can combine them (else the take first, alone); None once the request is answered."""
        combined = deferred is not None and self._store.combines(deferred.tags, record)
        if deferred is not None and not combined and not await deferred.alone(send):
            return None
        try:
            if deferred is not None and combined:
                decision, claim = await self._store.ratelimit_take_claim(
                    deferred.plan, deferred.tags, record, digest, owner, terms=self._terms)
            else:
                decision = None
                claim = await self._store.idempotency_claim(record, digest, owner, self._terms)
        except StoreError as exc:
            if isinstance(exc, StoreUnanswered):  # sent, and maybe granted: only the reply was lost
                self._in_background(self._free_unanswered_claim(record, owner))
            if deferred is not None and combined and not await deferred.failed(exc, send):
                return None  # the rate limit's on_store_error answered
            self._count("store_error")
            await self._store_failed(exc, scope, replaying(body, receive), send)
            return None
        if (deferred is not None and decision is not None and not deferred.passed(decision)
                and not await deferred.decided(decision, send)):
            return None  # denied: nothing was claimed
        if claim is None:
            msg = "ratelimit_take_claim allowed the request but returned no claim"
            raise StoreScriptError(msg)
        return claim

    async def _wait_for_first(
        self, send: Send, record: str, digest: bytes, owner: bytes, claim: Claim,
    ) -> Claim | None:
        """``on_in_flight = "wait"``: a duplicate of a request in flight waits, at most
        ``wait_timeout``, for the record to change, then acts on what it became; None once
        answered (503: the store failed while it waited).

        It wakes on the store's notice of a completion or release (``Store.idempotency_watch``:
        one subscription per record per process, however many wait), when the holder's lease
        could have ended (a dead holder sends no notice: the claim then settles it as a lost
        claim, per ``on_lost_claim``), and every ``SAFETY_LOOK_S`` in case a notice was lost;
        without notices (a Redis Cluster) it polls with backoff up to ``MAX_POLL_S``. Each wake
        is one claim call by this request's own owner token (never the take: a waiting
        duplicate spends no more rate-limit tokens): ``done`` is the replay, ``new`` means the
        key was freed (released or, with ``on_lost_claim = "retry"``, lapsed) and this request
        now holds it, and ``in_flight`` past the bound is the 409. A store failure is a 503,
        never a run: the request is a duplicate of one that may be running."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self._wait_s
        async with self._store.idempotency_watch(record) as notices:
            watch = notices
            seen = watch.generation if watch is not None else 0
            poll_s = _FIRST_POLL_S
            while claim.outcome == "in_flight":
                now = loop.time()
                if now >= deadline:
                    break
                # the holder's lease may end unrenewed (it died): look then, a little after
                nap = min(deadline - now, claim.lease_left_ms / 1000 + _LEASE_MARGIN_S)
                if watch is not None and watch.broken:
                    watch = None  # notices stopped: poll from now on
                if watch is not None:
                    await watch.changed(seen, min(nap, SAFETY_LOOK_S))
                    seen = watch.generation
                else:
                    await asyncio.sleep(min(nap, poll_s))
                    poll_s = min(poll_s * 2, MAX_POLL_S)
                try:
                    claim = await self._store.idempotency_claim(record, digest, owner, self._terms)
                except StoreError as exc:
                    if isinstance(exc, StoreUnanswered):  # may have been granted: free it
                        self._in_background(self._free_unanswered_claim(record, owner))
                    self._count("store_error")
                    _event("idempotency.store_error", "idempotency store failed while waiting for "
                           "the first answer; deny", level=logging.WARNING, action="deny", error=str(exc))
                    await problems.send_store_unavailable(self._render, send)
                    return None
        _event("idempotency.waited", "waited for the key's first request", outcome=claim.outcome,
               waited_ms=round((loop.time() - started) * 1000))
        return claim

    def _fingerprinted(self, scope: Scope, body: bytes) -> bytes:
        """What the fingerprint hashes of the body: under ``fingerprint = "json"`` the canonical
        form of a body its one Content-Type says is JSON (``canonical.py``), else the raw bytes
        (a text body's whitespace may matter to its app, so only a JSON type is canonicalised)."""
        if not self._json_fingerprint or not body:
            return body
        types = [value for name, value in scope["headers"] if name == _CONTENT_TYPE]
        if len(types) != 1 or not is_json_media_type(types[0]):
            return body
        canonical = canonical_json(body)
        return body if canonical is None else canonical

    async def _run(self, scope: Scope, receive: Receive, send: Send, lease: Lease) -> None:
        """Run the claimed request and settle its record exactly once."""
        attempt = _Attempt()
        scope = {**scope, ATTEMPT_SCOPE_KEY: attempt}
        extensions = scope.get("extensions")
        if extensions and any(e in extensions for e in _BODYLESS_EXTENSIONS):
            scope["extensions"] = {k: v for k, v in extensions.items() if k not in _BODYLESS_EXTENSIONS}
        limit = self._limit
        released = self._release_statuses

        async def settle(capture: Capture) -> bool:
            """Settle before the response's last message; False: it must not go out."""
            stored = None
            if not attempt.not_sent:
                stored = capture.stored()
                if stored is None:
                    stored = problems.not_stored_record(self._render, capture.status, capture.headers, limit)
            if attempt.not_sent or (capture.status in released and not attempt.outcome_unknown):
                # nothing stored: the key is free before the client has its answer, so a retry
                # made once it has it runs (lua/idempotency_release.lua, owner-checked)
                outcome = await self._settle(lease, lease.release)
                if outcome == "refused" and stored is not None:
                    # not our live claim: lapsed into outcome unknown (our own record, so our
                    # real answer replaces its 502, as a late completion would), or another's
                    outcome = await self._settle(lease, functools.partial(lease.complete, stored))
            else:
                assert stored is not None
                outcome = await self._settle(lease, functools.partial(lease.complete, stored))
            if outcome != "stored":
                # the client must not hold an answer its retries would contradict: cut it off, and
                # a retry meets what the record says (409 while the settle goes on, then its outcome)
                _event("idempotency.response_cut_off", f"the outcome is not stored ({outcome}); "
                       "the response is cut off", level=logging.WARNING, status=capture.status,
                       settle=outcome)
            return outcome == "stored"

        capture = Capture(send, limit, settle, http_version=scope.get("http_version", "1.1"))
        ctx = context_of(scope)
        app = self.app
        if self._direct_app is not None and ctx is not None:
            app = self._direct_app
            ctx.app_start = time.perf_counter()
        try:
            await app(scope, receive, capture.send)
        except BaseException as exc:
            # a cut-off response made the app's send raise: the server closes it unfinished
            if not (capture.cut_off and isinstance(exc, Exception)):
                if not capture.ended:
                    await self._interrupted(attempt, capture, send, lease)
                raise
        else:
            if not capture.ended:
                # the app returned without finishing a response: whether it acted is unknown
                await self._interrupted(attempt, capture, send, lease)
        finally:
            if not lease.late:
                lease.stop()
        if capture.unanswered:  # cut off where a head alone would have been a whole response
            with contextlib.suppress(OSError):
                await problems.send_outcome_unknown(self._render, send, replayed=False)

    async def _interrupted(self, attempt: _Attempt, capture: Capture, send: Send, lease: Lease) -> None:
        """Settle a request that ended without a whole response: outcome unknown, for good
        (or released, when the app said the upstream never got it).

        The store call runs in its own task, shielded, so a cancelled request still settles."""
        if attempt.not_sent:
            settling: _Settling = lease.release
        else:
            settling = functools.partial(lease.complete, problems.outcome_unknown_record(self._render))
            _event("idempotency.outcome_unknown", "the request ended without a whole response",
                   level=logging.WARNING)
        # a cancellation goes on up (the caller asked for it); the settle runs on in its task
        await asyncio.shield(self._in_background(self._settle(lease, settling)))
        if capture.head_sent or capture.client_gone:
            return  # too late for an answer of its own: the response is left broken off
        try:
            if attempt.not_sent:
                await problems.send_not_sent(self._render, send)
            else:
                await problems.send_outcome_unknown(self._render, send, replayed=False)
        except OSError:
            pass  # the client is gone; the outcome is stored for its retry

    async def _settle(self, lease: Lease, settling: _Settling) -> Settled:
        """Settle within ``completion_timeout``; a settle the store has not answered by then (or
        that is cancelled) goes on in the background, for ``LATE_SETTLE_S`` more."""
        try:
            outcome = await settling(self._completion_timeout_s)
        except asyncio.CancelledError:
            self._settle_late(lease, settling)
            raise
        if outcome == "unanswered":
            self._settle_late(lease, settling)
        return outcome

    def _settle_late(self, lease: Lease, settling: _Settling) -> None:
        lease.late = True  # renewals go on until the late settle ends

        async def late() -> bool:
            try:
                outcome = await settling(LATE_SETTLE_S)
            finally:
                lease.stop()
            if outcome == "unanswered":
                _event("idempotency.settle_abandoned", f"the outcome could not be stored within "
                       f"{LATE_SETTLE_S:g}s more; the claim lapses", level=logging.ERROR)
            else:
                _event("idempotency.settled_late", f"the outcome is settled late ({outcome})")
            return outcome == "stored"

        self._in_background(late())

    def _in_background(self, settling: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
        """Run a settle as its own task, referenced until it ends, beyond the request's life."""
        task = asyncio.ensure_future(settling)
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        return task

    async def _free_unanswered_claim(self, record: str, owner: bytes) -> bool:
        """A claim call that timed out may still have been granted, or may still be on its way
        (a paused or blocked Redis runs what it received when it resumes). Nothing ran under
        it, so free it, or withdraw it before it lands (``lua/idempotency_release.lua``); left
        alone it would lapse into an outcome-unknown record for a request that never ran.

        One answer from the store settles it. Tried with backoff (an open breaker refuses the
        tries without a call until the store is back) up to ``_FREE_MAX_TRIES`` times, about
        70 s; past that, a claim landing later lapses into outcome unknown."""
        pause = _FREE_FIRST_BACKOFF_S
        for _ in range(_FREE_MAX_TRIES):
            try:
                return await self._store.idempotency_release(record, owner, self._terms)
            except StoreError:
                await asyncio.sleep(pause)
                pause = min(pause * 2, _FREE_MAX_BACKOFF_S)
        return False

    async def _store_failed(self, exc: StoreError, scope: Scope, receive: Receive, send: Send) -> None:
        action = "deny" if self._deny_on_error else "allow"
        _event("idempotency.store_error", f"idempotency store failed; {action} per on_store_error",
               level=logging.WARNING, action=action, error=str(exc))
        if self._deny_on_error:
            await problems.send_store_unavailable(self._render, send)
        else:
            await self.app(scope, receive, send)  # unguarded, as configured


def _event(event: str, message: str, *, level: int = logging.INFO, **fields: Any) -> None:
    _log.log(level, message, extra={"event": event, "request_id": current_request_id(), **fields})
