"""The overload scenario's critical trickle, measured from a process of its own.

Locust's critical users share one process (and one gevent loop) with the flood's users; past
~90 % of a core, the time a response waits for its greenlet to run is in every response time
Locust records, critical or not. This client measures what the gateway does to a critical
request and nothing else: a small asyncio loop (uvloop when installed) in its own process,
``--clients`` keep-alive connections, each sending ``POST /charges`` with a new
``Idempotency-Key`` every ``--pacing`` seconds (constant pacing, as Locust's
``constant_pacing``: the next request is due ``pacing`` after the previous one was sent, at
once if that has passed), the clients' starts spread over one pacing period.

A request's latency runs from just before its first byte is written to its last body byte read
(``time.perf_counter``). Every request is bounded by ``REQUEST_TIMEOUT_S`` (a timeout or a
broken connection is status 0, and the client reconnects). After ``--seconds`` (or at SIGTERM)
no new request starts, the ones under way finish within their bound, and the record is written,
atomically, to ``--out``: ``{"samples": [[sent_at (time.time()), latency_ms, status, key], ...],
"keys": {key: status}, "clients": n, "pacing_s": p}``. The runner splits the samples at the
flood's start (``loadtests/report.py``), and checks the keys against the upstream's record.

Only ``127.0.0.1`` is accepted as the target.

    python -m loadtests.probe --url http://127.0.0.1:PORT --seconds 60 --out probe.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

__all__ = ["REQUEST_TIMEOUT_S", "main", "run"]

REQUEST_TIMEOUT_S = 10.0  # as the Locust users' network timeout
MAX_HEAD = 65536
HOST = "127.0.0.1"


class _Stop(Exception):
    """The connection answered nothing usable: the request's status is 0."""


class _Client:
    """One keep-alive connection and its paced requests."""

    def __init__(self, index: int, port: int, record: dict[str, Any], rng: random.Random) -> None:
        self.index = index
        self.port = port
        self.record = record
        self.rng = rng
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.sent = 0

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.reader is None or self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
        return self.reader, self.writer

    def _close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    def _request(self, key: str) -> bytes:
        body = json.dumps({"amount": self.rng.randint(100, 99_999), "currency": "eur",
                           "customer": f"cus_probe_{self.index}"}).encode()
        head = (f"POST /charges HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n"
                f"Content-Type: application/json\r\nX-Api-Key: lt-probe-{self.index}\r\n"
                f"Idempotency-Key: {key}\r\nContent-Length: {len(body)}\r\n\r\n")
        return head.encode() + body

    async def _exchange(self, data: bytes) -> int:
        """Write one request, read its whole response; its status."""
        reader, writer = await self._connect()
        writer.write(data)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        if len(head) > MAX_HEAD:
            raise _Stop
        status_line, *lines = head[:-4].split(b"\r\n")
        status = int(status_line.split(b" ", 2)[1])
        length, close = 0, False
        for line in lines:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value.strip())
            elif name == b"connection" and b"close" in value.lower():
                close = True
        await reader.readexactly(length)
        if close:
            self._close()
        return status

    async def one(self) -> None:
        key = f"lt-probe-{self.index}-{self.sent}-{self.rng.getrandbits(64):016x}"
        self.sent += 1
        data = self._request(key)
        self.record["keys"][key] = 0  # known before it leaves: any execution is of a known key
        sent_at, started = time.time(), time.perf_counter()
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                status = await self._exchange(data)
        except (OSError, TimeoutError, ValueError, IndexError, _Stop, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError):
            self._close()
            status = 0
        latency_ms = (time.perf_counter() - started) * 1000
        self.record["keys"][key] = status
        self.record["samples"].append([round(sent_at, 4), round(latency_ms, 3), status, key])

    async def run(self, start_at: float, end_at: float, pacing_s: float, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        due = start_at
        try:
            while not stop.is_set():
                wait = due - loop.time()
                if wait > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), wait)
                    if stop.is_set():
                        return
                if loop.time() >= end_at:
                    return
                sent = loop.time()
                await self.one()
                due = sent + pacing_s  # already past when the answer was late: the next goes at once
        finally:
            self._close()


async def run(port: int, *, seconds: float, clients: int, pacing_s: float, seed: int) -> dict[str, Any]:
    """Send the trickle for ``seconds``; the record (see the module docstring)."""
    record: dict[str, Any] = {"samples": [], "keys": {}, "clients": clients, "pacing_s": pacing_s}
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    now = loop.time()
    end_at = now + seconds
    workers = [_Client(i, port, record, random.Random(f"{seed}-probe-{i}")) for i in range(clients)]
    await asyncio.gather(*(w.run(now + i * pacing_s / clients, end_at, pacing_s, stop)
                           for i, w in enumerate(workers)))
    return record


def _write(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.probe",
                                     description="A paced critical trickle, timed in its own process.")
    parser.add_argument("--url", required=True, help="the gateway, http://127.0.0.1:PORT")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--pacing", type=float, default=0.1, help="seconds between a client's requests")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    url = urlsplit(args.url)
    if url.scheme != "http" or url.hostname != HOST or url.port is None:
        print(f"loadtests.probe: --url must be http://{HOST}:PORT, got {args.url}", file=sys.stderr)
        return 2
    if not (0 < args.seconds <= 3600 and 1 <= args.clients <= 100 and 0.001 <= args.pacing <= 60):
        print("loadtests.probe: --seconds 0-3600, --clients 1-100, --pacing 0.001-60", file=sys.stderr)
        return 2
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    record = runner(run(url.port, seconds=args.seconds, clients=args.clients, pacing_s=args.pacing,
                        seed=args.seed))
    _write(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
