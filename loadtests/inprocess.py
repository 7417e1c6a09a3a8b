"""The stack's own CPU per request, in-process: an ASGI driver, no HTTP server, no client.

A benchmark, not a test. It starts a redis-server of its own (loopback, free port, no
persistence) and drives ``GatewayMiddleware`` (one per-client policy that never denies) around
a trivial app. Each round sends ``--requests`` requests, ``--concurrency`` at a time, and divides
this process's CPU time by the requests: ``GET /hello`` (the rate limit), and ``POST /pay`` with
a new Idempotency-Key each time (the rate limit and the claim, then the completion), and
``GET /hello`` under a concurrency limit too (the take and the acquire in one call, then the
release). With HTTP
taken away, what is left is the gateway's Python, the store calls' share of the pipeline, and
the garbage collector: the steadier evidence next to peer-bench on a noisy 2-core machine.

    .venv/bin/python -m loadtests.inprocess --rounds 3

Prints the median, min and max per workload. Stops the redis-server it started, by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from gateway import GatewayMiddleware
from gateway._asgi import Message, Receive, Scope, Send
from loadtests.processes import Child, free_port

_POLICY = [{"name": "per-client", "limit": 1_000_000, "period": "1m"}]
_IN_FLIGHT = [{"name": "in-flight", "limit": 1_000}]  # never refuses at 32 at a time
_HEADERS = [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"wrk"), (b"accept", b"*/*")]


async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:  # bounded by the driver: one startup, one shutdown
            message = await receive()
            done = message["type"] == "lifespan.shutdown"
            await send({"type": "lifespan.shutdown.complete" if done else "lifespan.startup.complete"})
            if done:
                return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"hello"})


class Driver:
    """Runs the app's lifespan and sends it requests, ``concurrency`` at a time.

    ``clients``: how many ``x-api-key`` values the requests cycle over (none sent when 1), so a
    config whose identity reads that header spreads its buckets (over a cluster's slots too)."""

    def __init__(self, app: GatewayMiddleware, post: bool, *, clients: int = 1) -> None:
        self._app = app
        self._post = post
        self._keys = itertools.count()
        self._clients = clients
        self._sent = itertools.count()
        self._lifespan: asyncio.Queue[Message] = asyncio.Queue()

    async def start(self) -> asyncio.Task[None]:
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def send(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                started.set_result(None)

        await self._lifespan.put({"type": "lifespan.startup"})
        task = asyncio.ensure_future(self._app({"type": "lifespan", "asgi": {"version": "3.0"}},
                                               self._lifespan.get, send))
        await asyncio.wait_for(started, 10)
        return task

    async def stop(self, task: asyncio.Task[None]) -> None:
        await self._lifespan.put({"type": "lifespan.shutdown"})
        await asyncio.wait_for(task, 10)

    async def one(self) -> None:
        headers = list(_HEADERS)
        if self._clients > 1:
            headers.append((b"x-api-key", b"client-%d" % (next(self._sent) % self._clients)))
        method, path = "GET", "/hello"
        if self._post:
            method, path = "POST", "/pay"
            headers += [(b"idempotency-key", b"k%d" % next(self._keys)), (b"content-length", b"2")]
        scope: Scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
                 "root_path": "", "headers": headers, "client": ("127.0.0.1", 5555),
                 "server": ("127.0.0.1", 8000)}
        status: list[int] = []

        async def receive() -> Message:
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])

        await self._app(scope, receive, send)
        if status != [200]:
            msg = f"{method} {path} answered {status}"
            raise RuntimeError(msg)

    async def burst(self, requests: int, concurrency: int) -> None:
        for _ in range(requests // concurrency):
            await asyncio.gather(*(self.one() for _ in range(concurrency)))


async def _measure(
    url: str, post: bool, requests: int, concurrency: int, *, in_flight: bool = False
) -> float:
    """CPU microseconds per request of one fresh stack, after a warm-up."""
    store = {"url": url, "key_prefix": f"bench{time.time_ns()}"}
    config: dict[str, object] = {"store": store, "rate_limit": _POLICY}
    if in_flight:
        config["concurrency_limit"] = _IN_FLIGHT
    app = GatewayMiddleware(endpoint, config)
    driver = Driver(app, post)
    task = await driver.start()
    try:
        await driver.burst(min(requests, 16_000), concurrency)
        before = time.process_time()
        await driver.burst(requests, concurrency)
        return (time.process_time() - before) / requests * 1e6
    finally:
        await driver.stop(task)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    import uvloop

    workdir = Path(tempfile.mkdtemp(prefix="gateway-inprocess-"))
    port = free_port()
    redis = Child("redis", [shutil.which("redis-server") or "redis-server", "--port", str(port),
                            "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], workdir)
    try:
        redis.wait_redis(port, 10)
        url = f"redis://127.0.0.1:{port}/0"
        workloads = (("GET, rate limit", False, False), ("POST, rate limit + Idempotency-Key", True, False),
                     ("GET, rate limit + concurrency limit", False, True))
        for name, post, in_flight in workloads:
            # one process per workload would be steadier still; the rounds show the spread
            runs = [uvloop.run(_measure(url, post, args.requests, args.concurrency, in_flight=in_flight))
                    for _ in range(args.rounds)]
            print(f"{name}: {statistics.median(runs):.1f} us/req CPU "
                  f"(min {min(runs):.1f}, max {max(runs):.1f}, {args.rounds} rounds)")
    finally:
        redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
