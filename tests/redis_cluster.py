"""A real Redis Cluster the tests start on free loopback ports and stop by PID.

``RedisCluster(masters=3, replicas=1).start()`` starts ``masters * (1 + replicas)``
``redis-server --cluster-enabled yes`` processes without persistence, joins them with
``redis-cli --cluster create`` and waits until every node reports ``cluster_state:ok`` with all
16384 slots served, each master has its replicas, and every replica's link to its master is up
(its initial sync done), so a failover test starts from a cluster that can actually fail over.

Each node needs two ports: its client port P and its cluster bus port P + 10000 (fixed by Redis
before 7.0). Both are picked below the kernel's ephemeral range, so an outgoing connection of
this machine cannot take one between the check and the server's bind.

Every wait polls with a deadline; a node that exits or a cluster that never forms raises with
the nodes' log tails. Nothing here touches a process it did not start: ``kill_master`` and
``cleanup`` signal only the PIDs of our own ``Popen`` objects.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from redis.crc import key_slot

from tests.redis_process import HOST, end_process

__all__ = ["SLOTS", "ClusterNode", "NodeView", "RedisCluster", "redis_cli_binary"]

SLOTS = 16384
BUS_OFFSET = 10000
# node timeout: how long a silent master takes to be marked failed (then a replica is elected,
# ~0.5-1.5 s more); short for the tests, long enough that a busy 2-core machine does not make a
# healthy node look dead
NODE_TIMEOUT_MS = 2000


def redis_cli_binary() -> str | None:
    return shutil.which("redis-cli")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_cluster_ports(count: int, taken: Iterable[int] = ()) -> list[int]:
    """``count`` client ports P whose bus port P + 10000 is free too, below the ephemeral range
    when it leaves room (else anywhere a bus port fits)."""
    high = _ephemeral_low() - BUS_OFFSET - 1
    low = 10000
    if high - low < 1000:
        low, high = 1024, 65535 - BUS_OFFSET
    chosen: list[int] = []
    avoid = set(taken)
    for _ in range(2000):
        port = random.randint(low, high)  # a port, not a secret
        if port in avoid or port + BUS_OFFSET in avoid:
            continue
        if _bindable(port) and _bindable(port + BUS_OFFSET):
            chosen.append(port)
            avoid |= {port, port + BUS_OFFSET}
            if len(chosen) == count:
                return chosen
    raise RuntimeError(f"found only {len(chosen)} of {count} free port pairs (P, P+{BUS_OFFSET})")


def _slot(key: str | bytes) -> int:
    return int(key_slot(key.encode() if isinstance(key, str) else key))


def node_client(port: int, timeout_s: float = 2.0) -> redis.Redis:
    """A plain (non-cluster) client on one node: it never follows MOVED, so what it sees is
    what that node holds. Use it as a context manager (it closes its pool)."""
    return redis.Redis(host=HOST, port=port, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                       decode_responses=True)


@dataclass(frozen=True)
class NodeView:
    """One line of ``CLUSTER NODES`` as a live node sees it."""

    id: str
    port: int
    flags: frozenset[str]
    master_id: str | None  # for a replica, its master's id
    slots: tuple[tuple[int, int], ...]  # (first, last) ranges a master serves
    connected: bool

    @property
    def is_master(self) -> bool:
        return "master" in self.flags

    @property
    def failed(self) -> bool:
        return "fail" in self.flags or "fail?" in self.flags

    @property
    def slot_count(self) -> int:
        return sum(b - a + 1 for a, b in self.slots)


def parse_cluster_nodes(text: str) -> list[NodeView]:
    """``CLUSTER NODES`` text to views (importing/migrating slot markers are ignored)."""
    views = []
    for line in text.strip().splitlines():
        parts = line.split()
        address = parts[1].split("@", 1)[0].split(",", 1)[0]
        slots: list[tuple[int, int]] = []
        for item in parts[8:]:
            if item.startswith("["):
                continue
            first, _, last = item.partition("-")
            slots.append((int(first), int(last or first)))
        views.append(NodeView(
            id=parts[0],
            port=int(address.rsplit(":", 1)[1]),
            flags=frozenset(parts[2].split(",")),
            master_id=None if parts[3] == "-" else parts[3],
            slots=tuple(slots),
            connected=parts[7] == "connected",
        ))
    return views


class ClusterNode:
    """One ``redis-server --cluster-enabled yes`` process of ours."""

    def __init__(self, binary: str, port: int, root: Path, node_timeout_ms: int) -> None:
        self.port = port
        self.dir = root / str(port)
        self.dir.mkdir()
        self.log = self.dir / "redis.log"
        cmd = [binary, "--port", str(port), "--bind", HOST, "--cluster-enabled", "yes",
               "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", str(node_timeout_ms),
               # a replica may always stand for election, however long its link was down
               "--cluster-replica-validity-factor", "0",
               "--save", "", "--appendonly", "no", "--dir", str(self.dir), "--daemonize", "no",
               "--logfile", str(self.log),
               # replicas sync at once (Redis 7 waits 5 s by default for more replicas to come)
               "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]
        # what the server prints before its logfile is open (a bad option) goes here
        self.output = self.dir / "output.txt"
        with self.output.open("wb") as out:
            self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        self.pid = self.proc.pid

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 1500) -> str:
        """The end of the node's log, after anything it printed before opening it."""
        text = ""
        for path in (self.output, self.log):
            with contextlib.suppress(OSError):
                text += path.read_text(errors="replace")
        return text[-chars:] or "(no output)"

    def kill(self, sig: int = signal.SIGKILL, grace_s: float = 5.0) -> None:
        """Signal our own process by its PID and reap it (SIGKILL after ``grace_s``)."""
        proc, self.proc = self.proc, None
        end_process(proc, sig, grace_s)

    def call(self, *args: Any, timeout_s: float = 2.0) -> Any:
        """One command on this node alone (no redirection followed)."""
        with node_client(self.port, timeout_s) as client:
            return client.execute_command(*args)


class RedisCluster:
    """``masters`` masters with ``replicas`` replicas each, on loopback, no persistence.

    ``url`` names one master, as ``[store] url`` with ``cluster = true`` expects; the client
    discovers the rest. ``stop()`` kills exactly the processes ``start()`` made.
    """

    def __init__(self, masters: int = 3, replicas: int = 0, node_timeout_ms: int = NODE_TIMEOUT_MS) -> None:
        server, cli = shutil.which("redis-server"), redis_cli_binary()
        if server is None or cli is None:
            raise FileNotFoundError("redis-server and redis-cli are needed (apt-get install redis-server)")
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        self.server_binary, self.cli_binary = server, cli
        self.master_count, self.replica_count = masters, replicas
        self.node_timeout_ms = node_timeout_ms
        self.root = Path(tempfile.mkdtemp(prefix="gw-cluster-"))
        self.nodes: list[ClusterNode] = []
        self.startup_s = 0.0
        self._heirs: dict[int, set[int]] = {}  # killed master -> its replicas then

    # ------------------------------------------------------------------------------- lifecycle
    def start(self, deadline_s: float = 60.0) -> RedisCluster:
        """Start the nodes, create the cluster, wait until it is whole; raise with the log tails
        (after stopping everything started) when any of it fails within ``deadline_s``."""
        began = time.monotonic()
        end = began + deadline_s
        try:
            total = self.master_count * (1 + self.replica_count)
            for port in free_cluster_ports(total):
                self.nodes.append(ClusterNode(self.server_binary, port, self.root, self.node_timeout_ms))
            for node in self.nodes:
                self._wait(lambda n=node: self._answers(n), end, f"node {node.port} to answer PING")
            self._create(end)
            self._wait(self.formed, end, "the cluster to form (state ok, slots covered, replicas synced)")
        except BaseException:
            self.cleanup()
            raise
        self.startup_s = time.monotonic() - began
        return self

    def _create(self, end: float) -> None:
        cmd = [self.cli_binary, "--cluster", "create", *(n.address for n in self.nodes),
               "--cluster-replicas", str(self.replica_count), "--cluster-yes"]
        try:
            done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=max(1.0, end - time.monotonic()), check=False)
        except subprocess.TimeoutExpired as exc:
            raise self._failure(f"redis-cli --cluster create did not finish: {exc.stdout!r}") from None
        if done.returncode != 0:
            out = (done.stdout + done.stderr).decode(errors="replace")[-2000:]
            raise self._failure(f"redis-cli --cluster create exited {done.returncode}:\n{out}")

    def stop(self) -> None:
        """Kill every node we started, by PID (SIGKILL: there is nothing to save)."""
        for node in self.nodes:
            node.kill()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> RedisCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # ------------------------------------------------------------------------------- topology
    @property
    def url(self) -> str:
        """``redis://`` of a running master (the cluster client discovers the others)."""
        return f"redis://{HOST}:{self.masters()[0].port}/0"

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [(HOST, n.port) for n in self.nodes if n.running]

    def node(self, port: int) -> ClusterNode:
        for node in self.nodes:
            if node.port == port:
                return node
        raise KeyError(f"no node of ours on port {port}")

    def view(self) -> list[NodeView]:
        """``CLUSTER NODES`` as the first running node that answers sees it."""
        errors = []
        for node in self.nodes:
            if node.running:
                try:
                    return parse_cluster_nodes(node.call("CLUSTER", "NODES"))
                except redis.RedisError as exc:
                    errors.append(f"{node.port}: {exc}")
        raise redis.ConnectionError(f"no running node answered CLUSTER NODES: {errors}")

    def masters(self) -> list[ClusterNode]:
        """The running nodes that serve slots now, by port."""
        ports = {v.port for v in self.view() if v.is_master and v.slots and not v.failed}
        return sorted((n for n in self.nodes if n.port in ports and n.running), key=lambda n: n.port)

    def replicas_of(self, port: int) -> list[ClusterNode]:
        """The running nodes that replicate the node on ``port``."""
        views = self.view()
        master_id = next((v.id for v in views if v.port == port), None)
        if master_id is None:
            return []
        ports = {v.port for v in views if v.master_id == master_id and not v.failed}
        return [n for n in self.nodes if n.port in ports and n.running]

    def slot_map(self) -> dict[int, int]:
        """Each slot range's first slot to the port of the master serving it (CLUSTER SLOTS)."""
        return {first: port for first, _, port in self._slot_ranges()}

    def _slot_ranges(self) -> list[tuple[int, int, int]]:
        for node in self.nodes:
            if node.running:
                try:
                    reply = node.call("CLUSTER", "SLOTS")
                except redis.RedisError:
                    continue
                return [(int(r[0]), int(r[1]), int(r[2][1])) for r in reply]
        raise redis.ConnectionError("no running node answered CLUSTER SLOTS")

    def node_for_slot(self, slot: int) -> ClusterNode:
        """The master serving ``slot`` now."""
        for first, last, port in self._slot_ranges():
            if first <= slot <= last:
                return self.node(port)
        raise LookupError(f"slot {slot} is not served")

    def node_for_key(self, key: str | bytes) -> ClusterNode:
        """The master that holds ``key`` (its hash tag's slot, as Redis computes it)."""
        return self.node_for_slot(_slot(key))

    def ports_for_keys(self, keys: Iterable[str | bytes]) -> list[int]:
        """Per key, the port of the master holding it, from one CLUSTER SLOTS."""
        ranges = self._slot_ranges()
        ports = []
        for key in keys:
            slot = _slot(key)
            ports.append(next(port for first, last, port in ranges if first <= slot <= last))
        return ports

    # ------------------------------------------------------------------------------- health
    @staticmethod
    def _answers(node: ClusterNode) -> bool:
        if not node.running:
            raise RuntimeError(f"redis-server on {node.port} exited")
        try:
            return bool(node.call("PING", timeout_s=0.5))
        except redis.RedisError:
            return False

    def cluster_info(self, node: ClusterNode) -> dict[str, str]:
        raw: str = node.call("CLUSTER", "INFO")
        return dict(line.split(":", 1) for line in raw.split() if ":" in line)

    def healthy_everywhere(self) -> bool:
        """Every running node says ``cluster_state:ok`` with all slots served."""
        for node in self.nodes:
            if not node.running:
                continue
            try:
                info = self.cluster_info(node)
            except redis.RedisError:
                return False
            if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != str(SLOTS):
                return False
        return True

    def formed(self) -> bool:
        """Healthy everywhere, every node known to all, ``master_count`` masters each with
        ``replica_count`` replicas whose replication link is up."""
        if any(not n.running for n in self.nodes):
            raise RuntimeError("a node exited while the cluster formed")
        if not self.healthy_everywhere():
            return False
        total = len(self.nodes)
        for node in self.nodes:
            try:
                views = parse_cluster_nodes(node.call("CLUSTER", "NODES"))
            except redis.RedisError:
                return False
            masters = [v for v in views if v.is_master and v.slots]
            if len(views) != total or len(masters) != self.master_count:
                return False
            if any(v.failed or not v.connected for v in views):
                return False
            for m in masters:
                if sum(1 for v in views if v.master_id == m.id) != self.replica_count:
                    return False
        return all(self._synced(n) for n in self.nodes)

    def _synced(self, node: ClusterNode) -> bool:
        try:
            info = node.call("INFO", "replication")
        except redis.RedisError:
            return False
        if info.get("role") == "master":
            return True
        return info.get("master_link_status") == "up" and not info.get("master_sync_in_progress")

    # ------------------------------------------------------------------------------- faults
    def kill_master(self, port: int) -> ClusterNode:
        """SIGKILL the master on ``port`` (one of ours, a master now); returns the dead node.
        Its replicas are noted first, so ``wait_for_failover`` knows who may take over."""
        node = self.node(port)
        if port not in {m.port for m in self.masters()}:
            raise ValueError(f"node {port} is not a serving master now")
        self._heirs[port] = {n.port for n in self.replicas_of(port)}
        if not self._heirs[port]:
            raise ValueError(f"master {port} has no running replica to fail over to")
        node.kill(signal.SIGKILL)
        return node

    def wait_for_failover(self, old_port: int, deadline_s: float = 30.0) -> ClusterNode:
        """Wait until one of ``old_port``'s former replicas serves slots, the old master is
        flagged failed and serves none, and every running node says ``cluster_state:ok``;
        return the promoted node."""
        heirs = self._heirs.get(old_port)
        if heirs is None:
            raise ValueError(f"{old_port} was not killed by kill_master")
        promoted: list[ClusterNode] = []

        def done() -> bool:
            views = self.view()
            old = next((v for v in views if v.port == old_port), None)
            if old is None or not old.failed or old.slots:
                return False
            new = [v for v in views if v.port in heirs and v.is_master and v.slots]
            if not new or not self.healthy_everywhere():
                return False
            promoted[:] = [self.node(new[0].port)]
            return True

        self._wait(done, time.monotonic() + deadline_s, f"a replica of {old_port} to take over")
        return promoted[0]

    # ------------------------------------------------------------------------------- helpers
    def _wait(self, check: Any, end: float, what: str) -> None:
        last: BaseException | None = None
        while time.monotonic() < end:
            try:
                if check():
                    return
            except (redis.RedisError, OSError) as exc:
                last = exc
            except RuntimeError as exc:  # a node exited: no use waiting
                raise self._failure(str(exc)) from exc
            time.sleep(0.05)
        detail = f" (last error: {last!r})" if last else ""
        raise self._failure(f"timed out waiting for {what}{detail}")

    def _failure(self, message: str) -> RuntimeError:
        tails = "\n".join(f"--- node {n.port} (pid {n.pid}, running={n.running}):\n{n.log_tail()}"
                          for n in self.nodes)
        return RuntimeError(f"{message}\n{tails}")
