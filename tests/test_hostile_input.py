"""Hostile input against a real ``gateway serve``: raw bytes in, and exactly what reached the upstream.

Each test is one case the hostile-input report found passing before (issue "Hostile input"):
trailer fields that became headers, paths that dodged ``required_paths`` and rate-limit
``paths``, ambiguous requests forwarded, request heads with no time bound, connections with no
cap. The upstream is ``tests/hostile.py``'s recorder, so "forwarded" means the bytes arrived.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hostile import Answer, RecordingUpstream, exchange, read_answer
from tests.redis_process import HOST
from tests.serve_process import GatewayServe, Upstream, serve_config, wait_for

HEADER_TIMEOUT_S = 1.0


def _config(upstream: RecordingUpstream, **server: object) -> dict[str, object]:
    return serve_config(
        upstream.url, "memory://", "hostile",
        identity={"sources": ["header:x-api-key", "ip"], "trusted_proxies": ["127.0.0.1/32"]},
        idempotency={"required_paths": ["/pay"]},
        rate_limit=[
            {"name": "limited", "limit": 1, "period": "1h", "paths": ["/limited"]},
            {"name": "by-ip", "key": "ip", "limit": 1, "period": "1h", "paths": ["/by-ip"]},
        ],
        server={"header_timeout": f"{HEADER_TIMEOUT_S}s", "max_connections": 64, **server},
    )


@pytest.fixture(scope="module")
def gateway(recording_upstream: RecordingUpstream,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServe]:
    gw = GatewayServe(tmp_path_factory.mktemp("hostile"), _config(recording_upstream)).start()
    yield gw
    gw.stop()


@pytest.fixture
def recorder(recording_upstream: RecordingUpstream, gateway: GatewayServe) -> RecordingUpstream:
    recording_upstream.clear()
    return recording_upstream


def _send(gateway: GatewayServe, data: bytes | list[bytes], **kwargs: float) -> Answer:
    return exchange(gateway.port, data, **kwargs)


def _unique() -> str:
    return uuid.uuid4().hex[:12]


def _problem_type(answer: Answer) -> str:
    assert answer.header(b"content-type") == b"application/problem+json", answer
    assert answer.header(b"x-request-id"), answer
    kind: str = json.loads(answer.body)["type"]
    return kind


# ----------------------------------------------------------------------------------- trailers
def test_a_trailer_idempotency_key_is_no_key(gateway: GatewayServe, recorder: RecordingUpstream) -> None:
    """The report's bytes, in one write: the key is in the trailer only, so /pay has no key."""
    data = (b"POST /pay HTTP/1.1\r\nHost: gw\r\nX-Api-Key: k\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\nIdempotency-Key: trl-" + _unique().encode() + b"\r\n\r\n")
    answer = _send(gateway, data)
    assert answer.status == 400
    assert _problem_type(answer) == "urn:gateway:problem:idempotency-key-missing"
    assert recorder.received() == []


def test_trailer_fields_never_reach_the_upstream_as_headers(gateway: GatewayServe,
                                                            recorder: RecordingUpstream) -> None:
    data = (b"POST /echo HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\nX-Api-Key: trailer-key\r\nX-Trailer-Only: 1\r\n\r\n")
    answer = _send(gateway, data)
    assert answer.status == 200
    [got] = recorder.received()
    assert got.body == b"hello"
    assert got.values(b"x-api-key") == []
    assert got.values(b"x-trailer-only") == []


def test_a_trailer_x_forwarded_for_cannot_choose_the_client(gateway: GatewayServe,
                                                            recorder: RecordingUpstream) -> None:
    """From a trusted proxy, X-Forwarded-For names the client; a trailer one must not."""
    client = f"10.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}.7".encode()
    head = (b"POST /by-ip HTTP/1.1\r\nHost: gw\r\nX-Forwarded-For: " + client
            + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
    first = _send(gateway, head + b"1\r\na\r\n0\r\n\r\n")
    assert first.status == 200
    other = b"10.255.255.%d" % (time.time_ns() % 250)
    second = _send(gateway, head + b"1\r\na\r\n0\r\nX-Forwarded-For: " + other + b"\r\n\r\n")
    assert second.status == 429, "the trailer gave the client a fresh bucket"
    assert len(recorder.received()) == 1


# -------------------------------------------------------------------------------------- paths
@pytest.mark.parametrize(
    "target",
    [b"/x/../pay", b"/x/%2e%2e/pay", b"/x/%2E%2E/pay", b"//pay", b"/pay;x", b"/PAY", b"/x/..;/pay",
     b"/./pay", b"/%70ay"],
    ids=["dot-dot", "encoded-dot-dot", "upper-encoded-dot-dot", "double-slash", "params", "upper-case",
         "dot-dot-params", "dot", "encoded-letter"],
)
def test_a_required_path_spelled_another_way_still_needs_a_key(
        gateway: GatewayServe, recorder: RecordingUpstream, target: bytes) -> None:
    answer = _send(gateway, b"POST " + target + b" HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\n\r\n")
    assert answer.status == 400
    assert _problem_type(answer) == "urn:gateway:problem:idempotency-key-missing"
    assert recorder.received() == []


@pytest.mark.parametrize(
    ("target", "forwarded"),
    [(b"/x/../echo", b"/echo"), (b"/echo//a///b", b"/echo/a/b"),
     (b"/echo/%2e/a/%2E%2e/b?q=1", b"/echo/b?q=1"), (b"/echo/%7euser", b"/echo/~user"),
     (b"/echo/a%3Ab", b"/echo/a%3Ab"), (b"/echo/a%2Fb", b"/echo/a%2Fb"), (b"/../../echo", b"/echo")],
    ids=["dot-dot", "slashes", "encoded-dots", "encoded-unreserved", "other-escapes-kept",
         "encoded-slash-kept", "above-root"],
)
def test_the_upstream_receives_the_normal_path(gateway: GatewayServe, recorder: RecordingUpstream,
                                               target: bytes, forwarded: bytes) -> None:
    answer = _send(gateway, b"GET " + target + b" HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert answer.status == 200
    [got] = recorder.received()
    assert got.target == forwarded


@pytest.mark.parametrize("target",
                         [b"/echo/a%5cb", b"/echo/a\\b", b"/echo/%zz", b"/echo/%00"],
                         ids=["encoded-backslash", "backslash", "bad-escape", "nul"])
def test_a_path_with_no_one_meaning_is_refused(gateway: GatewayServe, recorder: RecordingUpstream,
                                               target: bytes) -> None:
    answer = _send(gateway, b"GET " + target + b" HTTP/1.1\r\nHost: gw\r\n\r\n", wait_close_s=1.0)
    assert answer.status == 400
    assert recorder.received() == []


def test_a_rate_limited_path_spelled_another_way_is_the_same_bucket(gateway: GatewayServe,
                                                                    recorder: RecordingUpstream) -> None:
    key = _unique().encode()
    first = _send(gateway, b"GET /limited HTTP/1.1\r\nHost: gw\r\nX-Api-Key: " + key + b"\r\n\r\n")
    assert first.status == 200
    for target in (b"//limited", b"/LIMITED", b"/limited;x", b"/x/../limited", b"/%6cimited"):
        answer = _send(gateway, b"GET %s HTTP/1.1\r\nHost: gw\r\nX-Api-Key: %s\r\n\r\n" % (target, key))
        assert answer.status == 429, target
    assert len(recorder.received()) == 1


# ----------------------------------------------------------------------------- ambiguous requests
@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /echo HTTP/1.1\r\n\r\n", 400),
        (b"GET /echo HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET /echo HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
        (b"GET /echo\r\n\r\n", 400),
        (b"GET /echo HTTP/1.1\r\nHost: a\r\nExpect: 200-ok\r\n\r\n", 417),
        (b"GET /echo HTTP/1.1\r\nHost: a\r\nX-Api-Key: one\r\nX-Api-Key: two\r\n\r\n", 400),
        (b"POST /pay HTTP/1.1\r\nHost: a\r\nIdempotency-Key: one\r\nIdempotency-Key: two\r\n"
         b"Content-Length: 0\r\n\r\n", 400),
        (b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"0\r\n\r\n", 400),
    ],
    ids=["http11-no-host", "two-hosts", "bad-host", "http09-request-line", "expect-200-ok",
         "two-identity-lines", "two-key-lines", "length-and-chunked"],
)
def test_an_ambiguous_request_is_refused_and_not_forwarded(gateway: GatewayServe, recorder: RecordingUpstream,
                                                          request_bytes: bytes, status: int) -> None:
    answer = _send(gateway, request_bytes, wait_close_s=1.0)
    assert answer.status == status
    _problem_type(answer)
    assert answer.header(b"x-request-id")
    assert answer.closed, "an ambiguous request closes its connection"
    assert recorder.received() == []


@pytest.mark.parametrize(
    "request_bytes",
    [b"GET /echo HTTP/1.0\r\n\r\n", b"GET /echo HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n",
     b"GET /echo HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 10.0.0.1\r\nX-Forwarded-For: 10.0.0.2\r\n\r\n",
     b"GET /echo HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n"],
    ids=["http10-without-host", "expect-100-continue", "two-xff-lines-form-one-list", "ipv6-host"],
)
def test_unambiguous_requests_still_pass(gateway: GatewayServe, recorder: RecordingUpstream,
                                         request_bytes: bytes) -> None:
    assert _send(gateway, request_bytes).status == 200
    assert len(recorder.received()) == 1


def test_a_structured_field_key_with_an_escaped_quote_is_a_key(gateway: GatewayServe,
                                                               recorder: RecordingUpstream) -> None:
    """``"a\\"b"`` is the key a"b (RFC 8941 sf-string): run once, replayed, also when sent bare."""
    tag = _unique().encode()
    sf = b'"' + tag + b'\\"b"'
    bare = tag + b'"b'
    request = b"POST /pay HTTP/1.1\r\nHost: gw\r\nContent-Length: 1\r\nIdempotency-Key: %s\r\n\r\nx"
    first = _send(gateway, request % sf)
    again = _send(gateway, request % sf)
    as_bare = _send(gateway, request % bare)
    assert (first.status, again.status, as_bare.status) == (200, 200, 200)
    assert first.header(b"idempotent-replayed") is None
    assert again.header(b"idempotent-replayed") == b"true"
    assert as_bare.header(b"idempotent-replayed") == b"true"
    assert len(recorder.received()) == 1


# ----------------------------------------------------------------------------------- timeouts
@pytest.mark.parametrize(
    "parts",
    [[b"GET /echo HTTP/1.1\r\n", *[b"X-Slow-%d: 1\r\n" % i for i in range(20)]],
     [b"\r\n"] * 20,
     [b"G", b"E", b"T", b" ", b"/", b"e"] * 4],
    ids=["header-lines", "empty-lines", "byte-by-byte"],
)
def test_a_dribbled_request_head_gets_408_within_the_header_timeout(gateway: GatewayServe,
                                                                    recorder: RecordingUpstream,
                                                                    parts: list[bytes]) -> None:
    started = time.monotonic()
    with socket.create_connection((HOST, gateway.port), timeout=5) as sock:
        answer = None
        for part in parts:
            try:
                sock.sendall(part)
            except OSError:
                break
            sock.settimeout(0.25)
            try:
                peek = sock.recv(65536, socket.MSG_PEEK)
            except TimeoutError:
                continue
            answer = read_answer(sock, wait_close_s=1.0) if peek else Answer(None, closed=True)
            break
    elapsed = time.monotonic() - started
    assert answer is not None, "still open after every part was sent"
    assert elapsed < HEADER_TIMEOUT_S + 1.5
    if answer.status is not None:  # a head had begun: 408; only blank lines: just closed
        assert answer.status == 408
        assert _problem_type(answer) == "urn:gateway:problem:request-header-timeout"
    assert answer.closed
    assert recorder.received() == []


def test_an_idle_connection_is_closed_after_the_header_timeout(gateway: GatewayServe) -> None:
    started = time.monotonic()
    with socket.create_connection((HOST, gateway.port), timeout=5) as sock:
        assert sock.recv(65536) == b""  # closed without a response: no request had begun
    assert time.monotonic() - started < HEADER_TIMEOUT_S + 1.5


def test_a_kept_alive_connection_has_the_same_bound_for_its_next_head(gateway: GatewayServe) -> None:
    with socket.create_connection((HOST, gateway.port), timeout=5) as sock:
        sock.sendall(b"GET /echo HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert read_answer(sock).status == 200
        started = time.monotonic()
        sock.sendall(b"GET /echo HTTP/1.1\r\n")
        answer = None
        for i in range(40):  # a line every 0.1 s would keep uvicorn's keep-alive timer from firing
            try:
                sock.sendall(b"X-Slow-%d: 1\r\n" % i)
            except OSError:
                break
            sock.settimeout(0.1)
            try:
                if sock.recv(65536, socket.MSG_PEEK):
                    answer = read_answer(sock, wait_close_s=1.0)
                    break
            except TimeoutError:
                continue
    assert answer is not None
    assert answer.status == 408
    assert time.monotonic() - started < HEADER_TIMEOUT_S + 1.5


def test_thirty_slow_clients_are_all_closed_and_others_still_served(gateway: GatewayServe) -> None:
    socks = [socket.create_connection((HOST, gateway.port), timeout=5) for _ in range(30)]
    try:
        for s in socks:
            s.sendall(b"GET /echo HTTP/1.1\r\nHost: gw\r\n")
        assert _send(gateway, b"GET /echo HTTP/1.1\r\nHost: gw\r\n\r\n").status == 200
        deadline = time.monotonic() + HEADER_TIMEOUT_S + 3.0
        closed = 0
        for s in socks:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            answer = read_answer(s, timeout_s=max(0.1, deadline - time.monotonic()), wait_close_s=1.0)
            closed += answer.status == 408 and answer.closed
        assert closed == 30
    finally:
        for s in socks:
            s.close()


# ------------------------------------------------------------------------------- connection cap
def test_connections_past_max_connections_get_503_and_are_closed(recording_upstream: RecordingUpstream,
                                                                 tmp_path: Path) -> None:
    gw = GatewayServe(tmp_path, _config(recording_upstream, max_connections=4, header_timeout="30s")).start()
    try:
        probe = b"GET /echo HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
        wait_for(lambda: _send(gw, probe).status == 200, "the readiness probe's connection to close")
        held = [socket.create_connection((HOST, gw.port), timeout=5) for _ in range(4)]
        try:
            time.sleep(0.2)  # the server has seen all four
            refused = _send(gw, b"GET /echo HTTP/1.1\r\nHost: gw\r\n\r\n", wait_close_s=1.0)
            assert refused.status == 503
            assert _problem_type(refused) == "urn:gateway:problem:too-many-connections"
            assert refused.header(b"retry-after") == b"1"
            assert refused.closed
        finally:
            for s in held:
                s.close()
        wait_for(lambda: _send(gw, b"GET /echo HTTP/1.1\r\nHost: gw\r\n\r\n").status == 200,
                 "a connection slot to free up")
    finally:
        gw.stop()


def test_reject_mode_refuses_a_non_normal_path_and_serves_a_normal_one(recording_upstream: RecordingUpstream,
                                                                       tmp_path: Path) -> None:
    config = _config(recording_upstream)
    config["request"] = {"path_normalization": "reject"}
    gw = GatewayServe(tmp_path, config).start()
    try:
        recording_upstream.clear()
        refused = _send(gw, b"GET /x/../echo HTTP/1.1\r\nHost: gw\r\n\r\n", wait_close_s=1.0)
        assert refused.status == 400
        assert _problem_type(refused) == "urn:gateway:problem:non-normal-path"
        assert b"/echo" in refused.body
        assert recording_upstream.received() == []
        assert _send(gw, b"GET /echo/a%3Ab HTTP/1.1\r\nHost: gw\r\n\r\n").status == 200
        assert [r.target for r in recording_upstream.received()] == [b"/echo/a%3Ab"]
    finally:
        gw.stop()


def test_no_traceback_and_refusals_are_counted(gateway: GatewayServe) -> None:
    """Runs last in this module: the refusals above were counted by reason, and nothing crashed."""
    with gateway.client() as client:
        text = client.get("/_gateway/metrics").text
    for reason in ("http_version", "host", "duplicate_header", "expect", "path"):
        series = f'gateway_requests_refused_total{{reason="{reason}"}}'
        line = next(ln for ln in text.splitlines() if ln.startswith(series))
        assert float(line.split()[-1]) >= 1, line
    assert "Traceback" not in gateway.stderr()


class _AppOnGatewayProtocol(Upstream):
    """Your own app under uvicorn, run the way "Wrap your ASGI app" says: the gateway's protocol."""

    def command(self) -> list[str]:
        return [*super().command(), "--http", "gateway.http_protocol:GatewayHttpProtocol"]


def test_an_app_run_on_the_gateway_protocol_sees_no_trailer_as_a_header(tmp_path: Path) -> None:
    app = _AppOnGatewayProtocol(tmp_path).start()
    try:
        data = (b"POST /echo HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n0\r\nIdempotency-Key: trl-1\r\nX-Api-Key: trl-2\r\n\r\n")
        answer = exchange(app.port, data)
        assert answer.status == 200
        echo = json.loads(answer.body)
        assert echo["body_length"] == 5
        assert [name for name, _ in echo["headers"]] == ["host", "transfer-encoding"]
    finally:
        app.stop()
