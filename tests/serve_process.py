"""Real processes for the end-to-end tests: the upstream, ``gateway serve``, a connection dropper.

Everything listens on 127.0.0.1 on a free port, every wait polls with a deadline, and every
process is stopped by the PID (or the process group) this module started it with.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Self

import httpx
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import ENV_OVERRIDES
from tests.redis_process import HOST, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
START_DEADLINE_S = 30.0  # generous: cold interpreters on 2 noisy cores
STOP_GRACE_S = 15.0
POLL_S = 0.02


def child_env(**extra: str) -> dict[str, str]:
    """The test's environment without GATEWAY_* overrides or a multiprocess dir, plus ``extra``."""
    drop = {*ENV_OVERRIDES, "PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(extra)
    return env


def wait_for(check: Callable[[], Any], what: str, deadline_s: float = 10.0,
             interval_s: float = POLL_S) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after the deadline."""
    end = time.monotonic() + deadline_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= end:
            raise AssertionError(f"timed out after {deadline_s}s waiting for {what}")
        time.sleep(interval_s)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0, trust_env=False).status_code == 200
    except httpx.TransportError:
        return False


class ServerProcess:
    """A child process with its output in files; stopped by PID (its group, if it will not go)."""

    name = "process"

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.stdout_path = workdir / f"{self.name}-{self.port}.out"
        self.stderr_path = workdir / f"{self.name}-{self.port}.err"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} is not running"
        return self.proc.pid

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return child_env()

    def ready_url(self) -> str:
        raise NotImplementedError

    def launch(self) -> None:
        """Start the process without waiting for it to serve."""
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=err, cwd=REPO_ROOT, env=self.environment(),
                                         start_new_session=True)

    def wait_ready(self, deadline_s: float = START_DEADLINE_S) -> None:
        """Poll the ready URL until it answers 200; fail with the process's stderr otherwise."""
        assert self.proc is not None
        end = time.monotonic() + deadline_s
        url = self.ready_url()
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}: "
                                     f"{self.stderr()[-3000:]}")
            if _answers(url):
                return
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"{self.name} did not answer {url} within {deadline_s}s: "
                             f"{self.stderr()[-3000:]}")

    def start(self) -> Self:
        self.launch()
        self.wait_ready()
        return self

    def client(self, timeout_s: float = 10.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout_s, trust_env=False)

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def wait_exit(self, timeout_s: float = STOP_GRACE_S) -> int:
        """The exit status, waiting at most ``timeout_s`` (raises TimeoutExpired)."""
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)

    def stop(self, grace_s: float = STOP_GRACE_S) -> int | None:
        """SIGTERM the PID, wait ``grace_s``, then SIGKILL its process group; the exit status."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        # workers of a supervisor that died abruptly are in the group this module created
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.returncode

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""


class Upstream(ServerProcess):
    """``uvicorn tests.e2e_upstream:app`` (uvloop, httptools), its own server/date headers off."""

    name = "upstream"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "uvicorn", "tests.e2e_upstream:app", "--host", HOST,
                "--port", str(self.port), "--no-server-header", "--no-date-header",
                "--no-access-log", "--no-proxy-headers", "--log-level", "warning",
                "--timeout-graceful-shutdown", "5"]

    def ready_url(self) -> str:
        return f"{self.url}/health"

    def executions(self) -> dict[str, dict[str, int]]:
        with self.client() as client:
            data: dict[str, dict[str, int]] = client.get("/executions").json()
        return data

    def seen(self, request_id: str) -> int:
        with self.client() as client:
            count: int = client.get("/seen", params={"rid": request_id}).json()["count"]
        return count


# ------------------------------------------------------------------------------------ config
def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):  # an inline table: [shedding] local = {enabled = true}
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML for {value!r}")


def toml(config: Mapping[str, Any]) -> str:
    """TOML for a config shaped like CONTRACT §4: tables of scalars, or lists of such tables."""
    lines: list[str] = []
    for section, body in config.items():
        tables = body if isinstance(body, list) else [body]
        for table in tables:
            lines.append(f"[[{section}]]" if isinstance(body, list) else f"[{section}]")
            lines.extend(f"{key} = {_toml_value(value)}" for key, value in table.items())
            lines.append("")
    return "\n".join(lines)


def serve_config(upstream_url: str, store_url: str, key_prefix: str, *,
                 timeout: str = "10s", connect_timeout: str = "1s",
                 **sections: Any) -> dict[str, Any]:
    """A ``gateway serve`` config: upstream, store (a generous call bound), plus ``sections``."""
    upstream = {"url": upstream_url, "connect_timeout": connect_timeout, "timeout": timeout}
    store = {"url": store_url, "key_prefix": key_prefix, "timeout": "2s"}
    return {"upstream": upstream, "store": store, **sections}


# ------------------------------------------------------------------------------------ gateway
class GatewayServe(ServerProcess):
    """``python -m gateway serve --config FILE --port P [--workers N]`` on a written config."""

    name = "gateway"

    def __init__(self, workdir: Path, config: Mapping[str, Any] | str, *, port: int | None = None,
                 workers: int | None = None, env: Mapping[str, str] | None = None,
                 args: tuple[str, ...] = ()) -> None:
        super().__init__(workdir, port)
        self.args = args  # more command-line options
        self.config_path = workdir / f"gateway-{self.port}.toml"
        self.config_path.write_text(config if isinstance(config, str) else toml(config))
        self.workers = workers
        self.extra_env = dict(env or {})

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(self.config_path),
               "--host", HOST, "--port", str(self.port)]
        if self.workers is not None:
            cmd += ["--workers", str(self.workers)]
        return [*cmd, *self.args]

    def environment(self) -> dict[str, str]:
        return child_env(**self.extra_env)

    def ready_url(self) -> str:
        return f"{self.url}/_gateway/healthz"

    def logs(self) -> list[dict[str, Any]]:
        """The JSON objects on stderr, one per line (lines that are not JSON objects are skipped)."""
        found = []
        for line in self.stderr().splitlines():
            with contextlib.suppress(ValueError):
                item = json.loads(line)
                if isinstance(item, dict):
                    found.append(item)
        return found

    def non_json_stderr_lines(self) -> list[str]:
        bad = []
        for line in self.stderr().splitlines():
            try:
                item = json.loads(line)
            except ValueError:
                item = None
            if line.strip() and not isinstance(item, dict):
                bad.append(line)
        return bad

    def metrics(self) -> Metrics:
        with self.client() as client:
            response = client.get("/_gateway/metrics")
        assert response.status_code == 200, response.text
        return Metrics.parse(response.text)

    def peak_rss_bytes(self) -> int:
        return _proc_status_kib(self.pid, "VmHWM") * 1024

    def rss_bytes(self) -> int:
        return _proc_status_kib(self.pid, "VmRSS") * 1024

    def reset_peak_rss(self) -> bool:
        """Reset VmHWM (Linux >= 4.0, ``echo 5 > /proc/PID/clear_refs``); False when not allowed."""
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True


def _proc_status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise LookupError(f"{field} not in /proc/{pid}/status")


def run_serve(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    """``python -m gateway serve ARGS`` to completion (for the commands that must fail fast)."""
    return subprocess.run([sys.executable, "-m", "gateway", "serve", *args], capture_output=True,
                          text=True, timeout=timeout_s, cwd=REPO_ROOT, env=child_env(),
                          check=False)


# ------------------------------------------------------------------------------------ metrics
LabelSet = tuple[tuple[str, str], ...]


class Metrics:
    """Samples of one Prometheus text exposition: ``value(name, **labels)`` sums the matches."""

    def __init__(self, samples: dict[tuple[str, LabelSet], float]) -> None:
        self.samples = samples

    @classmethod
    def parse(cls, text: str) -> Metrics:
        samples: dict[tuple[str, LabelSet], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                samples[key] = samples.get(key, 0.0) + sample.value
        return cls(samples)

    def value(self, name: str, **labels: str) -> float:
        """The sum over the samples named ``name`` whose labels include ``labels`` (0 if none)."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and wanted <= set(ls))

    def names(self) -> set[str]:
        return {name for name, _ in self.samples}


def metrics(text: str) -> dict[tuple[str, LabelSet], float]:
    """Prometheus text to ``{(sample name, sorted labels): value}``."""
    return Metrics.parse(text).samples


# ------------------------------------------------------------------------------------ raw TCP
class RawTcpServer:
    """A TCP server on 127.0.0.1 (a free port), in a thread, for upstreams no framework may
    tidy up: ``handle(conn)`` serves one connection, on a thread of its own when ``threaded``.
    It runs while its ``with`` block does; the accept loop polls a stop flag every 0.1 s."""

    name = "raw-tcp"
    backlog = 16
    threaded = False

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((HOST, self.port))
        self._sock.listen(self.backlog)
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name=self.name, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.threaded:
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()
            else:
                self._serve(conn)

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            self.handle(conn)


class Dropper(RawTcpServer):
    """A raw TCP upstream that reads each request (head and Content-Length body) and closes the
    connection without a byte of response: the request was sent, its outcome is unknown."""

    name = "dropper"

    def __init__(self, port: int | None = None) -> None:
        super().__init__(port)
        self.requests: list[bytes] = []

    def heads(self) -> list[bytes]:
        with self._lock:
            return list(self.requests)

    def handle(self, conn: socket.socket) -> None:
        head = self._read_request(conn)
        if head:
            with self._lock:
                self.requests.append(head)

    @staticmethod
    def _read_request(conn: socket.socket) -> bytes:
        conn.settimeout(5.0)
        data = b""
        try:
            while b"\r\n\r\n" not in data and len(data) < 65536:
                part = conn.recv(65536)
                if not part:
                    return data
                data += part
            head, _, body = data.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            while len(body) < length:
                part = conn.recv(65536)
                if not part:
                    break
                body += part
        except OSError:
            pass
        return data.partition(b"\r\n\r\n")[0]

