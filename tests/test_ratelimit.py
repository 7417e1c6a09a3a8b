"""RateLimitMiddleware on the wire: IETF fields, 429s, matching, identity, store failures.

Every test runs on fakeredis (memory://) and on a real redis-server.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from gateway import ConfigError, GatewayMiddleware, RateLimitMiddleware
from gateway.store.redis import RedisStore
from tests.asgi_helpers import CountingApp, client_for
from tests.redis_process import free_port


def gateway(
    app: CountingApp, store: RedisStore, *policies: dict[str, Any], **config: Any
) -> GatewayMiddleware:
    return GatewayMiddleware(app, {"rate_limit": list(policies), **config}, store=store)


def unreachable_store() -> RedisStore:
    """A store on a loopback port nobody listens on: every call fails at once."""
    return RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0", key_prefix="x", timeout_s=0.5)


class TestFields:
    async def test_allowed_response_carries_policy_and_remaining(self, store: RedisStore) -> None:
        """An allowed response has RateLimit-Policy (q=limit, w=period s) and RateLimit (r, t)."""
        app = CountingApp()
        gw = gateway(app, store, {"name": "per-client", "limit": 10, "period": "1m", "burst": 5})
        async with client_for(gw) as c:
            r = await c.get("/x")
        assert r.status_code == 200
        assert r.text == "ok"
        assert r.headers["ratelimit-policy"] == '"per-client";q=10;w=60'
        # one token of five used; one token takes 6 s, so the bucket is full again in 6 s
        assert r.headers["ratelimit"] == '"per-client";r=4;t=6'

    async def test_every_matching_policy_in_config_order(self, store: RedisStore) -> None:
        """Each matching policy is one list member, in config order; others are absent."""
        app = CountingApp()
        gw = gateway(
            app, store,
            {"name": "global", "limit": 1000, "period": "1s", "key": "global"},
            {"name": "writes", "limit": 5, "period": "1m", "methods": ["POST"]},
            {"name": "api", "limit": 100, "period": "1h", "paths": ["/api"]},
        )
        async with client_for(gw) as c:
            get_api = await c.get("/api/items")
            post_api = await c.post("/api")
            get_other = await c.get("/apiary")
        assert get_api.headers["ratelimit-policy"] == '"global";q=1000;w=1, "api";q=100;w=3600'
        assert post_api.headers["ratelimit-policy"] == (
            '"global";q=1000;w=1, "writes";q=5;w=60, "api";q=100;w=3600')
        assert get_other.headers["ratelimit-policy"] == '"global";q=1000;w=1'
        names = [m.split(";")[0] for m in post_api.headers["ratelimit"].split(", ")]
        assert names == ['"global"', '"writes"', '"api"']

    async def test_unmatched_request_has_no_fields_and_needs_no_store(self, store: RedisStore) -> None:
        """A request no policy matches passes untouched, even when the store is down."""
        app = CountingApp()
        gw = GatewayMiddleware(app, {"rate_limit": [{"paths": ["/api"], "on_store_error": "deny"}]},
                               store=unreachable_store())
        async with client_for(gw) as c:
            r = await c.get("/health")
        await gw.store.close()
        assert r.status_code == 200
        assert "ratelimit" not in r.headers
        assert "ratelimit-policy" not in r.headers

    async def test_app_fields_are_kept(self, store: RedisStore) -> None:
        """RateLimit fields the app sends itself are kept beside the gateway's (never stripped)."""
        app = CountingApp(extra_headers=[(b"ratelimit", b'"upstream";r=3')])
        gw = gateway(app, store, {"name": "p", "limit": 5, "period": "1m"})
        async with client_for(gw) as c:
            r = await c.get("/")
        assert r.headers.get_list("ratelimit") == ['"upstream";r=3', '"p";r=4;t=12']


class TestDenial:
    async def test_429_problem_with_retry_after(self, store: RedisStore) -> None:
        """Past the burst: 429 problem+json, Retry-After = t, r=0, violated-policies, app not called."""
        app = CountingApp()
        gw = gateway(app, store, {"name": "per-client", "limit": 5, "period": "1m", "burst": 2})
        async with client_for(gw) as c:
            statuses = [(await c.get("/")).status_code for _ in range(2)]
            r = await c.get("/")
        assert statuses == [200, 200]
        assert app.calls == 2
        assert r.status_code == 429
        assert r.headers["content-type"] == "application/problem+json"
        assert r.headers["cache-control"] == "no-store"
        assert r.headers["retry-after"] == "12"
        assert r.headers["ratelimit"] == '"per-client";r=0;t=12'
        assert r.headers["ratelimit-policy"] == '"per-client";q=5;w=60'
        assert r.headers["x-request-id"]
        body = r.json()
        assert body["status"] == 429
        assert body["type"] == "https://iana.org/assignments/http-problem-types#quota-exceeded"
        assert body["violated-policies"] == ["per-client"]
        assert body["title"]
        assert body["detail"]

    async def test_retry_after_is_the_largest_denying_t(self, store: RedisStore) -> None:
        """With two denying policies, Retry-After is the larger t and each shows its own t."""
        app = CountingApp()
        gw = gateway(app, store,
                     {"name": "short", "limit": 1, "period": "10s", "burst": 1},
                     {"name": "long", "limit": 1, "period": "1m", "burst": 1},
                     {"name": "roomy", "limit": 100, "period": "1m"})
        async with client_for(gw) as c:
            await c.get("/")
            r = await c.get("/")
        assert r.status_code == 429
        assert r.headers["retry-after"] == "60"
        assert r.headers["ratelimit"] == '"short";r=0;t=10, "long";r=0;t=60, "roomy";r=99;t=1'
        assert r.json()["violated-policies"] == ["short", "long"]

    async def test_retry_after_rounds_up_never_below_t(self, store: RedisStore) -> None:
        """A wait of 1.5 s is advertised as t=2 and Retry-After 2 (rounded up)."""
        app = CountingApp()
        gw = gateway(app, store, {"name": "p", "limit": 2, "period": "3s", "burst": 1})
        async with client_for(gw) as c:
            await c.get("/")
            r = await c.get("/")
        assert r.status_code == 429
        t = int(r.headers["ratelimit"].rsplit("t=", 1)[1])
        assert int(r.headers["retry-after"]) >= t >= 1
        assert t == 2

    async def test_denial_charges_no_other_policy(self, store: RedisStore) -> None:
        """A request denied by one policy leaves the other policies' tokens untouched."""
        app = CountingApp()
        gw = gateway(app, store,
                     {"name": "posts", "limit": 1, "period": "1h", "burst": 1, "methods": ["POST"]},
                     {"name": "all", "limit": 10, "period": "1h", "burst": 10})
        async with client_for(gw) as c:
            assert (await c.post("/")).status_code == 200
            for _ in range(3):
                assert (await c.post("/")).status_code == 429
            r = await c.get("/")
        assert r.headers["ratelimit"].startswith('"all";r=8;')  # 1 POST + this GET, no denials


class TestKeys:
    async def test_identities_have_separate_buckets(self, store: RedisStore) -> None:
        """Two API keys each get their own bucket; the same key shares one across IPs."""
        app = CountingApp()
        gw = gateway(app, store, {"name": "p", "limit": 1, "period": "1h", "burst": 1})
        async with client_for(gw, "198.51.100.1") as a, client_for(gw, "198.51.100.2") as b:
            assert (await a.get("/", headers={"x-api-key": "alice"})).status_code == 200
            assert (await a.get("/", headers={"x-api-key": "bob"})).status_code == 200
            assert (await b.get("/", headers={"x-api-key": "alice"})).status_code == 429
            assert (await b.get("/")).status_code == 200  # no key: identified by its IP

    async def test_spoofed_forwarded_for_is_ignored_without_trusted_proxies(self, store: RedisStore) -> None:
        """A client cannot get a fresh bucket by writing X-Forwarded-For itself."""
        app = CountingApp()
        gw = gateway(app, store, {"name": "p", "limit": 1, "period": "1h", "burst": 1, "key": "ip"})
        async with client_for(gw) as c:
            assert (await c.get("/", headers={"x-forwarded-for": "1.1.1.1"})).status_code == 200
            assert (await c.get("/", headers={"x-forwarded-for": "2.2.2.2"})).status_code == 429

    async def test_trusted_proxy_forwarded_for_is_the_client(self, store: RedisStore) -> None:
        """Behind a trusted proxy, the first untrusted X-Forwarded-For hop from the right is the client."""
        app = CountingApp()
        gw = gateway(app, store, {"name": "p", "limit": 1, "period": "1h", "burst": 1, "key": "ip"},
                     identity={"trusted_proxies": ["10.0.0.0/8"]})
        async with client_for(gw, "10.0.0.2") as proxy:
            assert (await proxy.get("/", headers={"x-forwarded-for": "6.6.6.6, 1.2.3.4"})).status_code == 200
            assert (await proxy.get("/", headers={"x-forwarded-for": "7.7.7.7, 1.2.3.4"})).status_code == 429
            assert (await proxy.get("/", headers={"x-forwarded-for": "1.2.3.5"})).status_code == 200

    async def test_header_key_without_header_shares_one_bucket(self, store: RedisStore) -> None:
        """A header:NAME policy puts every request lacking the header into one shared bucket."""
        app = CountingApp()
        gw = gateway(app, store,
                     {"name": "tenant", "limit": 1, "period": "1h", "burst": 1, "key": "header:x-tenant"})
        async with client_for(gw, "198.51.100.1") as a, client_for(gw, "198.51.100.2") as b:
            assert (await a.get("/")).status_code == 200
            assert (await b.get("/")).status_code == 429
            assert (await b.get("/", headers={"x-tenant": "acme"})).status_code == 200
            assert (await a.get("/", headers={"x-tenant": "acme"})).status_code == 429

    async def test_global_key_is_shared_by_everyone(self, store: RedisStore) -> None:
        """A global policy is one bucket for all clients."""
        app = CountingApp()
        gw = gateway(app, store, {"name": "g", "limit": 2, "period": "1h", "key": "global"})
        async with client_for(gw, "198.51.100.1") as a, client_for(gw, "198.51.100.2") as b:
            assert (await a.get("/")).status_code == 200
            assert (await b.get("/")).status_code == 200
            assert (await a.get("/", headers={"x-api-key": "k"})).status_code == 429

    async def test_no_secret_reaches_the_store(self, store: RedisStore) -> None:
        """Neither the API key nor the client address appears in any store key or value."""
        app = CountingApp()
        gw = gateway(app, store, {"name": "id", "limit": 9, "period": "1h"},
                     {"name": "ip", "limit": 9, "period": "1h", "key": "ip"},
                     {"name": "hdr", "limit": 9, "period": "1h", "key": "header:x-api-key"})
        async with client_for(gw, "198.51.100.77") as c:
            await c.get("/", headers={"x-api-key": "sk_live_SECRET123"})
        dump = b""
        prefix = store.key("t", "p").partition(":v1:")[0]  # this test's keys, not other tests'
        async for key in store.client.scan_iter(match=f"{prefix}:*", count=1000):
            dump += key + b" " + repr(await store.client.hgetall(key)).encode()
        assert dump.count(b":v1:rl:") >= 3
        assert b"SECRET123" not in dump
        assert b"198.51.100.77" not in dump


class TestStoreFailure:
    async def test_allow_passes_with_policy_only(self, caplog: pytest.LogCaptureFixture) -> None:
        """on_store_error=allow: the request passes, RateLimit is not made up, a warning is logged."""
        app = CountingApp()
        gw = GatewayMiddleware(app, {"rate_limit": [{"name": "p", "limit": 5, "period": "1m"}]},
                               store=unreachable_store())
        with caplog.at_level(logging.WARNING, logger="gateway"):
            async with client_for(gw) as c:
                r = await c.get("/")
        await gw.store.close()
        assert r.status_code == 200
        assert app.calls == 1
        assert r.headers["ratelimit-policy"] == '"p";q=5;w=60'
        assert "ratelimit" not in r.headers
        record = next(r for r in caplog.records if getattr(r, "event", "") == "ratelimit.store_error")
        assert record.action == "allow"  # type: ignore[attr-defined]
        assert record.request_id == r.headers["x-request-id"]  # type: ignore[attr-defined]

    async def test_deny_answers_503_without_calling_the_app(self) -> None:
        """on_store_error=deny on any matching policy: 503 problem+json with Retry-After."""
        app = CountingApp()
        gw = GatewayMiddleware(app, {"rate_limit": [
            {"name": "soft", "limit": 5, "period": "1m"},
            {"name": "hard", "limit": 5, "period": "1m", "on_store_error": "deny"},
        ]}, store=unreachable_store())
        async with client_for(gw) as c:
            r = await c.get("/")
        await gw.store.close()
        assert r.status_code == 503
        assert app.calls == 0
        assert r.headers["content-type"] == "application/problem+json"
        assert int(r.headers["retry-after"]) >= 1
        body = r.json()
        assert body["status"] == 503
        assert body["type"] == "urn:gateway:problem:store-unavailable"
        assert "Traceback" not in json.dumps(body)


class TestStandalone:
    async def test_keyword_settings_like_the_toml(self) -> None:
        """RateLimitMiddleware alone takes the TOML sections as keyword arguments."""
        app = CountingApp()
        mw = RateLimitMiddleware(app, rate_limit=[{"name": "p", "limit": 1, "period": "1h"}],
                                 store="memory://", identity={"sources": ["ip"]})
        async with client_for(mw) as c:
            assert (await c.get("/")).status_code == 200
            r = await c.get("/")
        await mw.store.close()
        assert r.status_code == 429
        assert r.headers["x-request-id"]  # a lone middleware's problem still names itself

    def test_bad_keyword_settings_name_the_key(self) -> None:
        """Bad settings raise ConfigError lines naming the key, as load_config does."""
        with pytest.raises(ConfigError) as err:
            RateLimitMiddleware(CountingApp(), rate_limit=[{"period": "fast"}], store={"url": "mysql://x"})
        assert set(err.value.problems) == {
            'rate_limit[0].period: expected a duration like "2s", got "fast"',
            'store.url: expected a URL (memory:// or redis:// or rediss:// or unix://), got "mysql://x"',
        }

    async def test_starlette_add_middleware(self) -> None:
        """Starlette's add_middleware builds it from keyword settings and it limits the routes."""
        app = Starlette(routes=[Route("/", lambda request: PlainTextResponse("hi"))])
        app.add_middleware(RateLimitMiddleware, rate_limit=[{"name": "p", "limit": 1, "period": "1h"}],
                           store="memory://")
        async with client_for(app) as c:
            first, second = await c.get("/"), await c.get("/")
        assert (first.status_code, first.text) == (200, "hi")
        assert second.status_code == 429
