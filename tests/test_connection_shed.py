"""The local shedder's refusal at the connection (``gateway/connection_shed.py``), over raw sockets
against a real ``gateway serve``.

The gateway sheds with ``max_in_flight = 1``: while one critical download is held in flight
(the upstream's ``/download`` waits for ``/release`` after its first chunk), every request of the
``default`` class is shed at once and critical ones (``/charges``, ``/download``) still pass.
Each test checks what the wire says (status, body, headers, framing, what the connection does
next) and what reached the upstream (``/seen`` counts requests by ``X-Request-Id``,
``/executions`` charges by ``Idempotency-Key``). That the shed happens before a scope or a task
exists is checked in-process in ``tests/test_http_protocol_shed.py``.
"""

from __future__ import annotations

import json
import re
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.hostile import Answer, AnswerReader
from tests.redis_process import HOST, RedisProcess
from tests.serve_process import GatewayServe, Upstream, serve_config, wait_for

LOAD_SHED = "urn:gateway:problem:load-shed"
SHED_BODY = json.dumps({
    "type": LOAD_SHED, "title": "Service overloaded", "status": 503,
    "detail": "The gateway is shedding default requests (local capacity) so that more critical ones "
              "are served; retry later.",
    "priority": "default"}, separators=(",", ":")).encode()
HEX_ID = re.compile(rb"[0-9a-f]{32}")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("connection-shed")


@pytest.fixture(scope="module")
def upstream(workdir: Path) -> Iterator[Upstream]:
    process = Upstream(workdir)
    try:
        yield process.start()
    finally:
        process.stop()


def shedding_config(upstream: Upstream, store_url: str = "memory://") -> dict[str, object]:
    """One in flight at most; the loop-lag threshold out of reach of a noisy machine."""
    return serve_config(
        upstream.url, store_url, f"shed{uuid.uuid4().hex[:8]}",
        priority=[{"name": "critical", "paths": ["/charges", "/download"]}],
        **{"shedding.local": {"enabled": True, "max_in_flight": 1, "max_loop_lag": "60s"}},
    )


@pytest.fixture(scope="module")
def gateway(workdir: Path, upstream: Upstream) -> Iterator[GatewayServe]:
    gw = GatewayServe(workdir, shedding_config(upstream))
    try:
        yield gw.start()
    finally:
        gw.stop()


def _shedding_workers(gateway: GatewayServe) -> int:
    """How many worker processes shed the default class wholly now (the gauge is per process)."""
    return sum(1 for (name, labels), value in gateway.metrics().samples.items()
               if name == "gateway_shed_admitting" and ("priority", "default") in labels and value == 0)


def _admitting(gateway: GatewayServe) -> float:
    return gateway.metrics().value("gateway_shed_admitting", priority="default")


@contextmanager
def held(gateway: GatewayServe, upstream: Upstream) -> Iterator[None]:
    """One critical download in flight through the gateway (so ``default`` is shed), released
    and finished on the way out, then the default class wholly let back."""
    hold = uuid.uuid4().hex
    sock = socket.create_connection((HOST, gateway.port), timeout=10)
    try:
        sock.sendall(f"GET /download?mb=1&id={hold} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
        sock.settimeout(10)
        head = b""
        while b"\r\n\r\n" not in head:  # the response started: the request is in flight
            part = sock.recv(65536)
            assert part, "the held download was not answered"
            head += part
        yield
    finally:
        with upstream.client() as client:
            client.get("/release", params={"id": hold})
        sock.close()
        wait_for(lambda: _admitting(gateway) == 1.0, "the default class let back", deadline_s=15)


def _request(method: str, target: str, *, rid: str | None = None, headers: str = "",
             body: bytes = b"", version: str = "1.1") -> bytes:
    head = f"{method} {target} HTTP/{version}\r\nHost: gw\r\n"
    if rid is not None:
        head += f"X-Request-Id: {rid}\r\n"
    if body and "transfer-encoding" not in headers.lower():
        head += f"Content-Length: {len(body)}\r\n"
    return (head + headers + "\r\n").encode() + body


def _seen(upstream: Upstream, rid: str) -> int:
    return upstream.seen(rid)


def _charge(key: str) -> bytes:
    body = b'{"amount":100}'
    return _request("POST", "/charges", body=body,
                    headers=f"Idempotency-Key: {key}\r\nContent-Type: application/json\r\n")


def _assert_shed(answer: Answer, *, rid: bytes | None = None, close: bool = False) -> None:
    assert answer.status == 503, answer
    assert answer.body == SHED_BODY
    assert answer.header(b"content-type") == b"application/problem+json"
    assert answer.header(b"cache-control") == b"no-store"
    assert answer.header(b"retry-after") == b"1"
    assert answer.header(b"content-length") == str(len(SHED_BODY)).encode()
    assert answer.header(b"date"), "the gateway dates what it makes"
    got = answer.header(b"x-request-id")
    assert got is not None
    assert got == rid if rid is not None else HEX_ID.fullmatch(got), got
    assert [n for n, _ in answer.headers].count(b"x-request-id") == 1
    assert (answer.header(b"connection") == b"close") is close, answer.headers


def _connect(gateway: GatewayServe) -> tuple[socket.socket, AnswerReader]:
    sock = socket.create_connection((HOST, gateway.port), timeout=10)
    return sock, AnswerReader(sock)


# ------------------------------------------------------------------------------------- answers
def test_a_shed_request_gets_the_stacks_503_and_never_reaches_the_upstream(
        gateway: GatewayServe, upstream: Upstream) -> None:
    """While the default class is shed, its request gets the load-shed problem with its own
    request id, Retry-After and Date, and the upstream never sees it."""
    rid = f"shed-{uuid.uuid4().hex}"
    with held(gateway, upstream):
        sock, answers = _connect(gateway)
        with sock:
            sock.sendall(_request("GET", "/echo", rid=rid))
            _assert_shed(answers.next(), rid=rid.encode())
    assert _seen(upstream, rid) == 0


def test_a_malformed_request_id_is_replaced_with_a_new_one(gateway: GatewayServe, upstream: Upstream) -> None:
    """A shed request's X-Request-Id is its own only when well formed, as everywhere else."""
    with held(gateway, upstream):
        sock, answers = _connect(gateway)
        with sock:
            sock.sendall(_request("GET", "/echo", rid="bad id!" + "x" * 200))
            _assert_shed(answers.next())


def test_the_connection_stays_usable_after_a_shed_request(gateway: GatewayServe, upstream: Upstream) -> None:
    """Keep-alive: a shed request leaves its connection open, and the next request on it is
    served once the class is let back."""
    rid = f"after-{uuid.uuid4().hex}"
    sock, answers = _connect(gateway)
    with sock:
        with held(gateway, upstream):
            sock.sendall(_request("GET", "/echo"))
            _assert_shed(answers.next())
        sock.sendall(_request("GET", "/echo", rid=rid))
        served = answers.next()
        assert served.status == 200, served
        assert json.loads(served.body)["method"] == "GET"
    assert _seen(upstream, rid) == 1


def test_a_pipelined_pair_of_shed_requests_gets_two_answers_in_order(
        gateway: GatewayServe, upstream: Upstream) -> None:
    """Two shed requests in one write: two 503s, each with its request's id, in order."""
    first, second = f"p1-{uuid.uuid4().hex}", f"p2-{uuid.uuid4().hex}"
    with held(gateway, upstream):
        sock, answers = _connect(gateway)
        with sock:
            sock.sendall(_request("GET", "/echo", rid=first) + _request("DELETE", "/echo", rid=second))
            _assert_shed(answers.next(), rid=first.encode())
            _assert_shed(answers.next(), rid=second.encode())
            sock.sendall(_charge(f"k-{uuid.uuid4().hex}"))
            assert answers.next().status == 201  # and the connection still serves
    assert _seen(upstream, first) == _seen(upstream, second) == 0


def test_pipelined_shed_and_critical_requests_are_answered_in_order(
        gateway: GatewayServe, upstream: Upstream) -> None:
    """A critical request behind a shed one, and a shed one behind a critical one still being
    answered: each answer in its request's place."""
    key, rid = f"k-{uuid.uuid4().hex}", f"behind-{uuid.uuid4().hex}"
    with held(gateway, upstream):
        sock, answers = _connect(gateway)
        with sock:
            sock.sendall(_request("GET", "/echo") + _charge(key) + _request("GET", "/echo", rid=rid))
            _assert_shed(answers.next())
            charged = answers.next()
            assert charged.status == 201, charged
            assert json.loads(charged.body)["key"] == key
            _assert_shed(answers.next(), rid=rid.encode())
    assert upstream.executions()["started"][key] == 1
    assert _seen(upstream, rid) == 0


def test_a_shed_posts_body_is_dropped_never_parsed_as_a_request(
        gateway: GatewayServe, upstream: Upstream) -> None:
    """A shed POST whose body is itself a charge request: the body is read and dropped, the
    connection stays alive, and only the real request behind it runs."""
    smuggled, real = f"smuggled-{uuid.uuid4().hex}", f"real-{uuid.uuid4().hex}"
    with held(gateway, upstream):
        sock, answers = _connect(gateway)
        with sock:
            sock.sendall(_request("POST", "/echo", body=_charge(smuggled)) + _charge(real))
            _assert_shed(answers.next())
            charged = answers.next()
            assert charged.status == 201, charged
            assert json.loads(charged.body)["key"] == real
    started = upstream.executions()["started"]
    assert started.get(smuggled) is None
    assert started[real] == 1


def test_a_shed_posts_body_sent_after_the_answer_is_dropped_too(gateway: GatewayServe,
                                                                upstream: Upstream) -> None:
    """The 503 goes out once the head is read; the body that comes later is still dropped."""
    key = f"late-{uuid.uuid4().hex}"
    body = b"x" * 5000
    with held(gateway, upstream):
        sock, answers = _connect(gateway)
        with sock:
            sock.sendall(_request("POST", "/echo", body=body)[:-len(body)])
            _assert_shed(answers.next())
            sock.sendall(body + _charge(key))
            assert answers.next().status == 201
    assert upstream.executions()["started"][key] == 1


@pytest.mark.parametrize("case", ["chunked", "too-long", "expect-continue"])
def test_a_body_not_worth_draining_closes_the_connection_after_it(
        gateway: GatewayServe, upstream: Upstream, case: str) -> None:
    """A chunked body, one past SHED_DRAIN_MAX_BYTES, or one behind Expect: 100-continue: the
    503 says Connection: close (no 100 Continue first), and what follows is never served."""
    key = f"after-close-{uuid.uuid4().hex}"
    if case == "chunked":
        shed = _request("POST", "/echo", headers="Transfer-Encoding: chunked\r\n",
                        body=b"5\r\nhello\r\n0\r\n\r\n")
    elif case == "too-long":
        shed = _request("POST", "/echo", body=b"y" * (64 * 1024 + 1))
    else:
        shed = _request("POST", "/echo", headers="Expect: 100-continue\r\n", body=b"z" * 10)
    with held(gateway, upstream):
        sock, answers = _connect(gateway)
        with sock:
            sock.sendall(shed + _charge(key))
            _assert_shed(answers.next(), close=True)
            assert answers.closed()
    assert upstream.executions()["started"].get(key) is None


def test_http_1_0_and_connection_close_are_answered_and_closed(gateway: GatewayServe,
                                                               upstream: Upstream) -> None:
    """A request that asked for no keep-alive gets its 503 with Connection: close, then EOF."""
    with held(gateway, upstream):
        for request in (_request("GET", "/echo", version="1.0"),
                        _request("GET", "/echo", headers="Connection: close\r\n")):
            sock, answers = _connect(gateway)
            with sock:
                sock.sendall(request)
                _assert_shed(answers.next(), close=True)
                assert answers.closed()


def test_a_shed_head_request_gets_the_head_alone(gateway: GatewayServe, upstream: Upstream) -> None:
    """HEAD: the 503's head with its Content-Length, no body; the next answer follows cleanly."""
    with held(gateway, upstream):
        sock, answers = _connect(gateway)
        with sock:
            sock.sendall(_request("HEAD", "/echo") + _request("GET", "/echo"))
            head = answers.next(head_only=True)
            assert head.status == 503
            assert head.header(b"content-length") == str(len(SHED_BODY)).encode()
            _assert_shed(answers.next())


# ------------------------------------------------------------------------------------- never shed
def test_critical_requests_are_never_shed(gateway: GatewayServe, upstream: Upstream) -> None:
    """Past max_in_flight, the most critical class still reaches the upstream, pipelined or not."""
    keys = [f"crit-{uuid.uuid4().hex}" for _ in range(3)]
    with held(gateway, upstream):
        sock, answers = _connect(gateway)
        with sock:
            sock.sendall(b"".join(_charge(k) for k in keys))
            assert [answers.next().status for _ in keys] == [201, 201, 201]
    started = upstream.executions()["started"]
    assert [started[k] for k in keys] == [1, 1, 1]


def test_the_gateways_own_paths_and_refusals_answer_as_before(gateway: GatewayServe,
                                                                upstream: Upstream) -> None:
    """/_gateway/* is answered while shedding, and a request the request check refuses gets
    the check's answer, not a 503."""
    with held(gateway, upstream):
        sock, answers = _connect(gateway)
        with sock:
            sock.sendall(_request("GET", "/_gateway/healthz"))
            assert answers.next().status == 200
        sock, answers = _connect(gateway)
        with sock:
            sock.sendall(_request("GET", "/echo", headers="Host: other\r\n"))
            refused = answers.next()
            assert refused.status == 400
            assert json.loads(refused.body)["type"] == "urn:gateway:problem:ambiguous-request"


# ------------------------------------------------------------------------------------- counted
def test_shed_requests_are_counted_as_the_stack_counts_them(gateway: GatewayServe,
                                                            upstream: Upstream) -> None:
    """Each shed request adds one to gateway_shed_total{local, default, shed} and to
    gateway_requests_total{code="503"}; none to the critical class."""
    before = gateway.metrics()
    with held(gateway, upstream):
        sock, answers = _connect(gateway)
        with sock:
            sock.sendall(_request("GET", "/echo") * 5)
            for _ in range(5):
                _assert_shed(answers.next())
    after = gateway.metrics()

    def added(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    assert added("gateway_shed_total", shedder="local", priority="default", decision="shed") == 5
    assert added("gateway_shed_total", shedder="local", priority="critical") == 0
    assert added("gateway_requests_total", code="503") == 5


def test_shed_requests_are_logged_in_the_aggregated_line(gateway: GatewayServe, upstream: Upstream) -> None:
    """The shedder's log line (at most one a second) counts the requests shed at the connection."""
    rid = f"logged-{uuid.uuid4().hex}"
    with held(gateway, upstream):
        sock, answers = _connect(gateway)
        with sock:
            sock.sendall(_request("GET", "/echo", rid=rid))
            _assert_shed(answers.next(), rid=rid.encode())
            # a line a second: within two seconds one more shed request writes one
            line = wait_for(lambda: next((e for e in gateway.logs() if e.get("event") == "shedding.shed"
                                          and e.get("priority") == "default"), None),
                            "a shedding.shed line", deadline_s=2.5)
    assert line["shedder"] == "local"
    assert line["count"] >= 1


# ------------------------------------------------------------------------------------- workers
def test_each_worker_sheds_with_its_own_shedder(workdir: Path, upstream: Upstream,
                                                 redis_server: RedisProcess) -> None:
    """Under --workers 2, once each worker holds its one slot, each sheds at its connections:
    every default request is answered the 503, and the metrics (summed over workers) count each."""
    gw = GatewayServe(workdir, shedding_config(upstream, redis_server.url), workers=2)
    holds: list[tuple[socket.socket, str]] = []
    try:
        gw.start()
        for _ in range(12):  # until both workers hold one (the kernel picks the worker)
            hold = uuid.uuid4().hex
            sock = socket.create_connection((HOST, gw.port), timeout=10)
            sock.sendall(f"GET /download?mb=1&id={hold} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
            holds.append((sock, hold))
            assert sock.recv(12) == b"HTTP/1.1 200"
            if wait_for(lambda: _shedding_workers(gw) or None, "a worker shedding", deadline_s=5) >= 2:
                break
        else:
            pytest.fail("the holds never reached both workers")
        shed = {"shedder": "local", "priority": "default", "decision": "shed"}
        before = gw.metrics().value("gateway_shed_total", **shed)
        for _ in range(6):
            sock, answers = _connect(gw)
            with sock:
                sock.sendall(_request("GET", "/echo"))
                _assert_shed(answers.next())
        # another worker's counts reach the multiprocess files within a second (tallies.py)
        wait_for(lambda: gw.metrics().value("gateway_shed_total", **shed) - before >= 6 or None,
                 "both workers' sheds counted", deadline_s=5)
        assert gw.metrics().value("gateway_shed_total", **shed) - before == 6
    finally:
        with httpx.Client(base_url=upstream.url, trust_env=False, timeout=10) as client:
            for sock, hold in holds:
                client.get("/release", params={"id": hold})
                sock.close()
        gw.stop()
