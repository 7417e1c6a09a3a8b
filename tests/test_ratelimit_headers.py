"""``response.rate_limit_headers``: "ietf" (default), "ietf+legacy" (also ``X-RateLimit-*``, with
values equal to the IETF ones) or "none". On fakeredis and real Redis (the ``store`` fixture)."""

from __future__ import annotations

import math
import re
import time
from typing import Any

import httpx
import pytest

from gateway import GatewayMiddleware, RateLimitMiddleware
from gateway.store.redis import RedisStore
from tests.asgi_helpers import CountingApp, client_for
from tests.test_ratelimit import unreachable_store

LEGACY = ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset")
_MEMBER = re.compile(r'"([^"]+)";r=(\d+);t=(\d+)')
_POLICY = re.compile(r'"([^"]+)";q=(\d+);w=(\d+)')


def ietf(r: httpx.Response) -> dict[str, tuple[int, int, int]]:
    """Per policy name: (q, r, t) from RateLimit-Policy and RateLimit."""
    q = {m[0]: int(m[1]) for m in _POLICY.findall(r.headers["ratelimit-policy"])}
    return {m[0]: (q[m[0]], int(m[1]), int(m[2])) for m in _MEMBER.findall(r.headers["ratelimit"])}


def legacy(r: httpx.Response) -> tuple[int, int, int]:
    return (int(r.headers["x-ratelimit-limit"]), int(r.headers["x-ratelimit-remaining"]),
            int(r.headers["x-ratelimit-reset"]))


def assert_legacy_matches(r: httpx.Response, before: float, after: float) -> None:
    """The legacy fields are one policy's IETF values: the fewest tokens left, then the longest
    wait; Reset is the epoch second by which its ``t`` has passed (GitHub's form)."""
    values = ietf(r)
    q, remaining, t = min(values.values(), key=lambda v: (v[1], -v[2]))
    limit, left, reset = legacy(r)
    assert (limit, left) == (q, remaining)
    assert math.ceil(before) + t <= reset <= math.ceil(after) + t
    assert [len(r.headers.get_list(name)) for name in LEGACY] == [1, 1, 1]


def gateway(store: Any, headers: str, *policies: dict[str, Any]) -> GatewayMiddleware:
    return GatewayMiddleware(CountingApp(), {"rate_limit": list(policies),
                                             "response": {"rate_limit_headers": headers}}, store=store)


async def test_legacy_values_equal_the_ietf_ones(store: RedisStore) -> None:
    """Under "ietf+legacy" every response carries both, and X-RateLimit-* are the IETF q, r
    and t (as an epoch Reset) of the most restrictive policy, on 200s and on the 429."""
    gw = gateway(store, "ietf+legacy",
                 {"name": "minute", "limit": 3, "period": "1m"},
                 {"name": "hour", "limit": 100, "period": "1h"})
    answers = []
    async with client_for(gw) as c:
        for _ in range(4):
            before = time.time()
            r = await c.get("/x")
            answers.append((r, before, time.time()))
    assert [r.status_code for r, _, _ in answers] == [200, 200, 200, 429]
    for r, before, after in answers:
        assert "ratelimit" in r.headers
        assert_legacy_matches(r, before, after)
    assert [legacy(r)[:2] for r, _, _ in answers] == [(3, 2), (3, 1), (3, 0), (3, 0)]
    denied = answers[-1][0]
    reset_in = legacy(denied)[2] - math.ceil(answers[-1][2])
    assert int(denied.headers["retry-after"]) - 1 <= reset_in <= int(denied.headers["retry-after"])


async def test_the_policy_with_fewer_tokens_left_is_shown(store: RedisStore) -> None:
    """With a roomy policy and a tight one, the legacy fields follow the tight one."""
    gw = gateway(store, "ietf+legacy",
                 {"name": "roomy", "limit": 1000, "period": "1s"},
                 {"name": "tight", "limit": 5, "period": "1h", "burst": 2})
    async with client_for(gw) as c:
        before = time.time()
        r = await c.get("/x")
        after = time.time()
    assert legacy(r)[:2] == (5, 1)
    assert_legacy_matches(r, before, after)


async def test_ietf_is_the_default_and_has_no_legacy_fields(store: RedisStore) -> None:
    """By default only the IETF fields are sent."""
    gw = GatewayMiddleware(CountingApp(), {"rate_limit": [{"limit": 5}]}, store=store)
    async with client_for(gw) as c:
        r = await c.get("/x")
    assert "ratelimit" in r.headers
    assert not any(name in r.headers for name in LEGACY)


async def test_none_sends_no_fields_but_keeps_retry_after(store: RedisStore) -> None:
    """Under "none" neither 200s nor the 429 carry rate-limit fields; the 429 keeps Retry-After."""
    gw = gateway(store, "none", {"limit": 1, "period": "1m"})
    async with client_for(gw) as c:
        ok = await c.get("/x")
        denied = await c.get("/x")
    assert (ok.status_code, denied.status_code) == (200, 429)
    for r in (ok, denied):
        assert not any(n.lower().startswith(("ratelimit", "x-ratelimit")) for n in r.headers)
    assert int(denied.headers["retry-after"]) >= 1


async def test_none_and_legacy_on_a_store_failure() -> None:
    """Store down, fail open: "none" adds nothing; "ietf+legacy" adds the policy field alone (the
    remaining count is unknown, so no legacy values are made up)."""
    for mode, expected in (("none", set()), ("ietf+legacy", {"ratelimit-policy"})):
        gw = gateway(unreachable_store(), mode, {"limit": 5})
        async with client_for(gw) as c:
            r = await c.get("/x")
        await gw.store.close()
        assert r.status_code == 200
        assert {n for n in r.headers if "ratelimit" in n} == expected


@pytest.mark.parametrize("mode", ["ietf+legacy", "none"])
async def test_the_single_middleware_takes_it_too(store: RedisStore, mode: str) -> None:
    """RateLimitMiddleware takes rate_limit_headers= (and reads [response] from config=)."""
    by_keyword = RateLimitMiddleware(CountingApp(), rate_limit=[{"limit": 5}], store=store,
                                     rate_limit_headers=mode)  # type: ignore[arg-type]
    config = {"rate_limit": [{"limit": 5}], "response": {"rate_limit_headers": mode}}
    by_config = RateLimitMiddleware(CountingApp(), config=config, store=store)
    for mw in (by_keyword, by_config):
        async with client_for(mw) as c:
            r = await c.get("/x")
        assert ("x-ratelimit-remaining" in r.headers) is (mode == "ietf+legacy")
        assert ("ratelimit" in r.headers) is (mode != "none")
