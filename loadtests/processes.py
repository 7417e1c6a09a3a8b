"""The processes a run starts, and how it waits for them and stops them.

Everything listens on 127.0.0.1 on a free port. Each child is started with ``subprocess.Popen``
in a session of its own (a Ctrl-C at the terminal reaches the runner, which then stops them in
order), its output goes to files in the report's ``logs/``, every wait polls with a deadline,
and ``stop()`` acts on the PID it started only: SIGTERM, a bounded wait, then SIGKILL to the
process group it created. The HTTP helpers use the standard library, with proxies off.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["HOST", "Child", "StartError", "free_port", "http_get", "http_json", "redis_ping"]

HOST = "127.0.0.1"
POLL_S = 0.05
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never a proxy


class StartError(RuntimeError):
    """A child did not come up within its deadline (the message has the end of its stderr)."""


def free_port() -> int:
    """A port free on the loopback right now (bound to 0 by the kernel, then released)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout_s: float = 2.0, method: str = "GET") -> tuple[int, bytes]:
    """(status, body) of one request; status 0 when no answer came."""
    request = urllib.request.Request(url, method=method)
    try:
        with _OPENER.open(request, timeout=timeout_s) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (OSError, ValueError):
        return 0, b""


def http_json(url: str, timeout_s: float = 10.0, method: str = "GET") -> Any:
    status, body = http_get(url, timeout_s, method)
    if status != 200:
        msg = f"{method} {url} answered {status or 'nothing'}"
        raise StartError(msg)
    return json.loads(body)


def redis_ping(port: int, timeout_s: float = 0.5) -> bool:
    """True when a Redis on ``port`` answers PING (one raw RESP exchange)."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout_s) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


ROOT_AUTOGROUP = "/autogroup-0"


def autogroup_name(text: str) -> str:
    """The group's name from ``/proc/PID/autogroup`` (``/autogroup-N nice K``). The kernel prints
    nothing for a task in the root group (init's session, where a CI service may start the run
    from), which is a group too: all its tasks share it, so it gets a name of its own."""
    fields = text.split()
    return fields[0] if fields else ROOT_AUTOGROUP


class Child:
    """One process the run started: its command, its log files, its PID.

    Each leads a process group of its own (``stop`` signals the group), in the runner's session:
    where the kernel groups tasks by session for the CPU (``kernel.sched_autogroup_enabled``),
    a session each would share the CPU fairly between the children whatever their nice levels or
    policies (sched(7)), so Locust could not yield it to what it measures.
    """

    def __init__(self, name: str, command: Sequence[str], logs: Path, *,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None) -> None:
        self.name = name
        self.command = list(command)
        self.stdout_path = logs / f"{name}.out"
        self.stderr_path = logs / f"{name}.err"
        logs.mkdir(parents=True, exist_ok=True)
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=err, cwd=cwd, env=dict(env or os.environ),
                                         process_group=0)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def stderr_tail(self, chars: int = 2000) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_http(self, url: str, deadline_s: float) -> None:
        """Poll ``url`` until it answers 200; StartError if the child exits or time runs out."""
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if not self.running():
                msg = f"{self.name} exited with {self.proc.returncode}: {self.stderr_tail()}"
                raise StartError(msg)
            if http_get(url, timeout_s=1.0)[0] == 200:
                return
            time.sleep(POLL_S)
        msg = f"{self.name} did not answer {url} within {deadline_s:.0f} s: {self.stderr_tail()}"
        raise StartError(msg)

    def wait_redis(self, port: int, deadline_s: float) -> None:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if not self.running():
                msg = f"{self.name} exited with {self.proc.returncode}: {self.stderr_tail()}"
                raise StartError(msg)
            if redis_ping(port):
                return
            time.sleep(POLL_S)
        msg = f"{self.name} did not answer PING on port {port} within {deadline_s:.0f} s"
        raise StartError(msg)

    def cpu_seconds(self) -> float | None:
        """User + system CPU time so far (Linux ``/proc``); None once it is gone or elsewhere."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        # after the ")" that ends comm: field 3 is index 0, so utime (14) and stime (15) are 11, 12
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def runqueue_wait_seconds(self) -> float | None:
        """How long its main thread has waited, runnable, for a CPU (``/proc/PID/schedstat``'s
        second field); None once it is gone or without schedstats. On a machine the load
        generator shares, it is how much of a latency was the scheduler's, not the process's."""
        try:
            return int(Path(f"/proc/{self.proc.pid}/schedstat").read_text().split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            return None

    def autogroup(self) -> str | None:
        """The scheduling autogroup it is in (``/proc/PID/autogroup``); None on a kernel without
        autogroups or once it is gone."""
        try:
            return autogroup_name(Path(f"/proc/{self.proc.pid}/autogroup").read_text())
        except OSError:
            return None

    def rss_bytes(self) -> int | None:
        """Resident memory now (Linux ``/proc``, ``VmRSS``); None once it is gone or elsewhere."""
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return None
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024  # the kernel writes kB (KiB)
        return None

    def wait(self, timeout_s: float) -> int | None:
        """The exit status, or None if it is still running after ``timeout_s``."""
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace_s: float = 15.0) -> int | None:
        """SIGTERM, wait up to ``grace_s``, then SIGKILL the group this child leads; its status."""
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            if self.wait(grace_s) is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.wait(5.0)
        # anything it forked (uvicorn workers) lives in the session this module created for it
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode
