"""Shadow mode (``[[rate_limit]] mode = "shadow"``): a shadow policy never refuses, is never shown
to clients, and counts exactly what enforcing it would have refused.

The core check runs the same traffic twice, once with the policy enforced and once shadowed, on
fresh buckets, and compares: the shadow run's ``shadow_deny`` counts are the enforced run's 429s
(``deny`` counts), and no response of the shadow run is a 429 or names the shadow policy. On
fakeredis and a real redis-server (plain and keyed requests, sequential and concurrent), and on
a real Redis Cluster with the policies' buckets in different slots.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import uuid
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway import ConfigError, GatewayMiddleware, load_config
from gateway.cli import main
from gateway.identity import GLOBAL_TAG
from gateway.store import BucketSpec, RateDecision, TakePlan
from gateway.store.cluster import ClusterStore
from gateway.store.redis import RedisStore
from tests.asgi_helpers import CountingApp, client_for, lifespan_running
from tests.conftest import TEST_STORE_TIMEOUT_S, unique_prefix
from tests.redis_cluster import RedisCluster
from tests.redis_process import RedisProcess, free_port
from tests.test_cluster import RecordingApp, clients_per_master, gateway_on, identity_tag
from tests.test_denials import rate_limiter
from tests.test_take_claim import Calls

# the redis_cluster fixture
pytest_plugins = ["tests.cluster_fixtures"]

DECISIONS = ("allow", "deny", "shadow_deny", "error")
TIGHT = {"name": "tight", "limit": 10, "period": "1h", "burst": 10}  # a token per 6 min: no refill here
LOOSE = {"name": "loose", "limit": 100, "period": "1h", "burst": 100}


# ------------------------------------------------------------------------------------- helpers
def shadowed(policies: Sequence[dict[str, Any]], names: set[str]) -> list[dict[str, Any]]:
    """The policies, those named in ``names`` in shadow mode."""
    return [{**p, "mode": "shadow"} if p["name"] in names else dict(p) for p in policies]


def gateway(store: Any, policies: Sequence[dict[str, Any]], app: Any = None) -> GatewayMiddleware:
    return GatewayMiddleware(app or CountingApp(), {
        "rate_limit": list(policies), "identity": {"sources": ["header:x-api-key"]}}, store=store)


def counts(gw: GatewayMiddleware, name: str) -> dict[str, float]:
    """The ``gateway_ratelimit_decisions_total`` values of one policy, by decision."""
    return {d: gw.metrics.registry.get_sample_value(
        "gateway_ratelimit_decisions_total", {"policy": name, "decision": d}) or 0.0 for d in DECISIONS}


def mentions(r: httpx.Response, name: str) -> bool:
    """Whether the response names policy ``name`` anywhere a client reads limits."""
    fields = r.headers.get_list("ratelimit") + r.headers.get_list("ratelimit-policy")
    if any(f'"{name}"' in f for f in fields):
        return True
    return r.status_code == 429 and name in r.json()["violated-policies"]


async def send(c: httpx.AsyncClient, api_key: str, *, keyed: bool) -> httpx.Response:
    headers = {"x-api-key": api_key}
    if keyed:
        headers["idempotency-key"] = uuid.uuid4().hex
        return await c.post("/pay", content=b"{}", headers=headers)
    return await c.get("/x", headers=headers)


async def drive(gw: GatewayMiddleware, clients: Sequence[str], per_client: int, *, keyed: bool = False,
                concurrent: bool = False) -> list[httpx.Response]:
    """``per_client`` requests from each client, one after another or all at once."""
    order = [k for _ in range(per_client) for k in clients]
    async with client_for(gw) as c:
        if concurrent:
            return list(await asyncio.gather(*(send(c, k, keyed=keyed) for k in order)))
        return [await send(c, k, keyed=keyed) for k in order]


def shadow_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", "") == "ratelimit.shadow_denied"]


# ------------------------------------------------------------------------------- the same traffic
@pytest.mark.parametrize("keyed", [False, True], ids=["get", "keyed-post"])
@pytest.mark.parametrize("concurrent", [False, True], ids=["sequential", "gather"])
async def test_same_traffic_both_ways_one_policy(
    store: RedisStore, keyed: bool, concurrent: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """40 requests at burst 10: enforced, 30 get 429; shadowed, none does, ``shadow_deny`` is 30,
    ``allow`` 10, one log line per would-be 429 with its Retry-After, and no RateLimit field at all
    (the only matching policy is shadow); keyed POSTs take the combined take+claim path."""
    calls = Calls(store)
    enforced, shadow = gateway(calls, [TIGHT]), gateway(calls, shadowed([TIGHT], {"tight"}))
    enforced_run = await drive(enforced, ["enf"], 40, keyed=keyed, concurrent=concurrent)
    calls.names.clear()
    with caplog.at_level(logging.INFO, logger="gateway.ratelimit"):
        shadow_run = await drive(shadow, ["sha"], 40, keyed=keyed, concurrent=concurrent)
    refused = [r for r in enforced_run if r.status_code == 429]
    assert len(refused) == 30
    assert counts(enforced, "tight") == {"allow": 10, "deny": 30, "shadow_deny": 0, "error": 0}
    assert [r.status_code for r in shadow_run] == [200] * 40
    assert counts(shadow, "tight") == {"allow": 10, "deny": 0, "shadow_deny": len(refused), "error": 0}
    for r in shadow_run:
        assert "ratelimit" not in r.headers
        assert "ratelimit-policy" not in r.headers
    lines = shadow_lines(caplog)
    assert len(lines) == 30
    assert {getattr(line, "retry_after_s", None) for line in lines} == {360}  # as the 429s said
    assert {r.headers["retry-after"] for r in refused} == {"360"}
    assert all(getattr(line, "policies", None) == ["tight"] for line in lines)
    denied_ids = {getattr(line, "request_id", None) for line in lines}
    assert denied_ids <= {r.headers["x-request-id"] for r in shadow_run}
    assert len(denied_ids) == 30
    if keyed:
        assert "ratelimit_take" not in calls.names  # every take went with its claim
        assert calls.names.count("ratelimit_take_claim") == 40


@pytest.mark.parametrize("concurrent", [False, True], ids=["sequential", "gather"])
async def test_same_traffic_both_ways_enforced_loose_beside_shadow_tight(
    store: RedisStore, concurrent: bool
) -> None:
    """An enforced policy with room beside a tight one: shadowing the tight one turns its 30
    denials into 30 ``shadow_deny`` and no 429; the enforced one is charged for every request,
    and it alone is shown."""
    policies = [LOOSE, TIGHT]
    both, mixed = gateway(store, policies), gateway(store, shadowed(policies, {"tight"}))
    enforced_run = await drive(both, ["e1", "e2"], 20, concurrent=concurrent)
    shadow_run = await drive(mixed, ["s1", "s2"], 20, concurrent=concurrent)
    assert sum(r.status_code == 429 for r in enforced_run) == 2 * 10
    assert counts(mixed, "tight")["shadow_deny"] == counts(both, "tight")["deny"] == 20
    assert counts(mixed, "tight")["allow"] == counts(both, "tight")["allow"] == 20
    assert [r.status_code for r in shadow_run] == [200] * 40
    assert counts(mixed, "loose") == {"allow": 40, "deny": 0, "shadow_deny": 0, "error": 0}
    assert all(r.headers["ratelimit-policy"] == '"loose";q=100;w=3600' for r in shadow_run)
    assert not any(mentions(r, "tight") for r in shadow_run)
    left = sorted(int(r.headers["ratelimit"].split("r=")[1].split(";")[0]) for r in shadow_run)
    assert left == sorted([*range(80, 100)] * 2)  # the enforced bucket took every request


async def test_same_traffic_both_ways_enforced_tight_beside_shadow_tighter(store: RedisStore) -> None:
    """Enforced burst 10 beside shadow burst 5: the shadow policy counts 35 ``shadow_deny`` as
    enforcing it denies 35; the real 429s (the enforced policy's, some answered locally) name
    only the enforced policy and carry its Retry-After."""
    tighter = {"name": "tighter", "limit": 5, "period": "1h", "burst": 5}
    policies = [TIGHT, tighter]
    both, mixed = gateway(store, policies), gateway(store, shadowed(policies, {"tighter"}))
    await drive(both, ["e"], 40)
    shadow_run = await drive(mixed, ["s"], 40)
    assert counts(both, "tighter")["deny"] == counts(mixed, "tighter")["shadow_deny"] == 35
    assert counts(both, "tighter")["allow"] == counts(mixed, "tighter")["allow"] == 5
    assert [r.status_code for r in shadow_run] == [200] * 10 + [429] * 30
    assert counts(mixed, "tight") == {"allow": 10, "deny": 30, "shadow_deny": 0, "error": 0}
    assert not any(mentions(r, "tighter") for r in shadow_run)
    refused = shadow_run[10:]
    assert all(r.json()["violated-policies"] == ["tight"] for r in refused)
    assert all(r.headers["ratelimit"] == '"tight";r=0;t=360' for r in refused[:1])
    assert {r.headers["retry-after"] for r in refused} <= {"360", "359"}


async def test_two_shadow_policies_one_denying(store: RedisStore) -> None:
    """Two shadow policies, one tight: the tight one counts shadow_deny; the roomy one counts
    allow only while the request would pass, and is not charged otherwise (as if enforced)."""
    policies = shadowed([LOOSE, TIGHT], {"loose", "tight"})
    gw = gateway(store, policies)
    run = await drive(gw, ["two"], 15)
    assert [r.status_code for r in run] == [200] * 15
    assert counts(gw, "tight") == {"allow": 10, "deny": 0, "shadow_deny": 5, "error": 0}
    assert counts(gw, "loose") == {"allow": 10, "deny": 0, "shadow_deny": 0, "error": 0}
    assert [await level(gw, n, identity_of("two")) for n in ("loose", "tight")] == [90, 0]


def identity_of(api_key: str) -> str:
    return identity_tag(api_key)


async def level(gw: GatewayMiddleware, name: str, tag: str) -> int:
    """The whole tokens in one policy's bucket, read by one enforced take (which may charge it)."""
    policy = next(p for p in gw.config.rate_limits if p.name == name)
    plan = TakePlan.of([replace(BucketSpec.from_policy(policy), shadow=False)])
    d = await gw.store.ratelimit_take(plan, [tag])
    return d.buckets[0].remaining + d.allowed


# ----------------------------------------------------------------------------------- refusals
async def test_an_enforced_429_leaves_out_the_shadow_policy(store: RedisStore) -> None:
    """Both lack: the 429 names the enforced policy alone, its Retry-After is the enforced wait
    (not the longer shadow one), and the shadow policy is counted shadow_deny."""
    short = {"name": "short", "limit": 1, "period": "10s", "burst": 1}
    long = {"name": "long", "limit": 1, "period": "1h", "burst": 1, "mode": "shadow"}
    gw = gateway(store, [short, long])
    run = await drive(gw, ["x"], 2)
    assert run[0].headers["ratelimit-policy"] == '"short";q=1;w=10'
    denied = run[1]
    assert denied.status_code == 429
    assert denied.headers["retry-after"] == "10"
    assert denied.headers["ratelimit"] == '"short";r=0;t=10'
    assert denied.json()["violated-policies"] == ["short"]
    assert counts(gw, "long") == {"allow": 1, "deny": 0, "shadow_deny": 1, "error": 0}


async def test_only_enforced_denials_are_remembered_locally(store: RedisStore) -> None:
    """A shadow-only denial leaves no local entry (later requests go to the store and pass); an
    enforced denial's entry lasts for the enforced wait, not a shorter shadow one."""
    gw = gateway(store, shadowed([TIGHT], {"tight"}))
    await drive(gw, ["quiet"], 20)
    assert len(rate_limiter(gw)._denials) == 0
    enforced = {"name": "hourly", "limit": 1, "period": "1h", "burst": 1}
    secondly = {"name": "secondly", "limit": 1, "period": "1s", "burst": 1, "mode": "shadow"}
    gw = gateway(store, [enforced, secondly])
    await drive(gw, ["loud"], 2)
    ((until, sent_at, _),) = rate_limiter(gw)._denials.entries.values()
    assert until - sent_at > 3000  # the hour's wait, not the second's


async def test_a_shadow_policy_never_answers_503() -> None:
    """Store down: a shadow policy's on_store_error = "deny" is not a 503 (fail open, no fields);
    beside an enforced "allow" policy only that one's policy field is shown; an enforced "deny"
    still answers 503. Every matched policy counts error."""
    dead = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0", key_prefix="x", timeout_s=0.5)
    strict = {"name": "strict", "limit": 5, "period": "1m", "on_store_error": "deny"}
    lenient = {"name": "lenient", "limit": 5, "period": "1m"}
    try:
        alone = gateway(dead, shadowed([strict], {"strict"}))
        r = (await drive(alone, ["k"], 1))[0]
        assert r.status_code == 200
        assert "ratelimit-policy" not in r.headers
        assert counts(alone, "strict")["error"] == 1
        beside = gateway(dead, [lenient, *shadowed([strict], {"strict"})])
        r = (await drive(beside, ["k"], 1))[0]
        assert r.status_code == 200
        assert r.headers["ratelimit-policy"] == '"lenient";q=5;w=60'
        enforced = gateway(dead, [strict, {**lenient, "mode": "shadow", "on_store_error": "deny"}])
        r = (await drive(enforced, ["k"], 1))[0]
        assert r.status_code == 503
        assert r.headers["ratelimit-policy"] == '"strict";q=5;w=60'
    finally:
        await dead.close()


# --------------------------------------------------------------------------------------- config
def test_mode_is_read_and_checked() -> None:
    """``mode`` defaults to enforce, takes shadow, and a bad value names the key."""
    config = load_config({"rate_limit": [{"name": "a"}, {"name": "b", "mode": "shadow"}]})
    assert [p.mode for p in config.rate_limits] == ["enforce", "shadow"]
    assert [p.shadow for p in config.rate_limits] == [False, True]
    assert [BucketSpec.from_policy(p).shadow for p in config.rate_limits] == [False, True]
    with pytest.raises(ConfigError) as caught:
        load_config({"rate_limit": [{"mode": "dry-run"}]})
    assert list(caught.value.problems) == [
        'rate_limit[0].mode: expected "enforce" or "shadow", got "dry-run"']


def test_gateway_check_accepts_shadow_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`gateway check` takes a shadow policy and refuses a bad mode with one line naming the key."""
    good = tmp_path / "good.toml"
    good.write_text('[[rate_limit]]\nname = "new-limit"\nlimit = 5\nmode = "shadow"\n')
    assert main(["check", str(good)]) == 0
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rate_limit]]\nmode = "Shadow"\n')
    assert main(["check", str(bad)]) == 2
    problem = 'rate_limit[0].mode: expected "enforce" or "shadow", got "Shadow"'
    assert capsys.readouterr().err.strip() == problem


# -------------------------------------------------------------------------------------- cluster
CLIENT = {"name": "per-client", "key": "identity", "limit": 4, "period": "1h", "burst": 4}
GLOBAL = {"name": "global", "key": "global", "limit": 10, "period": "1h", "burst": 10}


@pytest.mark.parametrize(("policies", "shadow"), [
    ([CLIENT, GLOBAL], {"per-client", "global"}),  # both shadow: everything exactly as enforced
    ([{**CLIENT, "limit": 100, "burst": 100}, GLOBAL], {"global"}),  # the enforced one never lacks
    ([{**CLIENT, "limit": 100, "burst": 100}, GLOBAL], {"per-client"}),  # the shadow one never lacks
], ids=["both-shadow", "global-shadow", "client-shadow"])
async def test_same_traffic_both_ways_on_the_cluster(
    redis_cluster: RedisCluster, policies: list[dict[str, Any]], shadow: set[str]
) -> None:
    """Per-client buckets on every master beside a global bucket (other slots): the shadow run
    counts shadow_deny exactly as the enforced run denies, refuses nothing a shadow policy would,
    and leaves every bucket as the enforced run does for the shadow policies (a group's shadow
    charge is refunded when another slot's bucket lacked)."""
    runs = []
    for modes in (set(), shadow):
        app = RecordingApp()
        gw = gateway_on(redis_cluster, app, rate_limit=shadowed(policies, modes))
        by_master = clients_per_master(redis_cluster, gw.store, 2, "per-client")
        clients = [k for group in by_master.values() for k in group]
        async with lifespan_running(gw):
            seen = await drive(gw, clients, 7)
            levels = {"global": [await level(gw, "global", GLOBAL_TAG)],
                      "per-client": [await level(gw, "per-client", identity_tag(k)) for k in clients]}
        runs.append((gw, seen, levels))
    (enf, enf_seen, enf_levels), (sh, sh_seen, sh_levels) = runs
    for p in policies:
        name = p["name"]
        if name in shadow:
            assert counts(sh, name)["shadow_deny"] == counts(enf, name)["deny"], name
            assert counts(sh, name)["allow"] == counts(enf, name)["allow"], name
            assert counts(sh, name)["deny"] == 0
            assert not any(mentions(r, name) for r in sh_seen)
    assert counts(enf, "global")["deny"] > 0
    assert sum(r.status_code == 429 for r in sh_seen) == sum(
        r.status_code == 429 and not set(r.json()["violated-policies"]) & shadow for r in enf_seen)
    for name in shadow:  # the clients are other ones, in the same pattern: same levels in order
        assert sh_levels[name] == enf_levels[name], name
    if shadow == {"per-client", "global"}:
        assert [r.status_code for r in sh_seen] == [201] * len(sh_seen)
    for gw, *_ in runs:
        assert counts(gw, "global")["error"] == 0


async def test_masked_takes_across_slots_match_one_redis(
    redis_cluster: RedisCluster, redis_server: RedisProcess
) -> None:
    """300 takes with random masks and costs over buckets in three slots (a cluster: three
    groups, refunds) and on one Redis (one script): the same decisions, the same tokens left,
    the same buckets lacking, and the same levels at the end."""
    rng = random.Random(153)
    cluster = ClusterStore.from_url(redis_cluster.url, key_prefix=unique_prefix(),
                                    timeout_s=TEST_STORE_TIMEOUT_S)
    single = RedisStore.from_url(redis_server.url, key_prefix=unique_prefix(), timeout_s=TEST_STORE_TIMEOUT_S)
    tags = ["alpha", "alpha", "bravo", "charlie"]
    bursts = [6, 9, 5, 12]
    assert len({cluster.key(t, "x") for t in tags}) == 3

    def plan(shadow: list[bool], costs: list[int]) -> TakePlan:
        g = math.gcd(1, 3_600_000)
        return TakePlan.of([BucketSpec(f"b{i}", unit=3_600_000 // g, refill=1, burst=b, cost=c, shadow=s)
                            for i, (b, c, s) in enumerate(zip(bursts, costs, shadow, strict=True))])

    def view(d: RateDecision) -> tuple[bool, bool, list[int], list[bool]]:
        return d.allowed, d.would_allow, [b.remaining for b in d.buckets], [b.wait_ms > 0 for b in d.buckets]

    await cluster.open()
    await single.open()
    try:
        shadow_denials = refunds_needed = 0
        for step in range(300):
            shadow = [rng.random() < 0.5 for _ in tags]
            costs = [rng.randint(1, 3) for _ in tags]
            p = plan(shadow, costs)
            one, many = await single.ratelimit_take(p, tags), await cluster.ratelimit_take(p, tags)
            assert view(many) == view(one), step
            shadow_denials += one.shadow_denied
            refunds_needed += not one.would_allow
            if step % 25 == 24:  # refill the buckets now and then, identically on both
                for i, tag in enumerate(tags):
                    for st in (single, cluster):
                        await st.client.delete(st.key(tag, f"b{i}"))
        assert shadow_denials > 20
        assert refunds_needed > 50
        final = plan([False] * 4, [1] * 4)
        for i, tag in enumerate(tags):
            single_plan = TakePlan.of([final.specs[i]])
            a = await single.ratelimit_take(single_plan, [tag])
            assert view(a) == view(await cluster.ratelimit_take(single_plan, [tag]))
    finally:
        await cluster.close()
        await single.close()


async def test_combined_take_claim_with_a_shadow_bucket_on_the_cluster(redis_cluster: RedisCluster) -> None:
    """Buckets and record in one slot: the mask reaches the combined script on its master; a
    shadow denial still claims (charging the enforced bucket only), its resend answers the same,
    and an enforced denial claims nothing."""
    from redis.crc import key_slot

    from gateway.config import IdempotencyConfig
    from gateway.store import LeaseTerms

    terms = LeaseTerms.from_config(IdempotencyConfig())
    store = ClusterStore.from_url(redis_cluster.url, key_prefix=unique_prefix(),
                                    timeout_s=TEST_STORE_TIMEOUT_S)
    slot = key_slot(store.key("tag", "e").encode())
    same: list[str] = []
    for r in (f"r{i}" for i in range(500_000)):
        if key_slot(store.record_key(r).encode()) == slot:
            same.append(r)
            if len(same) == 3:
                break
    plan = TakePlan.of([BucketSpec("e", unit=3_600_000, refill=1, burst=2, cost=1),
                        BucketSpec("s", unit=3_600_000, refill=1, burst=1, cost=1, shadow=True)])
    fp = b"f" * 64
    await store.open()
    try:
        assert store.combines(["tag", "tag"], same[0])
        first, claim = await store.ratelimit_take_claim(plan, ["tag", "tag"], same[0], fp, b"o1", terms=terms)
        assert first.would_allow
        assert claim is not None
        second = await store.ratelimit_take_claim(plan, ["tag", "tag"], same[1], fp, b"o2", terms=terms)
        resent = await store.ratelimit_take_claim(plan, ["tag", "tag"], same[1], fp, b"o2", terms=terms)
        assert resent == second
        assert (second[0].allowed, second[0].shadow_denied) == (True, True)
        assert [b.remaining for b in second[0].buckets] == [0, 0]
        assert second[1] is not None
        assert second[1].outcome == "new"
        third, claim = await store.ratelimit_take_claim(plan, ["tag", "tag"], same[2], fp, b"o3", terms=terms)
        assert not third.allowed
        assert claim is None
    finally:
        await store.close()
