"""A real Redis Sentinel setup the tests start on free loopback ports and stop by PID.

``RedisSentinel().start()`` starts a master, one replica of it (``--replicaof``) and three
sentinels (``redis-server sentinel.conf --sentinel``) that monitor the master under
``service_name`` with a quorum of 2, then waits until the replica's link is up and every
sentinel knows the replica and the two other sentinels, so a failover test starts from a setup
that can actually fail over. ``down-after-milliseconds`` is short (a killed master is noticed
in half a second) and ``failover-timeout`` small (a failed election is retried within seconds).

Every wait polls with a deadline; a process that exits or a setup that never forms raises with
the log tails. Nothing here touches a process it did not start: ``kill`` and ``cleanup`` signal
only the PIDs of our own ``Popen`` objects.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from tests.redis_process import HOST, end_process, free_port, redis_server_binary

__all__ = ["DOWN_AFTER_MS", "FAILOVER_TIMEOUT_MS", "SERVICE", "RedisSentinel"]

SERVICE = "gw-primary"
DOWN_AFTER_MS = 500
FAILOVER_TIMEOUT_MS = 2000


def _client(port: int, timeout_s: float = 2.0, db: int = 0) -> redis.Redis:
    return redis.Redis(host=HOST, port=port, db=db, socket_timeout=timeout_s,
                       socket_connect_timeout=timeout_s, decode_responses=True)


class RedisSentinel:
    """A master, one replica and three sentinels on loopback, no persistence."""

    def __init__(self, service_name: str = SERVICE) -> None:
        binary = redis_server_binary()
        if binary is None:
            raise FileNotFoundError("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.service_name = service_name
        self.dir = Path(tempfile.mkdtemp(prefix="gw-sentinel-"))
        ports: list[int] = []
        while len(ports) < 5:  # the kernel may hand out a just-released port twice
            port = free_port()
            if port not in ports:
                ports.append(port)
        self.master_port, self.replica_port, *self.sentinel_ports = ports
        self._procs: dict[int, subprocess.Popen[bytes]] = {}

    # ------------------------------------------------------------------------------- lifecycle
    def start(self, deadline_s: float = 30.0) -> RedisSentinel:
        """Start all five processes and wait until the setup can fail over; raise with the log
        tails (after stopping everything started) when it does not within ``deadline_s``."""
        end = time.monotonic() + deadline_s
        try:
            self._spawn(self.master_port, self._server_args(self.master_port))
            self._spawn(self.replica_port, [*self._server_args(self.replica_port),
                                            "--replicaof", HOST, str(self.master_port)])
            # sentinels started after the sync find the replica in their first INFO of the
            # master, instead of at the next one 10 s later
            self._wait(self._replica_synced, end, "the replica to sync")
            for port in self.sentinel_ports:
                self._spawn(port, [self._write_sentinel_conf(port), "--sentinel"])
            self._wait(self.formed, end, "the sentinels to know the replica and each other")
        except BaseException:
            self.cleanup()
            raise
        return self

    def _server_args(self, port: int) -> list[str]:
        return ["--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
                "--dir", str(self.dir), "--dbfilename", f"dump-{port}.rdb", "--daemonize", "no",
                "--logfile", str(self._log(port)),
                # the replica syncs at once (Redis 7 waits 5 s by default for more replicas)
                "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]

    def _write_sentinel_conf(self, port: int) -> str:
        conf = self.dir / f"sentinel-{port}.conf"  # sentinels rewrite their file: one each
        name = self.service_name
        conf.write_text(
            f"port {port}\nbind {HOST}\ndaemonize no\ndir {self.dir}\nlogfile {self._log(port)}\n"
            f"sentinel monitor {name} {HOST} {self.master_port} 2\n"
            f"sentinel down-after-milliseconds {name} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {name} {FAILOVER_TIMEOUT_MS}\n"
            f"sentinel parallel-syncs {name} 1\n"
        )
        return str(conf)

    def _spawn(self, port: int, args: list[str]) -> None:
        self._procs[port] = subprocess.Popen([self.binary, *args], stdin=subprocess.DEVNULL,
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def kill(self, port: int, sig: int = signal.SIGKILL, grace_s: float = 5.0) -> None:
        """Signal our own process on ``port`` by its PID and reap it (SIGKILL after ``grace_s``)."""
        proc = self._procs.pop(port, None)
        end_process(proc, sig, grace_s)

    def cleanup(self) -> None:
        for port in list(self._procs):
            self.kill(port, signal.SIGTERM)
        shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------------------------- views
    @property
    def sentinels(self) -> list[str]:
        """``host:port`` of each sentinel, as ``[store] sentinels`` takes them."""
        return [f"{HOST}:{port}" for port in self.sentinel_ports]

    def running(self, port: int) -> bool:
        proc = self._procs.get(port)
        return proc is not None and proc.poll() is None

    def call(self, port: int, *args: Any, timeout_s: float = 2.0) -> Any:
        """One command on the server (or sentinel) on ``port``."""
        with _client(port, timeout_s) as client:
            return client.execute_command(*args)

    def keys(self, port: int, pattern: str, db: int = 0) -> list[str]:
        """The keys matching ``pattern`` in database ``db`` of the server on ``port``, sorted."""
        with _client(port, db=db) as client:
            return sorted(client.keys(pattern))

    def role(self, port: int) -> str:
        with _client(port) as client:
            return str(client.info("replication")["role"])

    def reported_masters(self) -> set[int]:
        """The master's port as each running sentinel reports it now (one port when they agree)."""
        ports = set()
        for port in self.sentinel_ports:
            if self.running(port):
                _, master_port = self.call(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service_name)
                ports.add(int(master_port))
        return ports

    def wait_for_failover(self, old_port: int, deadline_s: float = 30.0) -> int:
        """Wait until every running sentinel names one new master, other than ``old_port``, and
        that server says it is a master; return its port."""
        self._wait(lambda: self._failed_over(old_port), time.monotonic() + deadline_s,
                   f"the sentinels to promote a new master in place of {old_port}")
        (port,) = self.reported_masters()
        return port

    def _failed_over(self, old_port: int) -> bool:
        try:
            reported = self.reported_masters()
        except redis.RedisError:
            return False
        if len(reported) != 1 or old_port in reported:
            return False
        try:
            return self.role(next(iter(reported))) == "master"
        except redis.RedisError:
            return False

    # ------------------------------------------------------------------------------- health
    def formed(self) -> bool:
        """The replica's link is up, and each sentinel sees the master up, one replica and
        the two other sentinels."""
        dead = [port for port in (self.master_port, self.replica_port, *self.sentinel_ports)
                if not self.running(port)]
        if dead:
            raise RuntimeError(f"redis-server on {dead} exited")
        try:
            if not self._replica_synced():
                return False
            for port in self.sentinel_ports:
                with _client(port) as sentinel:
                    state = sentinel.sentinel_master(self.service_name)
                if not state["is_master"] or state["is_sdown"] or state["is_odown"]:
                    return False
                if state["num-slaves"] != 1 or state["num-other-sentinels"] != 2:
                    return False
        except redis.RedisError:
            return False
        return True

    def _replica_synced(self) -> bool:
        try:
            with _client(self.replica_port) as replica:
                info = replica.info("replication")
        except redis.RedisError:
            return False
        return info.get("master_link_status") == "up" and not info.get("master_sync_in_progress")

    def _log(self, port: int) -> Path:
        return self.dir / f"redis-{port}.log"

    def log_tails(self, chars: int = 1200) -> str:
        tails = []
        for port in (self.master_port, self.replica_port, *self.sentinel_ports):
            try:
                tail = self._log(port).read_text(errors="replace")[-chars:]
            except OSError:
                tail = "(no log)"
            tails.append(f"--- {port}\n{tail}")
        return "\n".join(tails)

    def _wait(self, check: Callable[[], bool], end: float, what: str) -> None:
        while time.monotonic() < end:
            if check():
                return
            time.sleep(0.05)
        raise RuntimeError(f"timed out waiting for {what}\n{self.log_tails()}")
