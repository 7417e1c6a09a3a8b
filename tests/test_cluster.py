"""The gateway on a real Redis Cluster (``store.cluster = true``), started by the tests.

Most tests share one 3-master cluster (``redis_cluster``, no replicas, each test under its own
key prefix); the failover test starts a 3-master cluster with one replica per master of its own
and SIGKILLs a master under load.

What holds across a failover, given that Redis replicates asynchronously:

* A master acknowledges a write before any replica has it. A completed idempotency record that
  a replica acknowledged before the master died (here: a later write on that master's
  replication stream confirmed by ``WAIT 1 <ms>``, which covers every earlier write of the stream)
  is on the promoted replica: its retries replay the stored response and the upstream is not
  called again. The test checks this for every record completed before the kill, those on the
  killed master included.
* A record written in the last moments before the kill (the replica had not received it yet) is
  lost with the master. A retry of that key then finds no record and runs again: at-most-once
  does not survive a failover for such a key. The gateway does not call ``WAIT`` itself; a
  deployment that needs the guarantee through a failover must make the write durable before it
  answers (Redis ``WAIT``/``WAITAOF`` after completing, or AOF with ``appendfsync always`` on a
  single durable node). The test counts such keys (on the killed master only) and allows them
  at most one extra execution; records on the masters that stayed up never run twice.
* While the cluster has no master for some slots (cluster_state fail on every node until a
  replica is promoted, with the default ``cluster-require-full-coverage``), store calls fail:
  keyed requests answer 503 store-unavailable (idempotency denies by default, the upstream is
  not called), rate-limit policies follow ``on_store_error`` (allow passes without a RateLimit
  field, deny answers 503 with ``Retry-After: 1``). A claim granted before the kill whose
  completion then failed is never released: its retries get 409 until ``lock_ttl``, then 502
  outcome-unknown, never a second execution (unless the claim itself was lost, as above).
* After the promotion the gateway recovers without a restart: the circuit breaker's cool-down
  passes, a probe succeeds, and the cluster client follows the new slot map.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis

from gateway import GatewayMiddleware
from gateway.config import IdentityConfig, RateLimitPolicy
from gateway.idempotency.request import record_name
from gateway.identity import GLOBAL_TAG, IdentityResolver
from gateway.store import BucketSpec, Store, TakePlan
from gateway.store.base import BucketState
from tests.asgi_helpers import PROBLEM, answer_lifespan, assert_problem, client_for, lifespan_running, poll
from tests.conftest import unique_prefix
from tests.redis_cluster import RedisCluster, node_client
from tests.redis_process import HOST
from tests.serve_process import Metrics

# the redis_cluster and failover_cluster fixtures
pytest_plugins = ["tests.cluster_fixtures"]

STORE_UNAVAILABLE = PROBLEM + "store-unavailable"
QUOTA = "https://iana.org/assignments/http-problem-types#quota-exceeded"
_RATELIMIT_ITEM = re.compile(r'"(?P<name>[^"]+)";r=(?P<r>\d+);t=(?P<t>\d+)')
# headers the gateway sets per response; a replay carries current ones, not stored ones
_PER_RESPONSE = {"x-request-id", "ratelimit", "ratelimit-policy", "idempotent-replayed"}
_IDENTITY = IdentityResolver(IdentityConfig(), ["identity"])


# ------------------------------------------------------------------------------------- helpers
class RecordingApp:
    """An upstream that answers 201 with a body unique to each execution and counts executions
    per Idempotency-Key (``""`` for unkeyed requests); ``delay_s`` (or ``slow_paths[path]``)
    keeps a request in flight."""

    def __init__(self, delay_s: float = 0.0, slow_paths: dict[str, float] | None = None) -> None:
        self.delay_s = delay_s
        self.slow_paths = slow_paths or {}
        self.calls = 0
        self.executions: Counter[str] = Counter()
        self.lifespan_events: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send, self.lifespan_events)
            return
        more = True
        while more:
            message = await receive()
            more = message.get("more_body", False)
        key = dict(scope["headers"]).get(b"idempotency-key", b"").decode()
        self.calls += 1
        n = self.calls
        self.executions[key] += 1
        delay = self.slow_paths.get(scope["path"], self.delay_s)
        if delay:
            await asyncio.sleep(delay)
        body = json.dumps({"execution": n, "nonce": uuid.uuid4().hex, "key": key}).encode()
        await send({"type": "http.response.start", "status": 201,
                    "headers": [(b"content-type", b"application/json"), (b"x-execution", b"%d" % n),
                                (b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})


def identity_tag(api_key: str) -> str:
    """The tag the gateway gives a client that sends ``x-api-key: api_key``."""
    scope = {"type": "http", "headers": [(b"x-api-key", api_key.encode())], "client": ("203.0.113.7", 1)}
    return _IDENTITY.tags(scope)["identity"]


def record_of(api_key: str, idem_key: str) -> str:
    return record_name(identity_tag(api_key), idem_key.encode())


def gateway_on(
    cluster: RedisCluster,
    app: Any,
    *,
    rate_limit: Sequence[dict[str, Any]] = (),
    store: dict[str, Any] | None = None,
    idempotency: dict[str, Any] | None = None,
) -> GatewayMiddleware:
    config: dict[str, Any] = {
        "store": {"url": cluster.url, "cluster": True, "timeout": "2s", "key_prefix": unique_prefix(),
                  **(store or {})},
        "rate_limit": list(rate_limit),
        "ops": {"metrics_allow": ["0.0.0.0/0"]},  # the tests' client scrapes (not from loopback)
    }
    if idempotency is not None:
        config["idempotency"] = idempotency
    return GatewayMiddleware(app, config)


def remaining(r: httpx.Response) -> dict[str, int]:
    """Each policy's ``r`` in the response's RateLimit field."""
    return {m["name"]: int(m["r"]) for m in _RATELIMIT_ITEM.finditer(r.headers.get("ratelimit", ""))}


def violated(r: httpx.Response) -> list[str]:
    body = assert_problem(r, 429, QUOTA)
    names: list[str] = body["violated-policies"]
    return names


def stored_view(r: httpx.Response) -> tuple[int, list[tuple[str, str]], bytes]:
    """What a replay must reproduce byte for byte: status, the stored headers, body."""
    headers = [(k, v) for k, v in r.headers.multi_items() if k not in _PER_RESPONSE]
    return r.status_code, headers, r.content


def store_errors(samples: Metrics) -> float:
    return samples.value("gateway_store_errors_total")


async def scrape(client: httpx.AsyncClient) -> Metrics:
    r = await client.get("/_gateway/metrics")
    assert r.status_code == 200
    return Metrics.parse(r.text)


def policy(gw: GatewayMiddleware, name: str) -> RateLimitPolicy:
    return next(p for p in gw.config.rate_limits if p.name == name)


async def bucket_level(gw: GatewayMiddleware, name: str, tag: str) -> int:
    """The whole tokens in one policy's bucket now, read by taking one more from it directly
    (the store's own API; the extra token taken is accounted for here)."""
    plan = TakePlan.of([BucketSpec.from_policy(policy(gw, name))])
    decision = await gw.store.ratelimit_take(plan, [tag])
    assert decision.allowed, f"{name} for {tag} is empty"
    state: BucketState = decision.buckets[0]
    return state.remaining + 1


def clients_per_master(
    cluster: RedisCluster, store: Store, count: int, policy_name: str, *, avoid_port: int | None = None,
    prefix: str = "client",
) -> dict[int, list[str]]:
    """API keys, ``count`` per master, whose ``policy_name`` bucket lives on that master
    (``avoid_port``: none on that master)."""
    ports = [m.port for m in cluster.masters() if m.port != avoid_port]
    chosen: dict[int, list[str]] = {p: [] for p in ports}
    candidates = [f"{prefix}-{i}" for i in range(60 * count)]
    keys = [store.key(identity_tag(c), policy_name) for c in candidates]  # type: ignore[attr-defined]
    for candidate, port in zip(candidates, cluster.ports_for_keys(keys), strict=True):
        if port in chosen and len(chosen[port]) < count:
            chosen[port].append(candidate)
    assert all(len(v) == count for v in chosen.values()), chosen
    return chosen


def assert_keys_on(cluster: RedisCluster, keys: Iterable[str]) -> dict[int, int]:
    """Each key is held by the master its slot names (asked on that node alone: a cluster node
    answers only for its own slots, so EXISTS = 1 there proves where it lives) and has a TTL.
    Returns how many keys each master holds."""
    keys = list(keys)
    placed: Counter[int] = Counter()
    for key, port in zip(keys, cluster.ports_for_keys(keys), strict=True):
        with node_client(port) as node:
            assert node.exists(key) == 1, f"{key} is not on master {port}"
            assert node.pttl(key) > 0, f"{key} on {port} has no TTL"
        placed[port] += 1
    return dict(placed)


def prefix_of(gw: GatewayMiddleware) -> str:
    return gw.config.store.key_prefix


def assert_every_key_expires(cluster: RedisCluster, prefix: str) -> int:
    """Every key under ``prefix`` on every master has a TTL; returns how many there are."""
    seen = 0
    for master in cluster.masters():
        with node_client(master.port) as node:
            for key in node.scan_iter(match=f"{prefix}:*", count=500):
                assert node.pttl(key) > 0, f"{key} on {master.port} never expires"
                seen += 1
    return seen


def keyed(api_key: str, idem_key: str) -> dict[str, str]:
    return {"x-api-key": api_key, "idempotency-key": idem_key}


# --------------------------------------------------------------------------- one shared cluster
async def test_readyz_pings_every_master(redis_cluster: RedisCluster) -> None:
    """On a healthy cluster readyz answers 200 with the breaker closed, and the store's
    client sees all three masters (it discovered them from the one node the url names)."""
    gw = gateway_on(redis_cluster, RecordingApp())
    async with lifespan_running(gw), client_for(gw) as c:
        r = await c.get("/_gateway/readyz")
        assert r.status_code == 200
        assert r.json() == {"status": "ready", "breaker": "closed"}
        primaries = {n.port for n in gw.store.client.get_primaries()}  # type: ignore[attr-defined]
    assert primaries == {m.port for m in redis_cluster.masters()}
    assert len(primaries) == 3


async def test_per_client_limits_exact_with_clients_on_every_master(redis_cluster: RedisCluster) -> None:
    """Clients whose buckets live on each of the three masters each get exactly ``burst``
    passes with r counting down, then 429s; every bucket key is on the master its slot names
    and expires; no store error."""
    app = RecordingApp()
    gw = gateway_on(redis_cluster, app, rate_limit=[
        {"name": "per-client", "limit": 5, "period": "1h", "burst": 5, "on_store_error": "deny"}])
    by_master = clients_per_master(redis_cluster, gw.store, 3, "per-client")
    clients = [c for group in by_master.values() for c in group]
    async with lifespan_running(gw), client_for(gw) as c:
        for api_key in clients:
            seen = [await c.get("/", headers={"x-api-key": api_key}) for _ in range(7)]
            assert [r.status_code for r in seen] == [201] * 5 + [429] * 2, api_key
            assert [remaining(r)["per-client"] for r in seen] == [4, 3, 2, 1, 0, 0, 0]
            assert violated(seen[-1]) == ["per-client"]
        samples = await scrape(c)
    assert app.calls == 5 * len(clients)
    assert store_errors(samples) == 0
    assert samples.value("gateway_ratelimit_decisions_total", decision="allow") == 5 * len(clients)
    assert samples.value("gateway_ratelimit_decisions_total", decision="error") == 0
    bucket_keys = [gw.store.key(identity_tag(k), "per-client") for k in clients]  # type: ignore[attr-defined]
    placed = assert_keys_on(redis_cluster, bucket_keys)
    assert placed == {port: 3 for port in by_master}  # all three masters, three clients each
    assert assert_every_key_expires(redis_cluster, prefix_of(gw)) == len(clients)


GLOBAL_AND_CLIENT = [
    {"name": "per-client", "key": "identity", "limit": 3, "period": "1h", "burst": 3,
     "on_store_error": "deny"},
    {"name": "global", "key": "global", "limit": 10, "period": "1h", "burst": 10,
     "on_store_error": "deny"},
]


async def test_global_plus_per_client_counts_and_both_refund_paths(redis_cluster: RedisCluster) -> None:
    """A global bucket (burst 10) and per-client buckets (burst 3) on other masters, one request
    charging both: exactly 10 pass. A per-client denial gives the global token back (later
    requests see global's r unchanged by the denials); a global denial gives the per-client
    token back (the client's bucket is still full afterwards, read from the store)."""
    app = RecordingApp()
    gw = gateway_on(redis_cluster, app, rate_limit=GLOBAL_AND_CLIENT)
    global_port = redis_cluster.node_for_key(gw.store.key(GLOBAL_TAG, "global")).port  # type: ignore[attr-defined]
    by_master = clients_per_master(redis_cluster, gw.store, 3, "per-client", avoid_port=global_port)
    a, b, c_, d, e, *_ = [k for group in by_master.values() for k in group]

    async def get(api_key: str) -> httpx.Response:
        return await client.get("/", headers={"x-api-key": api_key})

    async with lifespan_running(gw), client_for(gw) as client:
        for expected_global in (9, 8, 7):
            r = await get(a)
            assert r.status_code == 201
            assert remaining(r)["global"] == expected_global
        # per-client denies: global took a token in its own slot and must give it back
        for _ in range(3):
            r = await get(a)
            assert violated(r) == ["per-client"]
            assert remaining(r) == {"per-client": 0, "global": 7}
        r = await get(b)
        assert r.status_code == 201
        assert remaining(r) == {"per-client": 2, "global": 6}, "a per-client denial kept a global token"
        passes = 4
        for api_key, times in ((b, 2), (c_, 3), (d, 1)):
            for _ in range(times):
                r = await get(api_key)
                assert r.status_code == 201
                passes += 1
                assert remaining(r)["global"] == 10 - passes
        assert passes == 10
        # global denies: e's per-client group took a token and must give it back
        for _ in range(3):
            r = await get(e)
            assert violated(r) == ["global"]
            assert remaining(r) == {"per-client": 3, "global": 0}
        samples = await scrape(client)
        assert await bucket_level(gw, "per-client", identity_tag(e)) == 3, "a global denial kept e's token"
    assert app.calls == 10
    assert store_errors(samples) == 0
    assert samples.value("gateway_ratelimit_decisions_total", policy="global", decision="deny") == 3
    assert samples.value("gateway_ratelimit_decisions_total", policy="per-client", decision="deny") == 3
    assert_every_key_expires(redis_cluster, prefix_of(gw))


async def test_concurrent_requests_global_burst_is_exact(redis_cluster: RedisCluster) -> None:
    """60 requests at once from 6 clients (per-client burst 100, global burst 20): exactly 20
    pass, the 40 others are denied by ``global``, and every client's bucket was charged only for
    its own passes (the denials' per-client tokens all came back)."""
    app = RecordingApp()
    gw = gateway_on(redis_cluster, app, rate_limit=[
        {**GLOBAL_AND_CLIENT[0], "limit": 100, "burst": 100},
        {**GLOBAL_AND_CLIENT[1], "limit": 20, "burst": 20}])
    clients = [k for group in clients_per_master(redis_cluster, gw.store, 2, "per-client").values()
               for k in group]
    async with lifespan_running(gw), client_for(gw) as c:
        requests = [k for k in clients for _ in range(10)]
        seen = await asyncio.gather(*(c.get("/", headers={"x-api-key": k}) for k in requests))
        levels = {k: await bucket_level(gw, "per-client", identity_tag(k)) for k in clients}
        samples = await scrape(c)
    statuses = Counter(r.status_code for r in seen)
    assert statuses == {201: 20, 429: 40}
    assert all(violated(r) == ["global"] for r in seen if r.status_code == 429)
    assert app.calls == 20
    passed = Counter(k for k, r in zip(requests, seen, strict=True) if r.status_code == 201)
    assert {k: 100 - level for k, level in levels.items()} == {k: passed[k] for k in clients}
    assert store_errors(samples) == 0


async def test_concurrent_requests_per_client_burst_is_exact(redis_cluster: RedisCluster) -> None:
    """60 requests at once from 6 clients (per-client burst 2, global burst 100): exactly 2
    pass per client, and the global bucket is charged for the 12 passes only (the 48 denials'
    global tokens all came back)."""
    app = RecordingApp()
    gw = gateway_on(redis_cluster, app, rate_limit=[
        {**GLOBAL_AND_CLIENT[0], "limit": 2, "burst": 2},
        {**GLOBAL_AND_CLIENT[1], "limit": 100, "burst": 100}])
    clients = [k for group in clients_per_master(redis_cluster, gw.store, 2, "per-client").values()
               for k in group]
    async with lifespan_running(gw), client_for(gw) as c:
        requests = [k for k in clients for _ in range(10)]
        seen = await asyncio.gather(*(c.get("/", headers={"x-api-key": k}) for k in requests))
        global_level = await bucket_level(gw, "global", GLOBAL_TAG)
        samples = await scrape(c)
    passed = Counter(k for k, r in zip(requests, seen, strict=True) if r.status_code == 201)
    assert passed == {k: 2 for k in clients}
    assert all(violated(r) == ["per-client"] for r in seen if r.status_code == 429)
    assert app.calls == 12
    assert global_level == 100 - 12
    assert store_errors(samples) == 0


async def test_idempotency_once_and_replayed_with_records_on_every_master(
    redis_cluster: RedisCluster,
) -> None:
    """Keyed requests whose records land on all three masters: each runs once, its retry is the
    stored response byte for byte (plus Idempotent-Replayed), a changed body is a 422; every
    record sits on the master its slot names, with a TTL."""
    app = RecordingApp()
    gw = gateway_on(redis_cluster, app, idempotency={})
    pairs = [(f"idem-client-{i % 4}", f"key-{i}") for i in range(18)]
    ports = redis_cluster.ports_for_keys(gw.store.record_key(record_of(*p)) for p in pairs)  # type: ignore[attr-defined]
    assert set(ports) == {m.port for m in redis_cluster.masters()}, "pick keys that span the masters"
    async with lifespan_running(gw), client_for(gw) as c:
        first = [await c.post("/charge", content=b"amount=1", headers=keyed(*p)) for p in pairs]
        again = [await c.post("/charge", content=b"amount=1", headers=keyed(*p)) for p in pairs]
        changed = await c.post("/charge", content=b"amount=2", headers=keyed(*pairs[0]))
        samples = await scrape(c)
    assert all(r.status_code == 201 and "idempotent-replayed" not in r.headers for r in first)
    for one, two in zip(first, again, strict=True):
        assert two.headers["idempotent-replayed"] == "true"
        assert stored_view(two) == stored_view(one)
    assert changed.status_code == 422
    assert app.executions == {k: 1 for _, k in pairs}
    records = [gw.store.record_key(record_of(*p)) for p in pairs]  # type: ignore[attr-defined]
    assert assert_keys_on(redis_cluster, records) == dict(Counter(ports))
    assert assert_every_key_expires(redis_cluster, prefix_of(gw)) == len(pairs)
    assert store_errors(samples) == 0
    assert samples.value("gateway_idempotency_outcomes_total", outcome="executed") == len(pairs)
    assert samples.value("gateway_idempotency_outcomes_total", outcome="replayed") == len(pairs)


async def test_fifty_concurrent_identical_keyed_requests_execute_once(redis_cluster: RedisCluster) -> None:
    """50 identical keyed requests at once (the upstream takes 0.3 s): the upstream runs once;
    every other answer is 409 in flight or the replay of that one execution; a later retry
    replays it byte for byte. No 5xx, no store error."""
    app = RecordingApp(delay_s=0.3)
    gw = gateway_on(redis_cluster, app, idempotency={})
    headers = keyed("racer", "the-one-key")
    async with lifespan_running(gw), client_for(gw) as c:
        seen = await asyncio.gather(*(c.post("/charge", content=b"x", headers=headers) for _ in range(50)))
        later = await c.post("/charge", content=b"x", headers=headers)
        samples = await scrape(c)
    assert app.executions == {"the-one-key": 1}
    executed = [r for r in seen if r.status_code == 201 and "idempotent-replayed" not in r.headers]
    assert len(executed) == 1
    for r in seen:
        if r.status_code == 409:
            assert_problem(r, 409, PROBLEM + "idempotency-key-in-use")
            assert r.headers["retry-after"]
        else:
            assert r.status_code == 201
            assert stored_view(r) == stored_view(executed[0])
    assert stored_view(later) == stored_view(executed[0])
    assert later.headers["idempotent-replayed"] == "true"
    assert store_errors(samples) == 0
    assert assert_keys_on(redis_cluster, [gw.store.record_key(record_of("racer", "the-one-key"))])  # type: ignore[attr-defined]


async def test_no_crossslot_error_anywhere(redis_cluster: RedisCluster) -> None:
    """Requests that match four policies with four different key values (identity, ip, a
    header, global: up to four slots) plus an Idempotency-Key: no store error in the metrics,
    no 5xx, and no node of the cluster has ever answered CROSSSLOT (``INFO errorstats``,
    which also covers every earlier test on this shared cluster)."""
    app = RecordingApp()
    gw = gateway_on(redis_cluster, app, idempotency={}, rate_limit=[
        {"name": "per-client", "key": "identity", "limit": 1000, "period": "1m", "on_store_error": "deny"},
        {"name": "per-ip", "key": "ip", "limit": 1000, "period": "1m", "on_store_error": "deny"},
        {"name": "per-tenant", "key": "header:x-tenant", "limit": 1000, "period": "1m",
         "on_store_error": "deny"},
        {"name": "global", "key": "global", "limit": 1000, "period": "1m", "on_store_error": "deny"},
    ])
    async with lifespan_running(gw), client_for(gw) as c:
        seen = await asyncio.gather(*(
            c.post("/charge", content=b"x",
                   headers={**keyed(f"cs-{i % 7}", f"k{i}"), "x-tenant": f"t{i % 3}"})
            for i in range(60)))
        samples = await scrape(c)
    assert Counter(r.status_code for r in seen) == {201: 60}
    assert all(len(remaining(r)) == 4 for r in seen)
    assert store_errors(samples) == 0
    assert samples.value("gateway_ratelimit_decisions_total", decision="error") == 0
    for node in redis_cluster.nodes:
        version = tuple(int(x) for x in node.call("INFO", "server")["redis_version"].split(".")[:2])
        if version < (6, 2):
            continue  # no INFO errorstats before 6.2: the metrics above still saw every error
        stats = node.call("INFO", "errorstats")
        assert not [k for k in stats if "CROSSSLOT" in k.upper()], (node.port, stats)


# -------------------------------------------------------------------------------- failover
@dataclass
class Seen:
    kind: str  # allow | deny | fresh | replay
    key: str
    status: int
    started: float
    elapsed: float
    response: httpx.Response


def fence_replication(cluster: RedisCluster, master_port: int, near_key: str) -> None:
    """Make sure the master's replica has every write the master took so far: write a key in
    the same slot as ``near_key`` and ``WAIT`` for one replica to acknowledge it. WAIT covers
    the writes of the connection that issues it; the replication stream is one ordered stream
    per master, so an acknowledged later write implies every earlier one (the gateway's)."""
    tag = near_key[near_key.index("{") + 1: near_key.index("}")]
    with redis.Redis(host=HOST, port=master_port, single_connection_client=True, socket_timeout=5) as node:
        node.set(f"fence:{{{tag}}}", "1", px=60_000)
        assert node.execute_command("WAIT", 1, 3000) == 1, f"no replica of {master_port} acknowledged"


def on_replica(cluster: RedisCluster, master_port: int, keys: Sequence[str]) -> list[int]:
    """EXISTS of each key as the master's replica sees it (READONLY on one connection)."""
    (replica,) = cluster.replicas_of(master_port)
    with redis.Redis(host=HOST, port=replica.port, single_connection_client=True, socket_timeout=5) as node:
        node.execute_command("READONLY")
        return [int(node.exists(k)) for k in keys]


@pytest.mark.slow
async def test_master_killed_mid_run_keeps_the_promised_guarantees(failover_cluster: RedisCluster) -> None:
    """SIGKILL a master (one replica each) while requests run. During the failover keyed
    requests answer 503 store-unavailable or are decided, allow-policies pass, deny-policies
    answer 503 with Retry-After; no request hangs beyond the store bound. Every record completed
    and replicated before the kill (the killed master's too) still replays after the promotion
    and never runs again; a request in flight across the kill (its claim replicated) runs once,
    its retries get its replay or 502 outcome-unknown; a key on a master that stayed up never
    runs twice; the gateway recovers (readyz 200, keys on the promoted master decided) without a
    restart."""
    cluster = failover_cluster
    app = RecordingApp(slow_paths={"/slow": 1.5})
    gw = gateway_on(cluster, app, store={"timeout": "1s", "breaker_cooldown": "500ms"},
                    idempotency={"lock_ttl": "3s"},
                    rate_limit=[
                        {"name": "soft", "key": "identity", "limit": 100000, "period": "1m",
                         "paths": ["/allow"], "on_store_error": "allow"},
                        {"name": "hard", "key": "identity", "limit": 100000, "period": "1m",
                         "paths": ["/deny"], "on_store_error": "deny"},
                    ])
    victim = cluster.masters()[0].port

    def client_of(during_key: str) -> str:
        """The client the load sent ``during-N`` from."""
        return f"fo-client-{int(during_key.split('-')[1]) % 5}"

    def record_port(api_key: str, idem_key: str) -> int:
        return cluster.node_for_key(gw.store.record_key(record_of(api_key, idem_key))).port  # type: ignore[attr-defined]

    # completed before the kill: at least 4 records on the victim, 2 on each other master
    done_before: list[tuple[str, str]] = []
    want = {m.port: (4 if m.port == victim else 2) for m in cluster.masters()}
    i = 0
    while any(want.values()):
        pair = (f"fo-client-{i % 5}", f"before-{i}")
        port = record_port(*pair)
        if want[port]:
            want[port] -= 1
            done_before.append(pair)
        i += 1
    # in flight across the kill: its claim (on the victim) is replicated, its completion is not
    slow_pair = next(("fo-client-1", f"slow-{j}") for j in range(10_000)
                     if record_port("fo-client-1", f"slow-{j}") == victim)

    seen: list[Seen] = []
    stop = asyncio.Event()

    async def timed(kind: str, key: str, call: Any) -> None:
        started = time.monotonic()
        r = await call
        seen.append(Seen(kind, key, r.status_code, started, time.monotonic() - started, r))

    async def load(c: httpx.AsyncClient) -> None:
        """Four request streams, each on its own: one request held up (a completion retried
        until its lease ends) must not keep the others from meeting the outage."""

        def allow(n: int, api_key: str) -> Any:
            return timed("allow", api_key, c.get("/allow", headers={"x-api-key": api_key}))

        def deny(n: int, api_key: str) -> Any:
            return timed("deny", api_key, c.get("/deny", headers={"x-api-key": api_key}))

        def fresh(n: int, api_key: str) -> Any:
            return timed("fresh", f"during-{n}", c.post("/charge", content=b"x",
                                                        headers=keyed(api_key, f"during-{n}")))

        def replay(n: int, api_key: str) -> Any:
            pair = done_before[n % len(done_before)]
            return timed("replay", pair[1], c.post("/charge", content=b"x", headers=keyed(*pair)))

        async def stream(request: Any) -> None:
            n = 0
            while not stop.is_set():  # bounded: the test sets stop, each request within its bound
                await request(n, f"fo-client-{n % 5}")
                n += 1
                await asyncio.sleep(0.02)

        await asyncio.gather(*(stream(r) for r in (allow, deny, fresh, replay)))

    async with lifespan_running(gw), client_for(gw) as c:
        first = {p: await c.post("/charge", content=b"x", headers=keyed(*p)) for p in done_before}
        assert all(r.status_code == 201 for r in first.values())
        victim_records = [gw.store.record_key(record_of(*p)) for p in done_before  # type: ignore[attr-defined]
                          if record_port(*p) == victim]
        slow_task = asyncio.ensure_future(c.post("/slow", content=b"x", headers=keyed(*slow_pair)))
        await poll(lambda: app.executions[slow_pair[1]] == 1, deadline_s=10.0)
        slow_record = gw.store.record_key(record_of(*slow_pair))  # type: ignore[attr-defined]
        fence_replication(cluster, victim, slow_record)
        assert on_replica(cluster, victim, [*victim_records, slow_record]) == [1] * (len(victim_records) + 1)

        runner = asyncio.ensure_future(load(c))
        try:
            await asyncio.sleep(0.5)
            killed_at = time.monotonic()
            cluster.kill_master(victim)
            promoted = await asyncio.to_thread(cluster.wait_for_failover, victim, 45.0)
            promoted_at = time.monotonic()

            async def ready() -> bool:
                return (await c.get("/_gateway/readyz")).status_code == 200

            await poll(ready, deadline_s=20.0, every_s=0.1)
            recovered_at = time.monotonic()
            await asyncio.sleep(0.5)  # some load after the recovery too
        finally:
            stop.set()
            await asyncio.wait_for(runner, 30)

        slow = await asyncio.wait_for(slow_task, 30)
        slow_retries: list[httpx.Response] = []

        async def slow_settled() -> bool:
            slow_retries.append(await c.post("/slow", content=b"x", headers=keyed(*slow_pair)))
            return slow_retries[-1].status_code != 409  # 409 until its lease (3 s) lapses

        await poll(slow_settled, deadline_s=20.0, every_s=0.2)
        # after the failover: every record completed before the kill replays, unchanged
        after = {p: await c.post("/charge", content=b"x", headers=keyed(*p)) for p in done_before}
        # a key on the promoted master is decided again
        fresh_pair = next(("fo-client-0", f"after-{j}") for j in range(10_000)
                          if record_port("fo-client-0", f"after-{j}") == promoted.port)
        fresh = await c.post("/charge", content=b"x", headers=keyed(*fresh_pair))
        fresh_again = await c.post("/charge", content=b"x", headers=keyed(*fresh_pair))
        # retry every key first tried during the run, once
        during_keys = sorted({s.key for s in seen if s.kind == "fresh"})
        retries = {k: await c.post("/charge", content=b"x", headers=keyed(client_of(k), k))
                   for k in during_keys}
        samples = await scrape(c)

    window = [s for s in seen if s.started >= killed_at - 0.1]
    assert window, "no request ran during the failover"
    # nothing hung: a request makes a few store calls of at most store.timeout (1 s) each; a
    # completion that fails is retried only while its lease (lock_ttl, 3 s) lasts
    slowest = max(seen, key=lambda s: s.elapsed)
    assert slowest.elapsed < 3.0 + 3 * 1.0, slowest
    for s in seen:
        if s.kind == "allow":
            assert s.status == 201, (s, s.response.content)  # decided, or allowed on store error
        elif s.kind == "deny":
            assert s.status in (201, 503), s
            if s.status == 503:
                assert_problem(s.response, 503, STORE_UNAVAILABLE)
                assert s.response.headers["retry-after"] == "1"
        else:
            assert s.status in (201, 409, 503), (s, s.response.content)
            if s.status == 503:
                assert_problem(s.response, 503, STORE_UNAVAILABLE)
    failed = [s for s in seen if s.status == 503]
    assert failed, "the failover was never noticed: the test proved nothing"
    assert [s for s in seen if s.kind == "allow" and "ratelimit" not in s.response.headers], \
        "no allow-policy request was let through on a store error"
    assert store_errors(samples) > 0
    # completed and replicated before the kill: replayed, never run again
    for p in done_before:
        assert after[p].headers.get("idempotent-replayed") == "true", (p, after[p].status_code,
                                                                       after[p].content)
        assert stored_view(after[p]) == stored_view(first[p])
        assert app.executions[p[1]] == 1
    for s in seen:
        if s.kind == "replay" and s.status == 201:
            original = first[next(p for p in done_before if p[1] == s.key)]
            assert stored_view(s.response) == stored_view(original)
    # in flight across the kill: ran once; its retry replays it, or (its completion never got
    # stored) says the outcome is unknown; never a second execution
    assert app.executions[slow_pair[1]] == 1
    assert slow.status_code == 201  # the upstream's answer reaches its client either way
    settled = slow_retries[-1]
    assert settled.headers["idempotent-replayed"] == "true"
    if settled.status_code == 201:
        assert stored_view(settled) == stored_view(slow)
    else:
        assert_problem(settled, 502, PROBLEM + "outcome-unknown")
    # recovered: a key on the promoted master runs once and replays
    assert fresh.status_code == 201
    assert fresh_again.headers["idempotent-replayed"] == "true"
    assert stored_view(fresh_again) == stored_view(fresh)
    # keys first tried during the run: never twice on a master that stayed up; on the killed
    # master, a record written in its last moments may be lost with it (asynchronous replication)
    lost = []
    for k in during_keys:
        runs = app.executions[k]
        # the victim's slots are the promoted node's now
        if record_port(client_of(k), k) == promoted.port:
            assert runs <= 2, (k, runs)
            if runs == 2:  # only a record written before the kill can have been lost with it
                assert min(x.started for x in seen if x.key == k) < killed_at, k
                lost.append(k)
        else:
            assert runs <= 1, (k, runs, retries[k].status_code)
    assert all(r.status_code in (201, 409, 502) for r in retries.values()), Counter(
        r.status_code for r in retries.values())
    print(f"\nfailover: promoted after {promoted_at - killed_at:.2f}s, gateway ready after "
          f"{recovered_at - killed_at:.2f}s; {len(seen)} requests, {len(failed)} answered 503; "
          f"records lost with the killed master: {len(lost)}; in-flight key's retry: "
          f"{settled.status_code} after {len(slow_retries)} tries; slowest request "
          f"{slowest.elapsed:.2f}s ({slowest.kind} {slowest.status})")


def _key_in_slot_of(store: Any, identity_tag: str, slot: int) -> str:
    """An Idempotency-Key whose record lands in ``slot`` (about 16k tries on average, bounded)."""
    from redis.crc import key_slot

    for i in range(500_000):
        key = f"k{i}"
        if key_slot(store.record_key(record_name(identity_tag, key.encode())).encode()) == slot:
            return key
    msg = "no key found for the slot"
    raise AssertionError(msg)


async def test_take_and_claim_are_one_call_when_their_keys_share_a_slot(
        redis_cluster: RedisCluster) -> None:
    """On a cluster the combined admission runs where the record and the buckets share a slot
    (one script on one master); elsewhere the take and the claim stay two calls. Both give the
    same answers: one execution, the replay, and a denial that claims nothing."""
    from redis.crc import key_slot

    from gateway.identity import tag

    app = RecordingApp()
    gw = gateway_on(redis_cluster, app, rate_limit=[{"name": "pc", "limit": 1, "period": "1h", "burst": 3}])
    store: Any = gw.store
    identity = tag(b"h:x-api-key:alice")
    slot = key_slot(store.key(identity, "pc").encode())
    same = _key_in_slot_of(store, identity, slot)
    other = next(f"o{i}" for i in range(100)
                 if not store.combines([identity], record_name(identity, f"o{i}".encode())))
    assert store.combines([identity], record_name(identity, same.encode()))
    calls: Counter[str] = Counter()
    real_combined, real_claim = store.ratelimit_take_claim, store.idempotency_claim

    async def combined(*args: Any, **kwargs: Any) -> Any:
        calls["take_claim"] += 1
        return await real_combined(*args, **kwargs)

    async def claim(*args: Any, **kwargs: Any) -> Any:
        calls["claim"] += 1
        return await real_claim(*args, **kwargs)

    store.ratelimit_take_claim, store.idempotency_claim = combined, claim
    async with lifespan_running(gw), client_for(gw) as c:
        headers = {"x-api-key": "alice"}
        codes = [(await c.post("/pay", content=b"{}", headers={**headers, "idempotency-key": k})).status_code
                 for k in (same, same, other)]  # run, replayed, run
        assert codes == [201, 201, 201]
        assert calls == {"take_claim": 2, "claim": 1}
        denied = await c.post("/pay", content=b"{}", headers={**headers, "idempotency-key": same + "x"})
        assert denied.status_code == 429
        assert not await store.client.exists(store.record_key(record_name(identity, (same + "x").encode())))
    assert app.executions == {same: 1, other: 1}
