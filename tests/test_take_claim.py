"""The whole stack on a keyed request with a rate limit: one store call admits it (take + claim),
a denial claims nothing, the rate limit's answers keep their order, and where the store cannot
combine the two (a cluster, keys in two slots) the request gets the same answers from two calls."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from gateway import GatewayMiddleware, RateLimitMiddleware
from gateway.context import CONTEXT_SCOPE_KEY, RequestContext
from gateway.errors import StoreUnanswered, StoreUnavailable
from gateway.ops import UpstreamTimer
from gateway.problem import QUOTA_EXCEEDED
from gateway.store.redis import RedisStore
from tests.asgi_helpers import PROBLEM, CountingApp, assert_problem, call_asgi, client_for
from tests.conftest import unique_prefix
from tests.redis_process import RedisProcess

KEY = {"x-api-key": "alice"}


class Calls:
    """Wraps a store: the decision calls the stack makes, by name, in order."""

    def __init__(self, inner: Any, *, combines: bool = True) -> None:
        self.inner = inner
        self.names: list[str] = []
        self._combines = combines
        self.fail_combined: Exception | None = None

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name.startswith(("ratelimit_", "idempotency_")):
            async def counted(*args: Any, **kwargs: Any) -> Any:
                self.names.append(name)
                if name == "ratelimit_take_claim" and self.fail_combined is not None:
                    raise self.fail_combined
                return await attr(*args, **kwargs)
            return counted
        return attr

    def combines(self, tags: Any, record: str) -> bool:
        return self._combines and self.inner.combines(tags, record)


def stack(app: CountingApp, store: Any, *, burst: int = 5, on_store_error: str = "allow",
          name: str = "per-client", **idempotency: Any) -> GatewayMiddleware:
    config = {"rate_limit": [{"name": name, "limit": 1, "period": "1h", "burst": burst,
                              "on_store_error": on_store_error}],
              "identity": {"sources": ["header:x-api-key"]}, "idempotency": idempotency}
    return GatewayMiddleware(app, config, store=store)


async def pay(c: httpx.AsyncClient, key: str | None, **headers: str) -> httpx.Response:
    sent = {**KEY, **headers}
    if key is not None:
        sent["idempotency-key"] = key
    return await c.post("/pay", content=b"{}", headers=sent)


async def test_a_keyed_request_is_admitted_by_one_store_call(store: RedisStore) -> None:
    app = CountingApp()
    calls = Calls(store)
    async with client_for(stack(app, calls)) as c:
        r = await pay(c, "k1")
        assert r.status_code == 200
        assert r.headers["ratelimit"] == '"per-client";r=4;t=3600'
        assert calls.names == ["ratelimit_take_claim", "idempotency_complete"]
        calls.names.clear()
        replay = await pay(c, "k1")
    assert replay.status_code == 200
    assert app.calls == 1
    assert replay.headers["ratelimit"] == '"per-client";r=3;t=7200'  # a replay still counts
    assert calls.names == ["ratelimit_take_claim"]


async def test_where_the_store_cannot_combine_two_calls_give_the_same_answers(store: RedisStore) -> None:
    app = CountingApp()
    calls = Calls(store, combines=False)
    async with client_for(stack(app, calls, burst=2)) as c:
        first = await pay(c, "k1")
        replay = await pay(c, "k1")
        denied = await pay(c, "k2")
    assert [first.status_code, replay.status_code, denied.status_code] == [200, 200, 429]
    assert replay.headers["ratelimit"] == '"per-client";r=0;t=7200'
    assert calls.names == ["ratelimit_take", "idempotency_claim", "idempotency_complete",
                           "ratelimit_take", "idempotency_claim", "ratelimit_take"]
    assert app.calls == 1


async def test_a_denied_keyed_request_claims_nothing(store: RedisStore) -> None:
    """Over the limit, the key is not claimed: once the client may pass again, the same key runs
    (it is not met as in flight, nor as an outcome)."""
    app = CountingApp()
    gw = stack(app, store, burst=1)
    async with client_for(gw) as c:
        assert (await pay(c, "k0")).status_code == 200
        denied = await pay(c, "k1")
        assert_problem(denied, 429, QUOTA_EXCEEDED)
        assert denied.headers["retry-after"]
    assert await store.client.exists(store.record_key(_record_of("k0")))
    assert not await store.client.exists(store.record_key(_record_of("k1")))
    # another policy (fresh buckets), the same records: k1 runs, it is neither in flight nor done
    async with client_for(stack(app, store, burst=1, name="fresh")) as c:
        assert (await pay(c, "k1")).status_code == 200
    assert app.calls == 2


async def test_the_rate_limit_still_answers_before_the_key_checks(store: RedisStore) -> None:
    app = CountingApp()
    async with client_for(stack(app, store, burst=1, max_body_bytes=10)) as c:
        assert (await pay(c, "k1")).status_code == 200
        assert_problem(await pay(c, "bad key"), 429, QUOTA_EXCEEDED)
        r = await c.post("/pay", content=b"x" * 20, headers={**KEY, "idempotency-key": "k2"})
        assert_problem(r, 429, QUOTA_EXCEEDED)
        assert_problem(await pay(c, None), 429, QUOTA_EXCEEDED)
    async with client_for(stack(app, store, burst=1, max_body_bytes=10), client_ip="198.51.100.1") as c:
        # no identity source names this client: its (shared, anonymous) bucket is charged, then
        # the 400; the next such request is over that bucket's limit
        first = await c.post("/pay", content=b"{}", headers={"idempotency-key": "k3"})
        assert_problem(first, 400, PROBLEM + "idempotency-identity-missing")
        second = await c.post("/pay", content=b"{}", headers={"idempotency-key": "k3"})
        assert_problem(second, 429, QUOTA_EXCEEDED)
    assert app.calls == 1


async def test_unkeyed_posts_are_rate_limited_and_pass(store: RedisStore) -> None:
    app = CountingApp()
    calls = Calls(store)
    async with client_for(stack(app, calls, burst=2)) as c:
        codes = [(await pay(c, None)).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    assert calls.names == ["ratelimit_take"] * 3
    assert app.calls == 2


async def test_fifty_concurrent_same_key_requests_run_once_and_are_charged_each(store: RedisStore) -> None:
    app = CountingApp()
    gw = stack(app, store, burst=20)
    async with client_for(gw) as c:
        answers = await asyncio.gather(*(pay(c, "same") for _ in range(50)))
    codes = [r.status_code for r in answers]
    assert app.calls == 1
    assert codes.count(429) == 30  # 20 tokens: each admitted request took one, once
    assert set(codes) <= {200, 409, 429}
    assert codes.count(200) >= 1


@pytest.mark.parametrize(("rate_limit", "idempotency"),
                         [("deny", "allow"), ("allow", "deny"), ("allow", "allow")])
async def test_a_failed_combined_call_follows_both_on_store_error_settings(
    store: RedisStore, rate_limit: str, idempotency: str
) -> None:
    """The rate limit's setting decides first (503, as when its own take failed); failing open,
    the idempotency layer's setting decides next (allow: the request runs unguarded)."""
    app = CountingApp()
    calls = Calls(store)
    calls.fail_combined = StoreUnavailable("the store is down")
    gw = GatewayMiddleware(app, {
        "rate_limit": [{"name": "per-client", "limit": 1, "period": "1h", "on_store_error": rate_limit}],
        "identity": {"sources": ["header:x-api-key"]}, "idempotency": {"on_store_error": idempotency}},
        store=calls)
    async with client_for(gw) as c:
        r = await pay(c, "k1")
    if rate_limit == "deny":
        body = assert_problem(r, 503, PROBLEM + "store-unavailable")
        assert body["title"] == "Rate limit store unavailable"
    elif idempotency == "deny":
        body = assert_problem(r, 503, PROBLEM + "store-unavailable")
        assert body["title"] != "Rate limit store unavailable"
        assert r.headers["ratelimit-policy"] == '"per-client";q=1;w=3600'
    else:
        assert r.status_code == 200
        assert r.headers["ratelimit-policy"] == '"per-client";q=1;w=3600'
        assert "ratelimit" not in r.headers
    assert app.calls == (1 if (rate_limit, idempotency) == ("allow", "allow") else 0)


async def test_an_unanswered_combined_call_frees_the_claim_it_may_have_made(store: RedisStore) -> None:
    """The call ran but its reply was lost: the claim it made is released in the background, so
    the retry with that key runs (nothing ran under the first)."""
    app = CountingApp()

    class Lost(Calls):
        lost = 0

        async def ratelimit_take_claim(self, *args: Any, **kwargs: Any) -> Any:
            admitted = await store.ratelimit_take_claim(*args, **kwargs)
            self.lost += 1
            if self.lost == 1:
                raise StoreUnanswered("the reply was lost")
            return admitted

    async with client_for(stack(app, Lost(store), on_store_error="deny")) as c:
        assert_problem(await pay(c, "k1"), 503, PROBLEM + "store-unavailable")
        record = store.record_key(_record_of("k1"))
        for _ in range(100):  # bounded: the background release is one store call
            if not await store.client.exists(record):
                break
            await asyncio.sleep(0.02)
        retry = await pay(c, "k1")
    assert retry.status_code == 200
    assert app.calls == 1


def _record_of(key: str) -> str:
    from gateway.idempotency.request import record_name
    from gateway.identity import tag

    return record_name(tag(b"h:x-api-key:alice"), key.encode())


async def test_a_deferred_take_is_made_before_the_app_by_the_backstop(store: RedisStore) -> None:
    """A rate limit that left its take to a layer that never made it: the take is still made
    before the app runs (``UpstreamTimer``), and a denial keeps the request from the app."""
    app = CountingApp()
    limiter = RateLimitMiddleware(UpstreamTimer(app), rate_limit=[{"name": "p", "limit": 1, "period": "1h"}],
                                  store=store, claim_methods=frozenset({"POST"}))
    statuses = []
    for _ in range(2):
        scope = {"type": "http", "method": "POST", "path": "/x", "raw_path": b"/x", "headers": [],
                 "query_string": b"", "client": ("203.0.113.9", 1), CONTEXT_SCOPE_KEY: RequestContext()}
        sent = await call_asgi(limiter, scope)
        statuses.append(sent[0]["status"])
    assert statuses == [200, 429]
    assert app.calls == 1


async def test_one_evalsha_fewer_per_keyed_request_on_a_real_redis(redis_server: RedisProcess) -> None:
    """Counted by the server itself (INFO commandstats): a keyed POST with a rate limit is two
    script calls, the admission and the completion."""
    store = RedisStore.from_url(redis_server.url, key_prefix=unique_prefix(), timeout_s=2.0)
    await store.open()
    try:
        app = CountingApp()
        async with client_for(stack(app, store, burst=100)) as c:
            await pay(c, "warm")
            before = (await store.client.info("commandstats"))["cmdstat_evalsha"]["calls"]
            for i in range(10):
                assert (await pay(c, f"k{i}")).status_code == 200
            after = (await store.client.info("commandstats"))["cmdstat_evalsha"]["calls"]
    finally:
        await store.close()
    # the session's server is shared, but tests run one at a time
    assert after - before == 20
