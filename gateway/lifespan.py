"""Opening and closing a store with the ASGI lifespan of the app it serves.

Startup checks the store answers and loads the scripts, but never fails startup: a Redis that
is down at boot is a store failure like any other (policies follow ``on_store_error``) and the
connection is retried on the next request. Once the app has started, the heap built so far is
frozen out of the collector's scans (``freeze_startup_heap``), whichever middleware runs the
lifespan: the whole stack or one middleware alone. Shutdown closes the store after the app's
own shutdown has completed. An app without lifespan support does not take any of this with it
(``run_lifespan``).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Awaitable, Callable

from gateway._asgi import ASGIApp, Message, Receive, Scope, Send
from gateway.errors import StoreError
from gateway.store import Store

__all__ = ["GEN0_THRESHOLD", "SHUTDOWN_DRAIN_S", "freeze_startup_heap", "run_lifespan"]

_log = logging.getLogger("gateway.lifespan")
#: At shutdown, how long work that outlived its request (an idempotency settle, a slot's
#: release) may still take before the store closes.
SHUTDOWN_DRAIN_S = 10.0
#: Allocations (net of frees) between two collections of the youngest generation, once started.
GEN0_THRESHOLD = 10_000
_CPYTHON_GEN0_THRESHOLD = 700


def freeze_startup_heap() -> None:
    """Once startup is done, what is alive (modules, config, the app) lives as long as the
    process: ``gc.freeze()`` takes it out of the collector's sight, so the collections that
    per-request garbage triggers stop rescanning it (loadtests/RESULTS.md: ~17 µs of CPU per
    keyed request, ~3 µs per GET, in-process). Objects made later are collected as before.

    The youngest generation's threshold goes from CPython's default 700 to
    ``GEN0_THRESHOLD``: 32 requests in flight keep more than 700 objects alive, so at 700 a
    collection ran every few requests and found nothing to free (~5 µs per GET). An app that set
    its own thresholds keeps them."""
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    if gen0 == _CPYTHON_GEN0_THRESHOLD:
        gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)


async def run_lifespan(
    app: ASGIApp,
    scope: Scope,
    receive: Receive,
    send: Send,
    store: Store,
    *,
    before_close: Callable[[], Awaitable[object]] | None = None,
    after_startup: Callable[[], object] | None = None,
) -> None:
    """Run ``app``'s lifespan, opening ``store`` at startup and closing it at shutdown
    (after ``before_close``, which lets work that still needs the store finish); once the
    app's own startup has completed, the startup heap is frozen and ``after_startup`` runs.

    An app that does not speak the lifespan protocol (it returns, or raises as Django does,
    before answering anything) does not take the gateway's own startup and shutdown with it:
    as a server's ``lifespan = "auto"`` would, the gateway goes on without the app's, and
    answers the server itself. Otherwise the store would never be closed, settles still
    running at shutdown would not be waited for, and the heap would never be frozen."""
    answered = False  # the app sent a lifespan message of its own
    startup_received = False

    async def receive_opening() -> Message:
        nonlocal startup_received
        message = await receive()
        if message["type"] == "lifespan.startup":
            startup_received = True
            try:
                await store.open()
            except StoreError as exc:
                _log.warning(
                    "store not answering at startup; requests follow on_store_error until it does",
                    extra={"event": "store.unavailable", "error": str(exc)},
                )
        return message

    async def send_closing(message: Message) -> None:
        nonlocal answered
        answered = True
        if message["type"] == "lifespan.startup.complete":
            freeze_startup_heap()
            if after_startup is not None:
                after_startup()
        if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
            if before_close is not None:
                await before_close()
            try:
                await store.close()
            except Exception as exc:  # whatever went wrong, a failed close must not hang shutdown
                _log.warning("store did not close cleanly", extra={"event": "store.close_failed",
                                                                    "error": str(exc)})
        await send(message)

    error: str | None = None  # what the app raised, when it raised instead of answering
    try:
        await app(scope, receive_opening, send_closing)
    except Exception as exc:
        if answered:
            raise
        error = f"{type(exc).__name__}: {exc}"
    else:
        if answered:
            return
    _log.info("the app does not support the ASGI lifespan protocol; the gateway starts and stops "
              "its store without it", extra={"event": "lifespan.app_unsupported", "error": error})
    if not startup_received:
        await receive_opening()  # the server's lifespan.startup: the store opens
    await send_closing({"type": "lifespan.startup.complete"})
    await receive()  # lifespan.shutdown: the server sends it when it stops
    await send_closing({"type": "lifespan.shutdown.complete"})
