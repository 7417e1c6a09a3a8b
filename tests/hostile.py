"""Raw bytes both ways: a recording upstream and a client that writes requests byte for byte.

The hostile-input tests need to see exactly what reaches the upstream, so the upstream here is no
HTTP framework (which would parse, merge or drop what it was sent) but a TCP server that keeps
each request's head as bytes. It answers every request ``200 ok`` and keeps connections alive,
as the gateway's pooled client expects. Everything listens on 127.0.0.1, every read has a
timeout, and the server stops when its ``with`` block ends.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

from tests.redis_process import HOST
from tests.serve_process import RawTcpServer

READ_S = 5.0
_MAX_HEAD = 65536
_OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


@dataclass
class Received:
    """One request as the upstream read it."""

    request_line: bytes
    headers: list[tuple[bytes, bytes]]  # names lowercased, values as sent
    body: bytes

    @property
    def target(self) -> bytes:
        return self.request_line.split(b" ")[1]

    @property
    def path(self) -> bytes:
        return self.target.partition(b"?")[0]

    def values(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n == name]


class RecordingUpstream(RawTcpServer):
    """A keep-alive HTTP/1.1 upstream that records every request it reads and answers 200."""

    name = "recording-upstream"
    backlog = 128
    threaded = True  # the gateway's pool keeps several connections open at once

    def __init__(self) -> None:
        super().__init__()
        self._received: list[Received] = []

    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    def clear(self) -> None:
        with self._lock:
            self._received.clear()

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(READ_S)
        reader = _Reader(conn)
        try:
            while not self._stop.is_set():
                request = reader.request()
                if request is None:
                    return
                with self._lock:
                    self._received.append(request)
                conn.sendall(_OK)
        except (OSError, ValueError):
            return


class _Reader:
    """Reads HTTP/1.1 requests off one socket: head, then a Content-Length or chunked body."""

    def __init__(self, conn: socket.socket) -> None:
        self._conn = conn
        self._buf = b""

    def _fill(self) -> bool:
        part = self._conn.recv(65536)
        self._buf += part
        return bool(part)

    def _until(self, marker: bytes) -> bytes | None:
        while marker not in self._buf:
            if len(self._buf) > _MAX_HEAD or not self._fill():
                return None
        line, _, self._buf = self._buf.partition(marker)
        return line

    def _exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            if not self._fill():
                raise ValueError("connection closed inside a body")
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def request(self) -> Received | None:
        head = self._until(b"\r\n\r\n")
        if head is None:
            return None
        request_line, *lines = head.split(b"\r\n")
        headers = _fields(lines)
        names = {n for n, _ in headers}
        if b"transfer-encoding" in names:
            body = self._chunked()
        else:
            length = next((int(v) for n, v in headers if n == b"content-length"), 0)
            body = self._exactly(length)
        return Received(request_line, headers, body)

    def _chunked(self) -> bytes:
        body = b""
        while True:  # bounded by the sender: each chunk is read whole or the socket times out
            size_line = self._until(b"\r\n")
            if size_line is None:
                raise ValueError("connection closed inside a chunked body")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                while self._until(b"\r\n"):  # trailer section, up to its empty line
                    pass
                return body
            body += self._exactly(size)
            self._exactly(2)


# ------------------------------------------------------------------------------------ client
@dataclass
class Answer:
    """The first response on a connection, or nothing when it closed (or stayed silent) first."""

    status: int | None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    closed: bool = False  # the server closed the connection after it

    def header(self, name: bytes) -> bytes | None:
        return next((v for n, v in self.headers if n == name), None)


def exchange(port: int, data: bytes | list[bytes], *, timeout_s: float = READ_S, pause_s: float = 0.0,
             wait_close_s: float = 0.0) -> Answer:
    """Write ``data`` (one write, or each part with ``pause_s`` between) and read one response;
    with ``wait_close_s``, wait that long to see whether the server closes the connection."""
    with socket.create_connection((HOST, port), timeout=timeout_s) as sock:
        for i, part in enumerate([data] if isinstance(data, bytes) else data):
            if i and pause_s:
                time.sleep(pause_s)
            sock.sendall(part)
        return read_answer(sock, timeout_s, wait_close_s=wait_close_s)


def read_answer(sock: socket.socket, timeout_s: float = READ_S, *, wait_close_s: float = 0.0) -> Answer:
    """One response off ``sock`` (head and Content-Length body), then whether it closed."""
    sock.settimeout(timeout_s)
    got = _read_head(sock, b"")
    while isinstance(got, tuple) and got[0].startswith(b"HTTP/1.1 1"):  # an interim 100 Continue
        got = _read_head(sock, got[1])
    if isinstance(got, Answer):
        return got
    head, rest = got
    status_line, *lines = head.split(b"\r\n")
    answer = Answer(int(status_line.split(b" ")[1]), _fields(lines))
    length = int(answer.header(b"content-length") or 0)
    try:
        while len(rest) < length:
            part = sock.recv(65536)
            if not part:
                break
            rest += part
        answer.body = rest[:length]
        if wait_close_s:
            sock.settimeout(wait_close_s)
            answer.closed = sock.recv(1) == b""
    except TimeoutError:
        pass
    except OSError:
        answer.closed = True
    return answer


def _read_head(sock: socket.socket, buf: bytes) -> tuple[bytes, bytes] | Answer:
    """(head, what followed it) from ``buf`` and ``sock``; an ``Answer`` of nothing when the
    socket closed or timed out first."""
    try:
        while b"\r\n\r\n" not in buf:
            part = sock.recv(65536)
            if not part:
                return Answer(None, closed=True)
            buf += part
    except TimeoutError:
        return Answer(None)
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def _fields(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    """Header lines as (lowercase name, value without surrounding whitespace)."""
    fields = []
    for line in lines:
        name, _, value = line.partition(b":")
        fields.append((name.strip().lower(), value.strip()))
    return fields


class AnswerReader:
    """Responses off one socket in order, for pipelined requests: each is read whole (its head
    and Content-Length body) and whatever followed it stays for the next."""

    def __init__(self, sock: socket.socket, timeout_s: float = READ_S) -> None:
        self._sock = sock
        self._buf = b""
        sock.settimeout(timeout_s)

    def next(self, *, head_only: bool = False) -> Answer:
        """The next response (``head_only``: the answer to a HEAD, which has no body);
        ``Answer(None, closed=True)`` when the connection closed first."""
        got = _read_head(self._sock, self._buf)
        if isinstance(got, Answer):
            self._buf = b""
            return got
        head, rest = got
        status_line, *lines = head.split(b"\r\n")
        answer = Answer(int(status_line.split(b" ")[1]), _fields(lines))
        length = 0 if head_only else int(answer.header(b"content-length") or 0)
        while len(rest) < length:
            part = self._sock.recv(65536)
            if not part:
                break
            rest += part
        answer.body, self._buf = rest[:length], rest[length:]
        return answer

    def closed(self, wait_s: float = 2.0) -> bool:
        """Whether the server closes the connection within ``wait_s`` with nothing more to say."""
        if self._buf:
            return False
        self._sock.settimeout(wait_s)
        try:
            return self._sock.recv(1) == b""
        except TimeoutError:
            return False
        except OSError:
            return True
