"""The cluster store's routing on a real Redis Cluster: one write and one connection per
primary, MOVED and ASK followed, NOSCRIPT recovered, and a lost reply resent only for the
scripts that are safe to run twice (``gateway/store/cluster_routing.py``).

The slot-migration test runs on a cluster of its own (it moves a slot); the others share the
session's ``redis_cluster`` and leave its topology as they found it. A stale slot map is made
by pointing one slot of the store's map at another node; a lost reply, by a proxy in front of
the slot's owner that closes the connection instead of passing the owner's reply on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio.cluster import ClusterNode
from redis.cluster import PRIMARY
from redis.crc import key_slot

from gateway.config import IdempotencyConfig
from gateway.errors import StoreUnanswered
from gateway.store import BucketSpec, Claim, LeaseTerms, TakePlan
from gateway.store.cluster import ClusterStore
from tests.conftest import unique_prefix
from tests.redis_cluster import RedisCluster
from tests.redis_process import HOST

pytest_plugins = ["tests.cluster_fixtures"]

BURST = 10
PLAN = TakePlan.of([BucketSpec(name="p", unit=3_600_000, refill=BURST, burst=BURST, cost=1)])


@contextlib.asynccontextmanager
async def open_store(cluster: RedisCluster) -> AsyncIterator[ClusterStore]:
    store = ClusterStore.from_url(cluster.url, key_prefix=unique_prefix(), timeout_s=2.0)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def bucket_key(store: ClusterStore, tag: str) -> bytes:
    return store.key(tag, "p").encode()


def tags_on(cluster: RedisCluster, store: ClusterStore, port: int, count: int) -> list[str]:
    """``count`` tags whose bucket lives on the master at ``port``."""
    candidates = [f"t-{i}" for i in range(100 * count)]
    ports = cluster.ports_for_keys(bucket_key(store, t) for t in candidates)
    return [t for t, p in zip(candidates, ports, strict=True) if p == port][:count]


def error_count(cluster: RedisCluster, port: int, code: str) -> int:
    stats = cluster.node(port).call("INFO", "errorstats")
    return int(stats.get(f"errorstat_{code}", {}).get("count", 0))


def node_id(cluster: RedisCluster, port: int) -> str:
    return next(v.id for v in cluster.view() if v.port == port)


async def remaining(store: ClusterStore, tag: str) -> int:
    """Tokens left in ``tag``'s bucket before this look (which takes one)."""
    decision = await store.ratelimit_take(PLAN, [tag])
    return decision.buckets[0].remaining + 1


# ---------------------------------------------------------------------- one write per primary
async def test_calls_of_one_turn_leave_in_one_write_on_one_connection_per_primary(
    redis_cluster: RedisCluster,
) -> None:
    """60 takes issued in one loop turn, 20 per master: each master's commands leave in exactly
    one write, on the store's one connection to it (CLIENT LIST on each node shows one
    connection whose last command was EVALSHA), and every take is decided."""
    async with open_store(redis_cluster) as store:
        masters = [m.port for m in redis_cluster.masters()]
        tags = {port: tags_on(redis_cluster, store, port, 20) for port in masters}
        await asyncio.gather(*(store.ratelimit_take(PLAN, [t[0]]) for t in tags.values()))  # connect
        writes: dict[str, int] = {}
        for node in store.router.primaries():
            conn = store.router.pipeline(node)._current
            assert conn is not None
            writer = conn._writer
            real = writer.write

            def counted(data: Any, name: str = node.name, real: Any = real) -> None:
                writes[name] = writes.get(name, 0) + 1
                real(data)

            writer.write = counted  # type: ignore[method-assign]
        all_tags = [t for ts in tags.values() for t in ts]
        decisions = await asyncio.gather(*(store.ratelimit_take(PLAN, [t]) for t in all_tags))
        assert all(d.allowed for d in decisions)
        assert writes == {f"{HOST}:{port}": 1 for port in masters}
        assert store.router.piped_nodes == {f"{HOST}:{port}" for port in masters}
        for port in masters:
            clients = redis_cluster.node(port).call("CLIENT", "LIST").splitlines()
            piped = [c for c in clients if " cmd=evalsha " in f" {c} "]
            assert len(piped) == 1, (port, clients)


async def test_a_store_whose_open_failed_reads_the_topology_on_first_use(
    redis_cluster: RedisCluster,
) -> None:
    """``open`` may fail at startup (the lifespan goes on): the first ping reads the slot map
    and pings every primary, the first take is decided (the scripts loaded on NOSCRIPT), and
    close closes it all."""
    store = ClusterStore.from_url(redis_cluster.url, key_prefix=unique_prefix(), timeout_s=2.0)
    try:
        assert store.router.primaries() == []
        await store.ping()
        assert {n.port for n in store.router.primaries()} == {m.port for m in redis_cluster.masters()}
        fresh = ClusterStore.from_url(redis_cluster.url, key_prefix=unique_prefix(), timeout_s=2.0)
        try:
            decision = await fresh.ratelimit_take(TakePlan.of([*PLAN.specs, BucketSpec(
                name="g", unit=3_600_000, refill=BURST, burst=BURST, cost=1)]), ["one", "global"])
            assert decision.allowed
        finally:
            await fresh.close()
    finally:
        await store.close()


# ---------------------------------------------------------------------- MOVED, ASK, NOSCRIPT
async def test_a_stale_slot_map_follows_moved_and_is_corrected(redis_cluster: RedisCluster) -> None:
    """The store's map says another master serves a bucket's slot: that master answers MOVED,
    the take goes to the owner and succeeds, and the map names the owner again."""
    async with open_store(redis_cluster) as store:
        owner, other = (m.port for m in redis_cluster.masters()[:2])
        (tag,) = tags_on(redis_cluster, store, owner, 1)
        slot = key_slot(bucket_key(store, tag))
        nodes = store.client.nodes_manager
        nodes.slots_cache[slot] = [nodes.get_node(HOST, other)]
        moved_before = error_count(redis_cluster, other, "MOVED")
        decision = await store.ratelimit_take(PLAN, [tag])
        assert decision.allowed
        assert decision.buckets[0].remaining == BURST - 1
        assert error_count(redis_cluster, other, "MOVED") == moved_before + 1
        assert nodes.get_node_from_slot(slot).port == owner
    assert redis_cluster.node(owner).call("EXISTS", bucket_key(store, tag)) == 1


async def test_noscript_after_script_flush_on_one_node_recovers(redis_cluster: RedisCluster) -> None:
    """SCRIPT FLUSH on the master holding a bucket: the next take there is answered NOSCRIPT,
    the script is loaded on that node and the take resent; it is decided, and the script is
    cached there again."""
    async with open_store(redis_cluster) as store:
        port = redis_cluster.masters()[0].port
        (tag,) = tags_on(redis_cluster, store, port, 1)
        node = redis_cluster.node(port)
        sha = store._take.sha
        node.call("SCRIPT", "FLUSH")
        before = error_count(redis_cluster, port, "NOSCRIPT")
        decision = await store.ratelimit_take(PLAN, [tag])
        assert decision.allowed
        assert decision.buckets[0].remaining == BURST - 1
        assert error_count(redis_cluster, port, "NOSCRIPT") == before + 1
        assert node.call("SCRIPT", "EXISTS", sha) == [True]
        # the other scripts are loaded again on that node for the shared cluster's later tests
        for script in store._scripts:
            node.call("SCRIPT", "LOAD", script.source)


async def test_a_slot_being_migrated_follows_ask_then_moved(own_cluster: RedisCluster) -> None:
    """A slot MIGRATING from one master and IMPORTING on another, its bucket already moved
    (MIGRATE): the source answers ASK, ``ASKING`` and the take go to the target, which takes
    from the moved bucket. Once the slot is the target's (SETSLOT NODE), the source answers
    MOVED, the store follows it and its map names the target."""
    cluster = own_cluster
    async with open_store(cluster) as store:
        source, target = (m.port for m in cluster.masters()[:2])
        (tag,) = tags_on(cluster, store, source, 1)
        key = bucket_key(store, tag)
        slot = key_slot(key)
        assert (await store.ratelimit_take(PLAN, [tag])).buckets[0].remaining == BURST - 1
        src, dst = cluster.node(source), cluster.node(target)
        dst.call("CLUSTER", "SETSLOT", slot, "IMPORTING", node_id(cluster, source))
        src.call("CLUSTER", "SETSLOT", slot, "MIGRATING", node_id(cluster, target))
        assert src.call("MIGRATE", HOST, target, "", 0, 5000, "KEYS", key) == "OK"
        asks = error_count(cluster, source, "ASK")

        decision = await store.ratelimit_take(PLAN, [tag])
        assert decision.buckets[0].remaining == BURST - 2, "the take did not reach the moved bucket"
        assert error_count(cluster, source, "ASK") == asks + 1
        assert store.client.nodes_manager.get_node_from_slot(slot).port == source  # ASK: no map change

        for node in cluster.masters():
            node.call("CLUSTER", "SETSLOT", slot, "NODE", node_id(cluster, target))
        moved = error_count(cluster, source, "MOVED")
        decision = await store.ratelimit_take(PLAN, [tag])
        assert decision.buckets[0].remaining == BURST - 3
        assert error_count(cluster, source, "MOVED") == moved + 1
        assert store.client.nodes_manager.get_node_from_slot(slot).port == target
    assert dst.call("EXISTS", key) == 1


# ---------------------------------------------------------------------- lost replies
class ReplyDropper:
    """A TCP proxy in front of one node. While ``dropping``, a reply from the node is not passed
    on: the client's connection is closed instead, after the node ran the command."""

    def __init__(self, port: int) -> None:
        self.target_port = port
        self.dropping = False
        self.dropped = 0
        self.commands = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, HOST, 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(HOST, self.target_port)

        async def upstream() -> None:
            while data := await client_r.read(65536):
                self.commands += data.count(b"EVALSHA")
                server_w.write(data)
            server_w.close()

        task = asyncio.ensure_future(upstream())
        self._tasks.add(task)
        try:
            while data := await server_r.read(65536):
                if self.dropping:
                    self.dropped += 1
                    break
                client_w.write(data)
        finally:
            client_w.transport.abort()
            server_w.transport.abort()
            task.cancel()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()


@contextlib.asynccontextmanager
async def lossy_route(store: ClusterStore, cluster: RedisCluster, slot: int) -> AsyncIterator[ReplyDropper]:
    """The store's map sends ``slot`` through a ``ReplyDropper`` in front of its owner; the
    proxy's connection is made (and answers) before dropping starts."""
    owner = cluster.node_for_slot(slot).port
    proxy = ReplyDropper(owner)
    port = await proxy.start()
    nodes = store.client.nodes_manager
    fake = ClusterNode(HOST, port, PRIMARY, **nodes.connection_kwargs)
    nodes.nodes_cache[fake.name] = fake
    nodes.slots_cache[slot] = [fake]
    assert await store.router.pipeline(fake).call(b"*1\r\n$4\r\nPING\r\n") == b"PONG"
    await asyncio.sleep(0.1)  # the map read at open is not "just read" any more
    proxy.dropping = True
    try:
        yield proxy
    finally:
        await proxy.close()
        nodes.nodes_cache.pop(fake.name, None)
        await store.router.refresh()


async def test_a_lost_take_is_not_resent_and_charged_once(redis_cluster: RedisCluster) -> None:
    """A take whose reply is lost after the node ran it: ``StoreUnanswered``, not resent (the
    node saw one EVALSHA), and the bucket was charged exactly once."""
    async with open_store(redis_cluster) as store:
        tag = "lost-take"
        slot = key_slot(bucket_key(store, tag))
        async with lossy_route(store, redis_cluster, slot) as proxy:
            with pytest.raises(StoreUnanswered):
                await store.ratelimit_take(PLAN, [tag])
            assert proxy.dropped == 1
            assert proxy.commands == 1
        assert store.client.nodes_manager.get_node_from_slot(slot).port == proxy.target_port
        assert await remaining(store, tag) == BURST - 1


async def test_a_lost_claim_is_resent_and_answers_new_for_its_owner(redis_cluster: RedisCluster) -> None:
    """A claim whose reply is lost after the node ran it is resent (after the slot map is read
    again, to the owner itself) and answers "new": the same owner's claim again. The record is
    that owner's; the proxy's node has no pipeline any more."""
    terms = LeaseTerms.from_config(IdempotencyConfig(lock_ttl_s=10.0, ttl_s=60.0))
    async with open_store(redis_cluster) as store:
        record = "lost-claim"
        key = store._keys.record(record)
        slot = key_slot(key)
        async with lossy_route(store, redis_cluster, slot) as proxy:
            claim = await store.idempotency_claim(record, b"fp", b"owner-1", terms)
            assert proxy.dropped == 1
            assert proxy.commands == 1
        assert claim == Claim("new")
        owner_port = proxy.target_port
        assert redis_cluster.node(owner_port).call("HGET", key, "o") == "owner-1"
        assert store.router.piped_nodes <= {f"{HOST}:{m.port}" for m in redis_cluster.masters()}
        other = await store.idempotency_claim(record, b"fp", b"owner-2", terms)
        assert other.outcome == "in_flight"
