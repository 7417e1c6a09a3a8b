"""Choose the proxy's upstream HTTP client by measurement: httpx vs aiohttp (DESIGN.md decision 5).

Decision 5 allows one asyncio HTTP client for the proxy, httpx or aiohttp, picked by a recorded
benchmark; this is it. The same minimal pure-ASGI reverse proxy (method, raw path and query forwarded,
hop-by-hop headers stripped both ways, bodies streamed both ways, one pooled client opened at lifespan
startup) is written on each client and run in its own uvicorn process alone on CPU 0, in front of a bare
ASGI upstream sharing CPU 1 with wrk. wrk rounds interleave the upstream direct ("bare"), the httpx proxy
and the aiohttp proxy for GET /hello and POST /echo (1 KiB); the proxy's CPU time per request comes from
/proc. Each proxy is first checked to really proxy (same bytes, 1 MiB echo, only end-to-end headers).

    .venv/bin/python -m loadtests.proxy_clients [--duration 10 --rounds 3 --connections 32]

Writes loadtests/results/proxy-clients.md and .json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import itertools
import json
import os
import platform
import re
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableMapping
from http.cookiejar import CookieJar, DefaultCookiePolicy
from importlib.metadata import version
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import yarl

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

ROOT = Path(__file__).resolve().parent.parent
MODULE = "loadtests.proxy_clients"
HOST, UPSTREAM_ENV, HELLO = "127.0.0.1", "PROXY_CLIENTS_UPSTREAM", b'{"message":"hello"}'
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade"})
APPS = ("bare", "httpx", "aiohttp", "gateway")
# what the gateway adds upstream on top of the client's own headers (the request id is random)
GATEWAY_ADDS = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id"})
POST_LUA = 'wrk.method = "POST"\nwrk.body = string.rep("x", 1024)\nwrk.headers["Content-Type"] = "text/plain"'


def end_to_end(raw: Iterable[tuple[bytes, bytes]], drop: frozenset[bytes] = frozenset()) -> Headers:
    """Lower-cased headers minus hop-by-hop ones, proxy-*, those named in Connection, and `drop`."""
    pairs = [(k.lower(), v) for k, v in raw]
    named = {t.strip().lower() for k, v in pairs if k == b"connection" for t in v.split(b",")}
    return [(k, v) for k, v in pairs
            if k not in HOP_BY_HOP and k not in named and k not in drop and not k.startswith(b"proxy-")]


async def respond(send: Send, status: int, body: bytes, extra: Iterable[tuple[bytes, bytes]] = ()) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


CLIENTS: set[tuple[str, int]] = set()  # the upstream's client connections since the last /_stats


async def upstream_app(scope: Message, receive: Receive, send: Send) -> None:
    """GET /hello, POST /echo; /headers (and a Set-Cookie) for the checks; /_stats counts connections."""
    if scope["type"] != "http":
        return
    if (path := scope["path"]) == "/_stats":  # not counted itself
        await respond(send, 200, str(len(CLIENTS)).encode())
        return CLIENTS.clear()
    CLIENTS.add(tuple(scope["client"]))
    if path == "/hello":
        return await respond(send, 200, HELLO)
    if path == "/headers":
        seen = json.dumps([[k.decode(), v.decode()] for k, v in scope["headers"]]).encode()
        return await respond(send, 200, seen, [(b"set-cookie", b"session=leak; Path=/")])
    if path != "/echo":
        return await respond(send, 404, b'{"error":"not found"}')
    chunks, more = [], True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message["type"] == "http.request" and message.get("more_body", False)
    return await respond(send, 200, b"".join(chunks))


async def request_body(receive: Receive) -> AsyncIterator[bytes]:
    more = True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            return
        more = message.get("more_body", False)
        if chunk := message.get("body", b""):
            yield chunk


async def stream_back(send: Send, status: int, raw: Iterable[tuple[bytes, bytes]],
                      chunks: AsyncIterator[bytes]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": end_to_end(raw)})
    async for chunk in chunks:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


class Proxy:
    """Pure-ASGI proxy to $PROXY_CLIENTS_UPSTREAM; subclasses open/close a pooled client and forward()."""

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":  # i.e. lifespan.startup
                self.base = os.environ[UPSTREAM_ENV]
                await self.start()
                await send({"type": "lifespan.startup.complete"})
            await self.close()
            return await send({"type": "lifespan.shutdown.complete"})
        has_body = any(k == b"transfer-encoding" or (k == b"content-length" and v != b"0")
                       for k, v in scope["headers"])
        query = scope["query_string"].decode("latin-1")
        url = self.base + scope["raw_path"].decode("latin-1") + ("?" + query if query else "")
        headers = end_to_end(scope["headers"], frozenset({b"host"}))
        await self.forward(scope["method"], url, headers, request_body(receive) if has_body else None, send)

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def forward(self, method: str, url: str, headers: Headers,
                      body: AsyncIterator[bytes] | None, send: Send) -> None: ...


class HttpxProxy(Proxy):
    async def start(self) -> None:
        self.client = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=100),  # default keeps 20
            timeout=httpx.Timeout(30.0, connect=2.0), follow_redirects=False, trust_env=False,
            cookies=CookieJar(DefaultCookiePolicy(allowed_domains=[])))  # a shared jar would leak Set-Cookie
        for name in ("accept", "accept-encoding", "connection", "user-agent"):  # send only what came in
            del self.client.headers[name]

    async def close(self) -> None:
        await self.client.aclose()

    async def forward(self, method: str, url: str, headers: Headers,
                      body: AsyncIterator[bytes] | None, send: Send) -> None:
        try:
            request = self.client.build_request(method, url, headers=headers, content=body)
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError:
            return await respond(send, 502, b'{"error":"upstream"}')
        try:
            await stream_back(send, response.status_code, response.headers.raw, response.aiter_raw())
        finally:
            await response.aclose()


class AiohttpProxy(Proxy):
    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=100), cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None, connect=2.0, sock_read=30.0), auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"))

    async def close(self) -> None:
        await self.session.close()

    async def forward(self, method: str, url: str, headers: Headers,
                      body: AsyncIterator[bytes] | None, send: Send) -> None:
        try:
            response = await self.session.request(
                method, yarl.URL(url, encoded=True), data=body, allow_redirects=False,
                headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers])
        except aiohttp.ClientError:
            return await respond(send, 502, b'{"error":"upstream"}')
        try:
            await stream_back(send, response.status, response.raw_headers, response.content.iter_any())
        finally:
            response.release()


class GatewayProxy:
    """The real thing beside the two minimal proxies: ``gateway.server.build_app`` (ProxyApp on
    aiohttp behind the whole stack: request id, /_gateway and metrics, the idempotency gate, which
    unkeyed requests pass) with no rate-limit policy, on memory://."""

    def __init__(self) -> None:
        self.app: Any = None

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if self.app is None:
            from gateway.config import load_config
            from gateway.server import build_app

            config = {"upstream": {"url": os.environ[UPSTREAM_ENV]}, "store": {"url": "memory://"}}
            self.app = build_app(load_config(config, env={}))
        await self.app(scope, receive, send)


httpx_app, aiohttp_app, gateway_app = HttpxProxy(), AiohttpProxy(), GatewayProxy()


# ---------------------------------------------------------------- the runner (parent process)

def get(port: int, path: str, method: str = "GET", body: bytes | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class Server:
    """One uvicorn process pinned to `cpu` on a free port; stopped by its PID."""

    def __init__(self, name: str, cpu: int, tmp: Path, env: dict[str, str]) -> None:
        with socket.socket() as s:
            s.bind((HOST, 0))
            self.port = int(s.getsockname()[1])
        self.name, self.log = name, tmp / f"{name}.log"
        argv = ["taskset", "-c", str(cpu), sys.executable, "-m", "uvicorn", f"{MODULE}:{name}_app",
                "--host", HOST, "--port", str(self.port), "--loop", "uvloop", "--http", "httptools",
                "--no-access-log", "--no-server-header", "--no-date-header", "--log-level", "warning",
                "--no-proxy-headers"]  # the upstream counts real peers, not the gateway's X-Forwarded-For
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=log)

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                if get(self.port, "/hello")[0] == 200:
                    return
            time.sleep(0.05)
        sys.exit(f"{self.name} not up in {timeout}s, exit {self.proc.poll()}: {self.log.read_text()[-999:]}")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def settle(servers: Iterable[Server], timeout: float = 30.0) -> None:
    """Wait (bounded) until no server burns CPU: < 10 ms of CPU in 200 ms, all servers together."""
    deadline, last = time.monotonic() + timeout, -1.0
    while (now := sum(s.cpu_seconds() for s in servers)) - last > 0.01 and time.monotonic() < deadline:
        last = now
        time.sleep(0.2)


def verify(name: str, port: int, upstream: int) -> None:
    """The proxy answers with the upstream's bytes, echoes 1 MiB, and sends only end-to-end headers."""
    if (via := get(port, "/hello?x=1")) != (200, HELLO) or get(upstream, "/hello?x=1") != via:
        sys.exit(f"{name}: GET /hello through the proxy gave {via!r:.200}, not the upstream's {HELLO!r}")
    payload = os.urandom(1 << 20)
    status, echoed = get(port, "/echo", "POST", payload, {"Content-Type": "application/octet-stream"})
    if status != 200 or echoed != payload:
        sys.exit(f"{name}: a 1 MiB POST /echo through the proxy gave {status}, {len(echoed)} other bytes")
    get(port, "/headers")  # answers with a Set-Cookie, which must not be stored and sent on later requests
    hop = {"Connection": "keep-alive, x-drop", "X-Drop": "1", "Keep-Alive": "timeout=5",
           "Proxy-Authorization": "Basic eDp5", "X-Keep": "1"}
    seen = dict(json.loads(get(port, "/headers", headers=hop)[1]))
    adds = GATEWAY_ADDS if name == "gateway" else frozenset()
    expected = {"host": f"{HOST}:{upstream}", "accept-encoding": "identity", "x-keep": "1"}
    if {k: v for k, v in seen.items() if k not in adds} != expected or not adds <= seen.keys():
        sys.exit(f"{name}: the upstream saw headers {seen}, expected {expected} plus {sorted(adds)}")


def run_wrk(port: int, path: str, script: Path | None, seconds: int, connections: int) -> dict[str, Any]:
    argv = ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency",
            *(["-s", str(script)] if script else []), f"http://{HOST}:{port}{path}"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, check=True).stdout

    def find(pattern: str, default: str = "") -> list[str]:
        match = re.search(pattern, out, re.MULTILINE)
        return list(match.groups()) if match else [default]

    def ms(pct: str) -> float:
        value, unit = find(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s|m)\s*$")
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]

    errors = r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"
    return {"rps": float(find(r"Requests/sec:\s+([\d.]+)")[0]),
            "requests": int(find(r"(\d+) requests in")[0]), "p50_ms": ms("50"), "p99_ms": ms("99"),
            "sock_errors": sum(map(int, find(errors, "0"))),
            "non2xx": int(find(r"Non-2xx or 3xx responses: (\d+)", "0")[0])}


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="proxy-clients-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "post.lua").write_text(POST_LUA)
        workloads = {"GET /hello": ("/hello", None), "POST /echo": ("/echo", tmp / "post.lua")}
        servers: dict[str, Server] = {}
        try:
            up = servers["bare"] = Server("upstream", 1, tmp, {})
            up.wait_ready()
            for name in APPS[1:]:
                servers[name] = Server(name, 0, tmp, {UPSTREAM_ENV: f"http://{HOST}:{up.port}"})
            for name in APPS[1:]:
                servers[name].wait_ready()
                verify(name, servers[name].port, up.port)
            print("every proxy verified; warming up (2 s each)", flush=True)
            for (path, script), app in itertools.product(workloads.values(), APPS):
                run_wrk(servers[app].port, path, script, 2, args.connections)
            for rnd, (workload, (path, script)), app in itertools.product(
                    range(1, args.rounds + 1), workloads.items(), APPS):
                settle(servers.values())  # a slow proxy may still be forwarding the last run's backlog
                get(up.port, "/_stats")
                before, start = {n: s.cpu_seconds() for n, s in servers.items()}, time.monotonic()
                run = run_wrk(servers[app].port, path, script, args.duration, args.connections)
                wall, n = time.monotonic() - start, run["requests"]
                cpu = {name: s.cpu_seconds() - before[name] for name, s in servers.items()}
                proxied = app != "bare"
                run.update(round=rnd, app=app, workload=workload, wall_s=wall,
                           upstream_conns=int(get(up.port, "/_stats")[1]),
                           upstream_cpu_us=cpu["bare"] * 1e6 / n,
                           proxy_cpu_us=cpu[app] * 1e6 / n if proxied else None,
                           proxy_cpu_pct=100 * cpu[app] / wall if proxied else None)
                runs.append(run)
                print(f"round {rnd} {workload} {app:7} {run['rps']:8,.0f} rps  p99 {run['p99_ms']:7.2f} ms  "
                      f"proxy {run['proxy_cpu_us'] or 0:5.0f} µs/req  upstream conns {run['upstream_conns']}",
                      flush=True)
        finally:
            for server in reversed(servers.values()):
                server.stop()
    return runs


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    bare = {(r["round"], r["workload"]): r["rps"] for r in runs if r["app"] == "bare"}
    rows = []
    for workload, app in itertools.product(dict.fromkeys(r["workload"] for r in runs), APPS):
        mine = [r for r in runs if (r["app"], r["workload"]) == (app, workload)]
        row: dict[str, Any] = {"app": app, "workload": workload, "rps": [r["rps"] for r in mine],
                               "ratio": [r["rps"] / bare[r["round"], workload] for r in mine],
                               "upstream_conns": [r["upstream_conns"] for r in mine],
                               "errors": sum(r["non2xx"] + r["sock_errors"] for r in mine)}
        for key in ("rps", "ratio", "p50_ms", "p99_ms", "proxy_cpu_us", "proxy_cpu_pct", "upstream_cpu_us"):
            values = [r[key] for r in mine if r[key] is not None] if key in mine[0] else row[key]
            row[key + "_median"] = statistics.median(values) if values else None
        rows.append(row)
    return rows


def render(rows: list[dict[str, Any]], command: str, args: argparse.Namespace) -> str:
    model = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout.strip()
    versions = ", ".join(f"{p} {version(p)}" for p in ("httpx", "httpcore", "aiohttp", "uvicorn"))
    when = f"{dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}"
    load = Path("/proc/loadavg").read_text().split()[0]
    lines = [
        "# Proxy upstream client: httpx vs aiohttp (same minimal proxy, same upstream), and the gateway", "",
        f"Generated by `{command}` on {when} ({model[1] if model else '?'}, {nproc} cores, load average "
        f"{load} at the end; Python {platform.python_version()}, {versions}).", "",
        "uvicorn, 1 process each, uvloop + httptools, no access log; each proxy alone on CPU 0, the upstream "
        f"and wrk on CPU 1. wrk `-t1 -c{args.connections} -d{args.duration}s --latency` after a 2 s warm-up, "
        f"{args.rounds} rounds of ({', '.join(APPS)}). gateway: `gateway.server.build_app` (the aiohttp "
        "ProxyApp behind the whole stack, no rate-limit policy, memory://). "
        "POST /echo: 1 KiB each way. Ratio: to bare in the "
        "same round. Proxy CPU: utime+stime / requests (and / wall). Upstream conns: distinct client "
        "connections the upstream saw in each run (wrk's own for bare, the proxy's pool otherwise). Errors: "
        "wrk's non-2xx responses + socket errors, all rounds.", "",
        "| app | workload | rps median (min-max) | ratio to bare, median (min-max) | p50 ms | p99 ms "
        "| proxy CPU µs/req | proxy CPU % | upstream CPU µs/req | upstream conns per run | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        med = {k[:-7]: v for k, v in r.items() if k.endswith("_median")}
        cpu = "— | —" if r["app"] == "bare" else f"{med['proxy_cpu_us']:.0f} | {med['proxy_cpu_pct']:.0f}"
        lines.append(
            f"| {r['app']} | {r['workload']} | {med['rps']:,.0f} ({min(r['rps']):,.0f}-{max(r['rps']):,.0f}) "
            f"| {med['ratio']:.3f} ({min(r['ratio']):.3f}-{max(r['ratio']):.3f}) | {med['p50_ms']:.2f} "
            f"| {med['p99_ms']:.2f} | {cpu} | {med['upstream_cpu_us']:.0f} "
            f"| {', '.join(map(str, r['upstream_conns']))} | {r['errors']} |")
    lines.append("")
    for workload in dict.fromkeys(r["workload"] for r in rows):
        hx, ah, gw = (next(r for r in rows if (r["app"], r["workload"]) == (a, workload)) for a in APPS[1:])
        cpu = f"{ah['proxy_cpu_us_median']:.0f} µs/req (aiohttp) vs {hx['proxy_cpu_us_median']:.0f} (httpx)"
        lines.append(f"- {workload}: aiohttp / httpx rps = {ah['rps_median'] / hx['rps_median']:.2f}x; "
                     f"proxy CPU {cpu}. The gateway runs at {gw['rps_median'] / ah['rps_median']:.2f}x the "
                     "minimal aiohttp proxy's rps, "
                     f"+{gw['proxy_cpu_us_median'] - ah['proxy_cpu_us_median']:.0f} µs of CPU per request.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per timed wrk run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    command = shlex.join([".venv/bin/python", "-m", MODULE, *sys.argv[1:]])
    rows = summarize(runs := measure(args))
    print(table := render(rows, command, args))
    results = ROOT / "loadtests" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "proxy-clients.md").write_text(table)
    (results / "proxy-clients.json").write_text(
        json.dumps({"command": command, "args": vars(args), "summary": rows, "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
