"""Per-plan limits (issue 16, item 3): a policy takes its limit, burst and cost from the client's
plan, read from a verified JWT claim, a header set by a trusted proxy, or a callable; a client
on no listed plan gets the policy's own numbers; ``RateLimit-Policy`` shows the numbers that
applied; the bucket is the client's whatever its plan (an upgrade keeps its tokens)."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest

from gateway import GatewayMiddleware, RateLimitMiddleware, load_config
from gateway.errors import ConfigError
from tests.asgi_helpers import CountingApp, client_for, lifespan_running
from tests.jwt_keys import public_pem, rsa_key, token

PROXY = "10.0.0.5"

POLICY = """
[[rate_limit]]
name = "api"
limit = 2
period = "1h"
plan = "{source}"

[rate_limit.plans]
free = {{ limit = 1 }}
pro = {{ limit = 3, burst = 3 }}
bulk = {{ limit = 10, cost = 5 }}
"""


def planned(store: dict[str, Any], source: str, **identity: Any) -> dict[str, Any]:
    config = tomllib.loads(POLICY.format(source=source))
    config["store"] = store
    config["identity"] = {"sources": ["jwt:sub", "ip"], **identity}
    return config


def jwt_section() -> dict[str, Any]:
    return {"algorithms": ["RS256"], "key": public_pem(rsa_key())}


def auth(**claims: Any) -> dict[str, str]:
    return {"authorization": f"Bearer {token(claims)}"}


async def statuses(c: Any, n: int, headers: dict[str, str]) -> list[int]:
    return [(await c.get("/", headers=headers)).status_code for _ in range(n)]


async def test_two_plans_on_one_policy_from_a_verified_claim(store_section: dict[str, Any]) -> None:
    """Each client gets its plan's numbers, shown in RateLimit-Policy; an unknown plan, no plan or
    a forged token gets the policy's own."""
    gw = GatewayMiddleware(CountingApp(), planned(store_section, "jwt:plan", jwt=jwt_section()))
    async with lifespan_running(gw), client_for(gw) as c:
        free = auth(sub="u-free", plan="free")
        pro = auth(sub="u-pro", plan="pro")
        r_free = await c.get("/", headers=free)
        r_pro = await c.get("/", headers=pro)
        assert r_free.headers["ratelimit-policy"] == '"api";q=1;w=3600'
        assert r_pro.headers["ratelimit-policy"] == '"api";q=3;w=3600'
        assert await statuses(c, 1, free) == [429]
        assert await statuses(c, 3, pro) == [200, 200, 429]
        gold = auth(sub="u-gold", plan="gold")  # not a listed plan
        r_gold = await c.get("/", headers=gold)
        assert r_gold.headers["ratelimit-policy"] == '"api";q=2;w=3600'
        assert await statuses(c, 2, gold) == [200, 429]
        bulk = auth(sub="u-bulk", plan="bulk")  # cost 5 of a burst of 10
        assert await statuses(c, 3, bulk) == [200, 200, 429]
        forged = {"authorization": f"Bearer {token({'sub': 'u-x', 'plan': 'pro'}, key=rsa_key(1))}"}
        r_forged = await c.get("/", headers=forged)
        assert r_forged.headers["ratelimit-policy"] == '"api";q=2;w=3600'


async def test_a_header_plan_is_believed_only_from_a_trusted_proxy(store_section: dict[str, Any]) -> None:
    """``header:X-Plan`` counts when a trusted proxy sent the request, never from the client itself."""
    config = planned(store_section, "header:x-plan", trusted_proxies=["10.0.0.0/8"])
    config["identity"]["sources"] = ["header:x-api-key", "ip"]
    gw = GatewayMiddleware(CountingApp(), config)
    async with lifespan_running(gw):
        async with client_for(gw, client_ip=PROXY) as c:
            via_proxy = await c.get("/", headers={"x-plan": "pro", "x-api-key": "k1"})
        async with client_for(gw, client_ip="203.0.113.50") as c:
            direct = await c.get("/", headers={"x-plan": "pro", "x-api-key": "k2"})
            twice = await c.get("/", headers=[("x-plan", "pro"), ("x-plan", "free"), ("x-api-key", "k3")])
    assert via_proxy.headers["ratelimit-policy"] == '"api";q=3;w=3600'
    assert direct.headers["ratelimit-policy"] == '"api";q=2;w=3600'
    assert twice.status_code == 400  # a header a decision reads comes once


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_callable_plan_alone(store_section: dict[str, Any], kind: str) -> None:
    """In-process, ``plan`` may be a callable (sync or async), on RateLimitMiddleware alone."""
    def sync_plan(scope: Any) -> str | None:
        return dict(scope["headers"]).get(b"x-tier", b"").decode() or None

    async def async_plan(scope: Any) -> str | None:
        return sync_plan(scope)

    policy = {"name": "api", "limit": 2, "period": "1h", "plan": sync_plan if kind == "sync" else async_plan,
              "plans": {"pro": {"limit": 3}}}
    mw = RateLimitMiddleware(CountingApp(), rate_limit=[policy], identity={"sources": ["header:x-user"]},
                             store=store_section)
    async with lifespan_running(mw), client_for(mw) as c:
        pro = await statuses(c, 4, {"x-user": "a", "x-tier": "pro"})
        default = await statuses(c, 3, {"x-user": "b"})
        shown = (await c.get("/", headers={"x-user": "c", "x-tier": "pro"})).headers["ratelimit-policy"]
    assert pro == [200, 200, 200, 429]
    assert default == [200, 200, 429]
    assert shown == '"api";q=3;w=3600'


async def test_a_plan_change_keeps_the_clients_bucket(store_section: dict[str, Any]) -> None:
    """An upgrade mid-window does not hand the client a fresh bucket (its tokens carry over, now
    refilled at the new rate up to the new burst); a downgrade caps them at the smaller burst."""
    gw = GatewayMiddleware(CountingApp(), planned(store_section, "jwt:plan", jwt=jwt_section()))
    async with lifespan_running(gw), client_for(gw) as c:
        assert await statuses(c, 2, auth(sub="u1", plan="free")) == [200, 429]
        upgraded = await c.get("/", headers=auth(sub="u1", plan="pro"))
        assert upgraded.status_code == 429  # the bucket is still empty: no fresh 3 tokens
        assert upgraded.headers["ratelimit-policy"] == '"api";q=3;w=3600'

        first = await c.get("/", headers=auth(sub="u2", plan="bulk"))  # burst 10, cost 5: 5 left
        assert first.headers["ratelimit"] == '"api";r=5;t=1800'
        downgraded = await c.get("/", headers=auth(sub="u2", plan="pro"))  # burst 3: capped, cost 1
        assert downgraded.status_code == 200
        assert downgraded.headers["ratelimit"].startswith('"api";r=2;')


@pytest.mark.parametrize(("policy", "key"), [
    ({"plans": {"pro": {"limit": 10}}}, "rate_limit[0].plans"),  # no plan source
    ({"plan": "header:x-plan"}, "rate_limit[0].plan"),  # no plans
    ({"plan": "ip", "plans": {"pro": {"limit": 10}}}, "rate_limit[0].plan"),
    ({"plan": "header:x-plan", "plans": {}}, "rate_limit[0].plans"),
    ({"plan": "header:x-plan", "plans": {"a b": {"limit": 1}}}, "rate_limit[0].plans.a b"),
    ({"plan": "header:x-plan", "plans": {"pro": {"limit": 0}}}, "rate_limit[0].plans.pro.limit"),
    ({"plan": "header:x-plan", "plans": {"pro": {"limit": 1, "cost": 2}}}, "rate_limit[0].plans.pro.cost"),
    ({"plan": "header:x-plan", "plans": {"pro": {"lmit": 1}}}, "rate_limit[0].plans.pro.lmit"),
    ({"plan": "header:x-plan", "plans": {"pro": 5}}, "rate_limit[0].plans.pro"),
    ({"plan": "jwt:plan", "plans": {"pro": {"limit": 1}}}, "rate_limit[0].plan"),  # no [identity.jwt]
])
def test_bad_plans_are_one_line_naming_the_key(policy: dict[str, Any], key: str) -> None:
    """Every key of a policy's plans is validated, one line naming it."""
    with pytest.raises(ConfigError) as info:
        load_config({"identity": {"trusted_proxies": ["10.0.0.0/8"]}, "rate_limit": [policy]})
    (line,) = info.value.problems
    assert line.startswith(f"{key}: "), line


def test_a_header_plan_needs_trusted_proxies() -> None:
    """Without trusted proxies a header plan would be the client's own say: refused."""
    with pytest.raises(ConfigError) as info:
        load_config({"rate_limit": [{"plan": "header:x-plan", "plans": {"pro": {"limit": 10}}}]})
    (line,) = info.value.problems
    assert line.startswith("rate_limit[0].plan: ")
    assert "trusted_proxies" in line


def test_plan_burst_defaults_to_the_plans_limit_and_cost_to_the_policys() -> None:
    """A plan's burst is its limit unless given; its cost the policy's."""
    cfg = load_config({"identity": {"trusted_proxies": ["10.0.0.0/8"]}, "rate_limit": [
        {"limit": 5, "burst": 7, "cost": 2, "plan": "header:x-plan", "plans": {"pro": {"limit": 100}}}]})
    pro = cfg.rate_limits[0].on_plan("pro")
    assert (pro.limit, pro.burst, pro.cost) == (100, 100, 2)
    assert cfg.rate_limits[0].on_plan("nope") is cfg.rate_limits[0]
