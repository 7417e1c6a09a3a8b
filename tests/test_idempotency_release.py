"""``idempotency.release_statuses``: answers passed on but not stored, the key freed before
their end goes out, on fakeredis and real Redis (the ``store`` fixture)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway import ConfigError, IdempotencyMiddleware, load_config, mark_outcome_unknown
from gateway._asgi import Receive, Scope, Send
from gateway.errors import StoreUnavailable
from gateway.store.redis import RedisStore
from tests.asgi_helpers import PROBLEM, client_for
from tests.test_idempotency_leases import DelegatingStore, eventually

PATH = "/charges"
KEYED = {"Idempotency-Key": "k-release", "content-type": "application/json"}


class ValidatingApp:
    """A charges app that validates its body: ``{"amount":...}`` is a 201, anything else a 422
    (no side effect). It counts runs and the bodies it charged; ``gate`` (when set) holds each
    run until it is set."""

    def __init__(self, *, gate: asyncio.Event | None = None) -> None:
        self.calls = 0
        self.charged: list[bytes] = []
        self.started = asyncio.Event()
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls += 1
        body = (await receive())["body"]
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if body.startswith(b'{"amount":'):
            self.charged.append(body)
            status, answer = 201, b'{"id":"ch_%d"}' % self.calls
        else:
            status, answer = 422, b'{"error":"amount is required"}'
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": answer[:4], "more_body": True})
        await send({"type": "http.response.body", "body": answer[4:]})


def idem(app: Any, store: Any, **settings: Any) -> IdempotencyMiddleware:
    return IdempotencyMiddleware(app, idempotency=settings, store=store)


async def test_a_released_status_frees_the_key_for_the_fixed_request(store: RedisStore) -> None:
    """The app's 422 reaches the client whole and is not stored: the client fixes its body and
    retries with the same key, which runs (201), and the next retry replays that 201."""
    app = ValidatingApp()
    async with client_for(idem(app, store, release_statuses=[422])) as c:
        refused = await c.post(PATH, content=b'{"amt":100}', headers=KEYED)
        fixed = await c.post(PATH, content=b'{"amount":100}', headers=KEYED)
        again = await c.post(PATH, content=b'{"amount":100}', headers=KEYED)
    assert (refused.status_code, refused.content) == (422, b'{"error":"amount is required"}')
    assert "idempotent-replayed" not in refused.headers
    assert (fixed.status_code, fixed.content) == (201, b'{"id":"ch_2"}')
    assert (again.status_code, again.content) == (201, fixed.content)
    assert again.headers["idempotent-replayed"] == "true"
    assert app.calls == 2
    assert app.charged == [b'{"amount":100}']


async def test_the_same_request_after_a_released_status_runs_again(store: RedisStore) -> None:
    """The same body retried after a released 422 is a new run, not a 409 or a replay: the key
    was freed before the 422's last byte went out."""
    app = ValidatingApp()
    async with client_for(idem(app, store, release_statuses=[400, 422])) as c:
        answers = [await c.post(PATH, content=b"{}", headers=KEYED) for _ in range(3)]
    assert [r.status_code for r in answers] == [422, 422, 422]
    assert all("idempotent-replayed" not in r.headers for r in answers)
    assert app.calls == 3


async def test_statuses_not_listed_are_stored_as_before(store: RedisStore) -> None:
    """Without release_statuses (the default) the app's 422 is stored and replayed; a fixed
    body under the same key is then a mismatch."""
    app = ValidatingApp()
    async with client_for(idem(app, store)) as c:
        first = await c.post(PATH, content=b"{}", headers=KEYED)
        again = await c.post(PATH, content=b"{}", headers=KEYED)
        fixed = await c.post(PATH, content=b'{"amount":100}', headers=KEYED)
    assert (first.status_code, again.status_code) == (422, 422)
    assert again.headers["idempotent-replayed"] == "true"
    assert fixed.status_code == 422
    assert fixed.json()["type"] == PROBLEM + "idempotency-key-reused"
    assert app.calls == 1


async def test_a_duplicate_in_flight_still_gets_409(store: RedisStore) -> None:
    """While the request whose status will be released runs, a duplicate gets 409 (the key is
    held until the answer), and after it a retry runs."""
    gate = asyncio.Event()
    app = ValidatingApp(gate=gate)
    async with client_for(idem(app, store, release_statuses=[422])) as c:
        first = asyncio.ensure_future(c.post(PATH, content=b"{}", headers=KEYED))
        async with asyncio.timeout(10):
            await app.started.wait()
        during = await c.post(PATH, content=b"{}", headers=KEYED)
        gate.set()
        done = await first
        after = await c.post(PATH, content=b"{}", headers=KEYED)
    assert during.status_code == 409
    assert (done.status_code, after.status_code) == (422, 422)
    assert app.calls == 2


async def test_the_gateways_own_outcome_unknown_is_never_released(store: RedisStore) -> None:
    """A 502 the app marks as the gateway's outcome-unknown answer (the proxy's timeout or broken
    connection) is stored even with 502 in release_statuses; the upstream's own 502 is released."""
    calls = {"n": 0}

    async def proxy_like(scope: Scope, receive: Receive, send: Send) -> None:
        calls["n"] += 1
        await receive()
        if scope["path"] == "/unknown":
            mark_outcome_unknown(scope)
        await send({"type": "http.response.start", "status": 502, "headers": []})
        await send({"type": "http.response.body", "body": b"run %d" % calls["n"]})

    async with client_for(idem(proxy_like, store, release_statuses=[502])) as c:
        unknown = [await c.post("/unknown", content=b"x", headers={"Idempotency-Key": "u"}) for _ in range(2)]
        upstream = [await c.post("/up", content=b"x", headers={"Idempotency-Key": "b"}) for _ in range(2)]
    assert [r.content for r in unknown] == [b"run 1", b"run 1"]
    assert unknown[1].headers["idempotent-replayed"] == "true"
    assert [r.content for r in upstream] == [b"run 2", b"run 3"]
    assert calls["n"] == 3


class NoRenewStore(DelegatingStore):
    """Renewals are never answered (an outage of the renew path only): the claim lapses in the
    store while its holder still runs."""

    async def idempotency_renew(self, *args: Any) -> bool:
        raise StoreUnavailable("injected: renewals lost")


async def test_a_released_status_after_the_claim_lapsed_is_stored(store: RedisStore) -> None:
    """A holder whose claim lapsed into outcome unknown (a retry got the 502) and then answers
    a released status cannot free the key: its real answer replaces the 502 as a late completion
    would, and every later retry gets it, never a second run."""
    gate = asyncio.Event()
    app = ValidatingApp(gate=gate)
    settings = {"release_statuses": [422], "lock_ttl": "200ms"}
    mw = idem(app, NoRenewStore(store), **settings)
    async with client_for(mw) as c:
        first = asyncio.ensure_future(c.post(PATH, content=b"{}", headers=KEYED))
        async with asyncio.timeout(10):
            await app.started.wait()

        async def lapsed() -> Any:
            r = await c.post(PATH, content=b"{}", headers=KEYED)
            return None if r.status_code == 409 else r

        retry = await eventually(lapsed, "a retry past the lapsed lease")
        gate.set()
        holder = await first
        later = await c.post(PATH, content=b"{}", headers=KEYED)
    assert retry.status_code == 502
    assert holder.status_code == 422
    assert (later.status_code, later.headers["idempotent-replayed"]) == (422, "true")
    assert app.calls == 1


def test_the_new_keys_are_checked_like_every_other() -> None:
    """Bad values of this issue's keys are one line each, naming the key."""
    with pytest.raises(ConfigError) as info:
        load_config({
            "idempotency": {"release_statuses": [201, "422", 600], "fingerprint": "xml",
                            "on_in_flight": "block", "wait_timeout": "0s"},
            "errors": {"format": "graphql", "extra": 1},
            "response": {"rate_limit_headers": "github"},
        })
    assert str(info.value).split("; ") == [
        "idempotency.fingerprint: expected \"raw\" or \"json\", got \"xml\"",
        "idempotency.release_statuses[0]: must be between 400 and 599 (a 1xx-3xx response means the "
        "request was carried out), got 201",
        "idempotency.release_statuses[1]: expected a status code like 422, got \"422\"",
        "idempotency.release_statuses[2]: must be between 400 and 599 (a 1xx-3xx response means the "
        "request was carried out), got 600",
        "idempotency.on_in_flight: expected \"conflict\" or \"wait\", got \"block\"",
        "idempotency.wait_timeout: must be at least 0.01s and at most 600s, got \"0s\"",
        "errors.format: expected \"problem\" or \"stripe\", got \"graphql\"",
        "errors.extra: unknown key",
        "response.rate_limit_headers: expected \"ietf\" or \"ietf+legacy\" or \"none\", got \"github\"",
    ]
