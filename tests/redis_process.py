"""A real ``redis-server`` the tests start on a free loopback port and stop by PID.

Every wait polls with a deadline; nothing here touches a server it did not start.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


def ping(port: int, timeout: float = 0.5) -> bool:
    """True when a Redis on ``port`` answers PING (a raw RESP exchange, no client library)."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def end_process(
    proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, grace_s: float = 5.0
) -> None:
    """Signal a process we started, by its PID, and reap it (SIGKILL after ``grace_s``)."""
    if proc is None or proc.poll() is not None:
        return
    os.kill(proc.pid, sig)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


class RedisProcess:
    """One redis-server process, without persistence unless ``args`` ask for it; ``restart()``
    keeps the port.

    ``args`` go on the command line after the defaults, so they override them: e.g.
    ``("--appendonly", "yes", "--appendfsync", "always")`` makes the server durable, and since
    its dir is kept across ``kill()``/``start()``, a restart on the same port reloads the data.
    """

    def __init__(self, port: int | None = None, *, args: Sequence[str] = ()) -> None:
        binary = redis_server_binary()
        if binary is None:
            raise FileNotFoundError("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="gw-redis-"))
        self.args = tuple(args)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, deadline_s: float = 10.0) -> RedisProcess:
        cmd = [self.binary, "--port", str(self.port), "--bind", HOST, "--save", "",
               "--appendonly", "no", "--dir", str(self.dir), "--daemonize", "no",
               "--logfile", str(self.dir / "redis.log"), *self.args]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {log}")
            if ping(self.port):
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {deadline_s}s")

    def stop(self, sig: int = signal.SIGTERM, grace_s: float = 5.0) -> None:
        """Stop the process this object started, by its PID (SIGKILL after ``grace_s``)."""
        proc, self.proc = self.proc, None
        end_process(proc, sig, grace_s)

    def restart(self) -> None:
        """Kill hard (no shutdown save) and start again on the same port: all data and every
        loaded script are gone, as after a crash of a server without persistence (with AOF in
        ``args``, the data is reloaded; scripts still are not)."""
        self.stop(signal.SIGKILL)
        self.start()

    def kill(self) -> None:
        """SIGKILL the process (a crash: no shutdown, no save) and reap it; ``start()`` brings
        a new one up on the same port, empty unless a ``SAVE`` left a snapshot in its dir."""
        self.stop(signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP: the kernel still accepts connections and buffers commands, nothing answers.
        Always ``resume()`` before ``stop()``: a stopped process leaves SIGTERM pending."""
        assert self.proc is not None, "redis-server is not running"
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a paused process: it goes on with whatever its clients sent meanwhile."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Paused for the block, resumed afterwards whatever happens in it."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
