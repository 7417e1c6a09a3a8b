"""One request context per request in GatewayMiddleware: identity resolved once, one send wrapper."""

from __future__ import annotations

from typing import Any

import pytest

from gateway import GatewayMiddleware
from gateway._asgi import Receive, Scope, Send
from gateway.context import CONTEXT_SCOPE_KEY, RequestContext
from gateway.identity import IdentityResolver
from tests.asgi_helpers import call_asgi, client_for


class SendRecorder:
    """Answers 200 and keeps the ``send`` it was given and the scope's context."""

    def __init__(self) -> None:
        self.sends: list[Send] = []
        self.contexts: list[Any] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        self.sends.append(send)
        self.contexts.append(scope.get(CONTEXT_SCOPE_KEY))
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain"), (b"x-request-id", b"the-apps-own")]})
        await send({"type": "http.response.body", "body": b"ok"})


def _stack(app: SendRecorder) -> GatewayMiddleware:
    policies = [{"name": "per-client", "limit": 100, "period": "1m"},
                {"name": "per-ip", "key": "ip", "limit": 100, "period": "1m"}]
    return GatewayMiddleware(app, {"rate_limit": policies})


async def test_identity_is_resolved_once_for_the_rate_limit_and_the_key(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    real = IdentityResolver.tags

    def counting(self: IdentityResolver, scope: Any, keys: Any = None, **kwargs: Any) -> dict[str, str]:
        calls.append(keys)
        return real(self, scope, keys, **kwargs)

    monkeypatch.setattr(IdentityResolver, "tags", counting)
    app = SendRecorder()
    async with client_for(_stack(app)) as c:
        r = await c.post("/pay", content=b"{}", headers={"Idempotency-Key": "k-1", "X-Api-Key": "a"})
    assert r.status_code == 200
    assert len(calls) == 1, calls
    assert isinstance(app.contexts[0], RequestContext)


async def test_a_rate_limited_request_reaches_the_app_with_the_entrys_send_only() -> None:
    """No layer between the entry and the app wraps send for an allowed, unkeyed request."""
    app = SendRecorder()
    async with client_for(_stack(app)) as c:
        r = await c.get("/hello", headers={"X-Api-Key": "a"})
    assert r.status_code == 200
    assert app.sends[0].__qualname__ == "StackEntry.__call__.<locals>.send_decorated"
    # and that one wrapper did every layer's decoration
    assert r.headers.get_list("ratelimit-policy") == ['"per-client";q=100;w=60, "per-ip";q=100;w=60']
    assert r.headers.get_list("x-request-id") != ["the-apps-own"]
    assert len(r.headers.get_list("x-request-id")) == 1


async def test_the_context_counts_each_response_once() -> None:
    app = SendRecorder()
    gw = _stack(app)
    async with client_for(gw) as c:
        for _ in range(3):
            await c.get("/hello")
        await c.get("/_gateway/healthz")
    sample = gw.metrics.registry.get_sample_value
    assert sample("gateway_requests_total", {"code": "200"}) == 3
    assert sample("gateway_added_latency_seconds_count") == 3
    assert sample("gateway_upstream_latency_seconds_count") == 3


async def test_an_app_that_raises_is_counted_as_500() -> None:
    async def broken(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            raise RuntimeError("boom")

    gw = GatewayMiddleware(broken)
    scope = {"type": "http", "http_version": "1.1", "method": "GET", "path": "/x", "raw_path": b"/x",
             "query_string": b"", "headers": [(b"host", b"gw")], "client": ("127.0.0.1", 1)}
    with pytest.raises(RuntimeError):
        await call_asgi(gw, scope)
    assert gw.metrics.registry.get_sample_value("gateway_requests_total", {"code": "500"}) == 1


async def test_a_stack_inside_a_stack_keeps_each_its_own_context() -> None:
    """The inner stack's context does not replace the outer one's: each counts its own response."""
    app = SendRecorder()
    inner = _stack(app)
    outer = _stack(inner)  # type: ignore[arg-type]
    async with client_for(outer) as c:
        r = await c.get("/hello")
    assert r.status_code == 200
    for gw in (inner, outer):
        assert gw.metrics.registry.get_sample_value("gateway_upstream_latency_seconds_count") == 1
    assert len(r.headers.get_list("x-request-id")) == 1


class WalkedHeaders(list[tuple[bytes, bytes]]):
    """A request's header list that counts the passes over it."""

    walks = 0

    def __iter__(self) -> Any:
        WalkedHeaders.walks += 1
        return super().__iter__()


@pytest.mark.parametrize("keyed", [False, True])
async def test_the_stack_walks_the_request_headers_once_whatever_its_layers(keyed: bool) -> None:
    """The request check's pass, which also finds the request id: the identity (two policies and
    the key scope) and the Idempotency-Key gate read the values the check kept, not the list again."""
    app = SendRecorder()
    gw = GatewayMiddleware(app, {
        "rate_limit": [{"name": "per-client", "limit": 100, "period": "1m"},
                       {"name": "per-key", "key": "header:x-api-key", "limit": 100, "period": "1m"}],
        "identity": {"sources": ["header:x-api-key", "ip"]}})
    headers = WalkedHeaders([(b"host", b"t"), (b"x-request-id", b"given-id"), (b"x-api-key", b"alice"),
                             (b"content-length", b"2"), *([(b"idempotency-key", b"k1")] if keyed else [])])
    WalkedHeaders.walks = 0
    sent = await call_asgi(gw, {"type": "http", "method": "POST", "path": "/pay", "raw_path": b"/pay",
                                "query_string": b"", "headers": headers, "client": ("203.0.113.5", 1)}, b"{}")
    assert sent[0]["status"] == 200
    assert (b"ratelimit", b'"per-client";r=99;t=1, "per-key";r=99;t=1') in sent[0]["headers"]
    assert (b"x-request-id", b"given-id") in sent[0]["headers"]
    assert WalkedHeaders.walks == 1


async def test_a_layer_configured_otherwise_reads_the_headers_itself() -> None:
    """An Idempotency-Key gate inside the stack's app, with a header the stack does not read,
    still finds its key (the values the check kept do not name that header)."""
    from gateway import IdempotencyMiddleware
    from tests.asgi_helpers import CountingApp

    inner_app = CountingApp()
    inner = IdempotencyMiddleware(inner_app, idempotency={"header": "X-Other-Key"},
                                  identity={"sources": ["header:x-api-key"]})
    gw = GatewayMiddleware(inner, {"identity": {"sources": ["header:x-api-key"]}})
    async with client_for(gw) as c:
        first = await c.post("/pay", content=b"{}", headers={"x-other-key": "k1", "x-api-key": "a"})
        replay = await c.post("/pay", content=b"{}", headers={"x-other-key": "k1", "x-api-key": "a"})
    assert first.status_code == replay.status_code == 200
    assert inner_app.calls == 1
