"""Lifespan and non-HTTP scopes: the store opens and closes with the app; nothing else is touched."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from typing import Any

import pytest

import gateway.stack
from gateway import ConcurrencyLimitMiddleware, GatewayMiddleware, IdempotencyMiddleware, RateLimitMiddleware
from gateway.lifespan import GEN0_THRESHOLD
from gateway.store.memory import memory_store
from gateway.store.redis import RedisStore
from tests.asgi_helpers import CountingApp, client_for, run_lifespan
from tests.redis_process import free_port

POLICY = {"name": "p", "limit": 5, "period": "1m"}


class SpyStore(RedisStore):
    """A memory store that records open() and close()."""

    def __init__(self) -> None:
        inner = memory_store(key_prefix="spy", timeout_s=1.0)
        super().__init__(inner.client, key_prefix="spy", timeout_s=1.0)
        self.events: list[str] = []

    async def open(self) -> None:
        self.events.append("open")
        await super().open()

    async def close(self) -> None:
        self.events.append("close")
        await super().close()


async def test_owned_store_opens_at_startup_and_closes_after_shutdown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """GatewayMiddleware opens its own store before the app starts and closes it after it stops."""
    spy = SpyStore()
    monkeypatch.setattr(gateway.stack, "store_from_config", lambda config, **_: spy)
    app = CountingApp()
    gw = GatewayMiddleware(app, {"rate_limit": [POLICY]})
    sent = await run_lifespan(gw, between=lambda: spy.events.append("serving"))
    assert spy.events == ["open", "serving", "close"]
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert app.lifespan_events == ["lifespan.startup", "lifespan.shutdown"]


#: Every middleware that runs the lifespan when it owns its store: the stack, and each one used
#: alone. Without the freeze, each collection rescans every module and the app (a lone
#: IdempotencyMiddleware's p99 was 22-27 ms in peer-bench against 7-8 ms for the stack).
LIFESPAN_OWNERS = {
    "stack": lambda app: GatewayMiddleware(app, {"store": {"url": "memory://"}, "rate_limit": [POLICY]}),
    "rate_limit": lambda app: RateLimitMiddleware(app, rate_limit=[POLICY], store="memory://"),
    "idempotency": lambda app: IdempotencyMiddleware(app, store="memory://"),
    "concurrency": lambda app: ConcurrencyLimitMiddleware(
        app, concurrency_limit=[{"name": "c", "limit": 5}], store="memory://"),
}


@pytest.mark.parametrize("owner", sorted(LIFESPAN_OWNERS))
async def test_startup_freezes_the_heap_built_so_far(owner: str) -> None:
    """Once the app has started, what exists is frozen out of the collector's scans (gc.freeze)."""
    app = LIFESPAN_OWNERS[owner](CountingApp())
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    frozen_while_serving: list[int] = []
    await run_lifespan(app, between=lambda: frozen_while_serving.append(gc.get_freeze_count()))
    assert frozen_while_serving[0] > 1000  # modules, config, the app: thousands of objects


@pytest.mark.parametrize("owner", sorted(LIFESPAN_OWNERS))
@pytest.mark.parametrize(("before", "after"),
                         [((700, 10, 10), (GEN0_THRESHOLD, 10, 10)), ((1234, 5, 6), (1234, 5, 6))])
async def test_startup_raises_the_youngest_threshold_unless_the_app_set_its_own(
    owner: str, before: tuple[int, int, int], after: tuple[int, int, int]
) -> None:
    """CPython's default 700 becomes GEN0_THRESHOLD once started; thresholds an app chose stay."""
    app = LIFESPAN_OWNERS[owner](CountingApp())
    saved = gc.get_threshold()
    gc.set_threshold(*before)
    try:
        seen: list[tuple[int, int, int]] = []
        await run_lifespan(app, between=lambda: seen.append(gc.get_threshold()))
        assert seen == [after]
    finally:
        gc.set_threshold(*saved)


async def test_shared_store_is_left_to_its_owner() -> None:
    """A store passed in is not opened or closed by the middleware's lifespan."""
    spy = SpyStore()
    app = CountingApp()
    sent = await run_lifespan(GatewayMiddleware(app, {"rate_limit": [POLICY]}, store=spy))
    assert spy.events == []
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    await spy.close()


async def test_lone_middleware_owns_the_store_it_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """RateLimitMiddleware given a URL opens and closes that store with the lifespan."""
    spy = SpyStore()
    monkeypatch.setattr("gateway._settings.store_from_config", lambda config: spy)
    sent = await run_lifespan(RateLimitMiddleware(CountingApp(), rate_limit=[POLICY], store="memory://"))
    assert spy.events == ["open", "close"]
    assert sent[-1] == "lifespan.shutdown.complete"


async def test_unreachable_store_does_not_fail_startup(caplog: pytest.LogCaptureFixture) -> None:
    """A Redis that is down at boot is logged, and the app still starts (on_store_error applies)."""
    app = CountingApp()
    gw = GatewayMiddleware(app, {"store": {"url": f"redis://127.0.0.1:{free_port()}/0", "timeout": "200ms"},
                                 "rate_limit": [POLICY]})
    with caplog.at_level(logging.WARNING, logger="gateway"):
        sent = await run_lifespan(gw)
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert any(getattr(r, "event", "") == "store.unavailable" for r in caplog.records)


@pytest.mark.parametrize("scope_type", ["websocket", "lifespan-shared"])
async def test_non_http_scopes_pass_through_untouched(scope_type: str) -> None:
    """A websocket scope (and lifespan with a shared store) reaches the app as the same object."""
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append((scope, receive, send))

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: Any) -> None:
        return None

    store = memory_store(key_prefix="p", timeout_s=1.0)
    gw = GatewayMiddleware(app, {"rate_limit": [POLICY]}, store=store)
    scope = {"type": scope_type.split("-", maxsplit=1)[0], "path": "/", "headers": []}
    await gw(scope, receive, send)
    assert seen == [(scope, receive, send)]
    await store.close()


async def test_failing_close_does_not_hang_shutdown(monkeypatch: pytest.MonkeyPatch) -> None:
    """A store that fails to close is logged and shutdown still completes."""

    class FailingClose(SpyStore):
        async def close(self) -> None:
            await super().close()
            raise OSError("connection reset while closing")

    spy = FailingClose()
    monkeypatch.setattr(gateway.stack, "store_from_config", lambda config, **_: spy)
    sent = await run_lifespan(GatewayMiddleware(CountingApp(), {"rate_limit": [POLICY]}))
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert spy.events == ["open", "close"]


async def _returns_on_lifespan(scope: Any, receive: Any, send: Any) -> None:
    """An app for HTTP only, as many are written: any other scope, it returns at once."""
    if scope["type"] != "http":
        return


async def _raises_on_lifespan(scope: Any, receive: Any, send: Any) -> None:
    """An app that refuses the lifespan scope, as Django's ASGI handler does."""
    msg = f"can only handle ASGI/HTTP connections, not {scope['type']}"
    raise ValueError(msg)


async def _raises_after_startup(scope: Any, receive: Any, send: Any) -> None:
    """An app that reads the startup message, then raises without answering it."""
    await receive()
    msg = "no lifespan here"
    raise RuntimeError(msg)


@pytest.mark.parametrize("owner", sorted(LIFESPAN_OWNERS))
@pytest.mark.parametrize("inner", [_returns_on_lifespan, _raises_on_lifespan, _raises_after_startup])
async def test_an_app_without_lifespan_support_keeps_the_gateways_own(
    owner: str, inner: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """The app does not speak the lifespan protocol: the gateway answers the server itself, so
    its store still opens at startup and closes at shutdown, and the heap is still frozen."""
    spy = SpyStore()
    monkeypatch.setattr(gateway.stack, "store_from_config", lambda config, **_: spy)
    monkeypatch.setattr("gateway._settings.store_from_config", lambda config: spy)
    app = LIFESPAN_OWNERS[owner](inner)
    gc.unfreeze()
    frozen_while_serving: list[int] = []

    def serving() -> None:
        frozen_while_serving.append(gc.get_freeze_count())
        spy.events.append("serving")

    with caplog.at_level(logging.INFO, logger="gateway.lifespan"):
        sent = await run_lifespan(app, between=serving)
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert spy.events == ["open", "serving", "close"]
    assert frozen_while_serving[0] > 1000
    unsupported = [r for r in caplog.records if getattr(r, "event", "") == "lifespan.app_unsupported"]
    assert len(unsupported) == 1
    raised = inner is not _returns_on_lifespan
    assert (getattr(unsupported[0], "error", None) is not None) is raised


async def test_an_apps_failed_startup_is_passed_on_not_answered_for() -> None:
    """An app that speaks the protocol and fails its startup: the server hears the failure."""
    async def failing(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "database down"})

    sent = await run_lifespan(GatewayMiddleware(failing, {"store": {"url": "memory://"}}))
    assert sent == ["lifespan.startup.failed"]


async def test_an_app_that_raises_after_answering_still_raises() -> None:
    """Once the app has answered, its exception is its own: the gateway does not swallow it."""
    async def raising(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        msg = "shutdown went wrong"
        raise RuntimeError(msg)

    with pytest.raises(RuntimeError, match="shutdown went wrong"):
        await run_lifespan(GatewayMiddleware(raising, {"store": {"url": "memory://"}}))


async def test_a_lone_idempotency_middleware_lets_its_settles_finish_before_closing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """IdempotencyMiddleware alone with a store of its own, as the stack does: a settle that
    outlived its request (its client left mid-completion) is stored before the store closes."""

    class GatedSpy(SpyStore):
        def __init__(self) -> None:
            super().__init__()
            self.entered = asyncio.Event()
            self.gate = asyncio.Event()

        async def idempotency_complete(self, *args: Any, **kwargs: Any) -> bool:
            self.entered.set()
            await self.gate.wait()
            done = await super().idempotency_complete(*args, **kwargs)
            self.events.append("completed")
            return done

    spy = GatedSpy()
    monkeypatch.setattr("gateway._settings.store_from_config", lambda config: spy)
    app = CountingApp()
    mw = IdempotencyMiddleware(app, store="memory://")

    async def serve() -> None:
        async with client_for(mw) as c:
            request = asyncio.ensure_future(c.post("/", content=b"x", headers={"Idempotency-Key": "k-drain"}))
            async with asyncio.timeout(5):
                await spy.entered.wait()  # the response is being stored
            request.cancel()  # the client leaves: the settle goes on without it
            with contextlib.suppress(asyncio.CancelledError):
                await request
        asyncio.get_running_loop().call_later(0.2, spy.gate.set)  # the store answers, later

    sent = await run_lifespan(mw, between=serve)
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert app.calls == 1
    assert spy.events == ["open", "completed", "close"]
