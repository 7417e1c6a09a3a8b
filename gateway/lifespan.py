"""Opening and closing a store with the ASGI lifespan of the app it serves.

Startup checks the store answers and loads the scripts, but never fails startup: a Redis that
is down at boot is a store failure like any other (policies follow ``on_store_error``) and the
connection is retried on the next request. Shutdown closes the store after the app's own
shutdown has completed.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from gateway._asgi import ASGIApp, Message, Receive, Scope, Send
from gateway.errors import StoreError
from gateway.store import Store

__all__ = ["run_lifespan"]

_log = logging.getLogger("gateway.lifespan")


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
    (after ``before_close``, which lets work that still needs the store finish);
    ``after_startup`` runs once the app's own startup has completed."""

    async def receive_opening() -> Message:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                await store.open()
            except StoreError as exc:
                _log.warning(
                    "store not answering at startup; requests follow on_store_error until it does",
                    extra={"event": "store.unavailable", "error": str(exc)},
                )
        return message

    async def send_closing(message: Message) -> None:
        if message["type"] == "lifespan.startup.complete" and after_startup is not None:
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

    await app(scope, receive_opening, send_closing)
