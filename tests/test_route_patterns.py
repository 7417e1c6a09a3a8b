"""Route patterns in ``paths`` (``/v1/charges/*/capture``, ``/users/{id}``) and the exemptions
``exempt_paths`` / ``exempt_methods`` (issue 16, item 2), against near-misses.

A pattern is compiled once and matched by segment on the normal match form, and is a prefix
like a plain entry: it names the paths that match it and those below them. A wildcard stands for
one segment, or several (an encoded slash is one segment to some upstreams): a policy may cover
more requests than the upstream routes to it, never fewer.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from gateway import GatewayMiddleware, load_config
from gateway._paths import PathPrefixes
from gateway.errors import ConfigError
from tests.asgi_helpers import CountingApp, client_for, lifespan_running

PATTERNS = ["/v1/charges/*/capture", "/users/{id}"]


@pytest.mark.parametrize(("path", "expected"), [
    ("/v1/charges/ch_1/capture", True),
    ("/v1/charges/ch_1/capture/", True),
    ("/v1/charges/ch_1/capture/items", True),  # a prefix: what is below it too
    ("/V1/Charges/CH_1/Capture", True),  # case-insensitive, as every matcher
    ("/v1/charges/ch_1;x/capture;y", True),  # ;params cut
    ("/v1/charges/x/../ch_1/capture", True),  # dot segments removed
    ("/v1/charges/a/b/capture", True),  # one id with an encoded slash, decoded
    ("/v1/charges/capture", False),  # no id
    ("/v1/charges//capture", False),  # an empty segment is merged away: no id
    ("/v1/charges/ch_1/capturex", False),
    ("/v1/charges/ch_1/captur", False),
    ("/v1/charges/ch_1", False),
    ("/v1/chargesx/ch_1/capture", False),
    ("/v2/charges/ch_1/capture", False),
    ("/x/v1/charges/ch_1/capture", False),  # anchored at the start
    ("/users/7", True),
    ("/users/7/orders", True),
    ("/users", False),
    ("/users/", False),
    ("/usersx/7", False),
])
def test_patterns_against_near_misses(path: str, expected: bool) -> None:
    """Each path matches the patterns exactly when it names what they name (or below it)."""
    assert PathPrefixes(PATTERNS).matches(path) is expected


@pytest.mark.parametrize(("path", "expected"), [
    ("/api", True), ("/api/", True), ("/api/x", True), ("/apiary", False), ("/ap", False), ("/", False),
])
def test_plain_entries_keep_prefix_semantics(path: str, expected: bool) -> None:
    """Beside patterns, ``/api`` is /api and /api/..., never /apiary."""
    assert PathPrefixes(["/api", *PATTERNS]).matches(path) is expected


def test_exempt_paths_are_taken_out() -> None:
    """``exempt`` entries (plain or patterns) are taken back out of the set, with what is below them."""
    paths = PathPrefixes(["/"], exempt=["/health", "/v1/*/internal"])
    assert not paths.everything
    assert paths.matches("/v1/charges")
    assert paths.matches("/healthz")  # a near-miss of /health is not exempt
    assert not paths.matches("/health")
    assert not paths.matches("/health/live")
    assert not paths.matches("/v1/charges/internal/x")
    assert paths.matches("/v1/internal")


def test_matching_a_huge_path_is_bounded() -> None:
    """Several wildcards against a path of thousands of segments take milliseconds (no regex
    backtracking)."""
    paths = PathPrefixes(["/*/x/*/y/*/z"])
    path = "/" + "/".join(["x", "y"] * 3000) + "/q"
    started = time.perf_counter()
    assert paths.matches(path) is False
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize("bad", ["/v1/ch*", "/v1/{id", "/v1/{}", "/v1/**", "/v1/{1d}", "/v1/x{id}"])
def test_a_wildcard_is_a_whole_segment(bad: str) -> None:
    """A wildcard inside a segment is refused, one line naming the entry."""
    with pytest.raises(ConfigError) as info:
        load_config({"rate_limit": [{"paths": [bad]}]})
    (line,) = info.value.problems
    assert line.startswith("rate_limit[0].paths[0]: a wildcard is a whole segment")


def test_exemption_keys_are_validated() -> None:
    """``exempt_methods`` are registered methods, ``exempt_paths`` paths."""
    with pytest.raises(ConfigError) as info:
        load_config({"rate_limit": [{"exempt_methods": ["GTE"], "exempt_paths": ["health"]}],
                     "concurrency_limit": [{"exempt_paths": ["/x*"]}]})
    keys = sorted(p.split(":")[0] for p in info.value.problems)
    assert keys == ["concurrency_limit[0].exempt_paths[0]", "rate_limit[0].exempt_methods[0]",
                    "rate_limit[0].exempt_paths[0]"]


def stack(store: dict[str, Any], **more: Any) -> tuple[GatewayMiddleware, CountingApp]:
    app = CountingApp()
    config = {"store": store, "identity": {"sources": ["ip"]}, **more}
    return GatewayMiddleware(app, config), app


async def test_a_route_limited_apart_from_its_collection(store_section: dict[str, Any]) -> None:
    """``/v1/charges/*/capture`` has its own limit beside ``/v1/charges``; near-misses are not in it."""
    gw, _ = stack(store_section, rate_limit=[
        {"name": "charges", "limit": 100, "period": "1h", "paths": ["/v1/charges"]},
        {"name": "capture", "limit": 2, "period": "1h", "paths": ["/v1/charges/{id}/capture"]},
    ])
    async with lifespan_running(gw), client_for(gw) as c:
        first = await c.post("/v1/charges/ch_1/capture")
        encoded = await c.post("/v1/charges/ch%2F2/capture")  # one id to an upstream that keeps %2F
        denied = await c.post("/v1/charges/ch_3/capture")
        misses = [await c.post(p)
                  for p in ("/v1/charges/capture", "/v1/charges/ch_1/captured", "/v1/charges")]
    assert first.headers["ratelimit-policy"] == '"charges";q=100;w=3600, "capture";q=2;w=3600'
    assert encoded.status_code == 200
    assert denied.status_code == 429
    assert denied.json()["violated-policies"] == ["capture"]
    for r in misses:
        assert r.status_code == 200
        assert r.headers["ratelimit-policy"] == '"charges";q=100;w=3600'


async def test_exempt_paths_and_methods_are_not_limited(store_section: dict[str, Any]) -> None:
    """A policy's exempt paths and methods pass untouched: no token spent, no RateLimit fields,
    no concurrency slot."""
    gw, app = stack(
        store_section,
        rate_limit=[{"name": "all", "limit": 1, "period": "1h",
                     "exempt_paths": ["/health", "/users/*/avatar"], "exempt_methods": ["HEAD"]}],
        concurrency_limit=[{"name": "slots", "limit": 1, "exempt_paths": ["/health"]}],
    )
    async with lifespan_running(gw), client_for(gw) as c:
        exempt = [await c.get("/health"), await c.get("/health/live"), await c.get("/users/7/avatar"),
                  await c.head("/work")]
        limited = [await c.get("/work"), await c.get("/healthz")]
    for r in exempt:
        assert r.status_code == 200
        assert "ratelimit-policy" not in r.headers
    assert [r.status_code for r in limited] == [200, 429]
    assert app.calls == 5


async def test_required_paths_take_patterns(store_section: dict[str, Any]) -> None:
    """``idempotency.required_paths`` takes patterns: a key is required on the route, not its near-misses."""
    gw, _ = stack(store_section, idempotency={"required_paths": ["/v1/charges/*/refunds"]})
    async with lifespan_running(gw), client_for(gw) as c:
        missing = await c.post("/v1/charges/ch_1/refunds")
        other = await c.post("/v1/charges/ch_1/refundsx")
    assert missing.status_code == 400
    assert other.status_code == 200
