"""``gateway serve`` end to end: real processes for the gateway, the upstream and Redis.

Checks CONTRACT.md "Proxy", "Idempotency" and "Operations" on the wire: what reaches the upstream
(and what must not), what comes back, streaming both ways without buffering, the 502/504 answers
and their idempotent replays, one limit shared by two gateway processes, the metrics, ``--workers
2``, a graceful SIGTERM, and the fast exit-2 failures. The upstream is ``tests/e2e_upstream.py``
under uvicorn; every process runs on 127.0.0.1 on a free port and is stopped by its own PID.
"""

from __future__ import annotations

import hashlib
import json
import re
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.requestid import valid_request_id
from tests.e2e_upstream import CHUNK, DATE_HEADER, GZIP_BODY, MIB, SERVER_HEADER, download_sha256
from tests.redis_process import RedisProcess, free_port
from tests.serve_process import (
    Dropper,
    GatewayServe,
    Metrics,
    Upstream,
    run_serve,
    serve_config,
    wait_for,
)

pytestmark = pytest.mark.slow

NOT_REACHED = "urn:gateway:problem:upstream-not-reached"
OUTCOME_UNKNOWN = "urn:gateway:problem:outcome-unknown"
PROBLEM_JSON = "application/problem+json"
HOP_BY_HOP_REQUEST = {
    "Connection": "keep-alive, X-Drop-Me",
    "X-Drop-Me": "named in Connection",
    "Keep-Alive": "timeout=5",
    "TE": "trailers",
    "Trailer": "X-Checksum",
    "Proxy-Authorization": "Basic Zm9vOmJhcg==",
    "Proxy-Connection": "keep-alive",
    "Upgrade": "h2c",  # without "upgrade" in Connection: a plain header to a server
}
HOP_BY_HOP_RESPONSE = ("connection", "x-drop-me", "keep-alive", "proxy-connection",
                       "proxy-authenticate", "te", "trailer", "upgrade")
STREAM_MIB = 16
STREAM_BYTES = STREAM_MIB * MIB
# a gateway that buffered a 16 MiB body would grow by at least that much
RSS_GROWTH_BOUND = 8 * MIB


# ------------------------------------------------------------------------------------ helpers
def key_prefix() -> str:
    return f"e2e{uuid.uuid4().hex[:10]}"


def new_key() -> str:
    return f"key-{uuid.uuid4().hex}"


def upstream_headers(echo: dict[str, Any]) -> list[tuple[str, str]]:
    return [(name, value) for name, value in echo["headers"]]


def header_values(echo: dict[str, Any], name: str) -> list[str]:
    return [value for n, value in echo["headers"] if n == name.lower()]


def assert_problem(response: httpx.Response, status: int, type_: str | None) -> dict[str, Any]:
    """An RFC 9457 answer of ``status`` (and ``type_``, unless None) with an X-Request-Id."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON)
    body: dict[str, Any] = response.json()
    if type_ is None:
        assert body["type"]
    else:
        assert body["type"] == type_
    assert body["status"] == status
    assert body["title"]
    assert body["detail"]
    assert valid_request_id(response.headers["x-request-id"].encode())
    return body


def log_events(gateway: GatewayServe, event: str) -> list[dict[str, Any]]:
    return [line for line in gateway.logs() if line.get("event") == event]


def wait_for_log(gateway: GatewayServe, event: str, request_id: str) -> dict[str, Any]:
    """The JSON log line of ``event`` for ``request_id`` (polled: stderr is written async)."""
    def find() -> dict[str, Any] | None:
        for line in log_events(gateway, event):
            if line.get("request_id") == request_id:
                return line
        return None
    found: dict[str, Any] = wait_for(find, f"a {event} log line for {request_id}", deadline_s=5.0)
    return found


def children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name is in parentheses and may hold spaces: fields after the last ")"
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def start_all(*processes: GatewayServe | Upstream) -> None:
    """Launch every process, then wait for each: the cold starts overlap."""
    for process in processes:
        process.launch()
    for process in processes:
        process.wait_ready()


@pytest.fixture(scope="module")
def e2e_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def upstream(e2e_dir: Path) -> Iterator[Upstream]:
    """The upstream app under uvicorn, for the whole module."""
    process = Upstream(e2e_dir)
    try:
        process.start()
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def gateway(e2e_dir: Path, upstream: Upstream, redis_server: RedisProcess) -> Iterator[GatewayServe]:
    """``gateway serve`` in front of ``upstream`` on the session Redis; no rate limit, idempotency
    on its defaults."""
    process = GatewayServe(e2e_dir, serve_config(upstream.url, redis_server.url, key_prefix()))
    try:
        process.start()
        yield process
    finally:
        process.stop()


@pytest.fixture
def client(gateway: GatewayServe) -> Iterator[httpx.Client]:
    with gateway.client() as c:
        yield c


# ------------------------------------------------------------------------------------ startup
def test_startup_line_names_address_and_upstream(gateway: GatewayServe, upstream: Upstream,
                                                 redis_server: RedisProcess) -> None:
    """Once bound, serve prints one stdout line naming its address, the upstream and 1 worker."""
    line = wait_for(lambda: [ln for ln in gateway.stdout().splitlines() if "gateway serve on" in ln],
                    "the startup line")
    assert len(line) == 1, line
    assert line[0].startswith(f"gateway serve on {gateway.url} -> {upstream.url}"), line
    assert f"(store {redis_server.url})" in line[0]
    assert "1 worker" in line[0]


def test_startup_line_hides_the_store_password(e2e_dir: Path, upstream: Upstream) -> None:
    """The startup line names the store without its password."""
    secret = f"s3cret{uuid.uuid4().hex[:6]}"
    gateway = GatewayServe(e2e_dir, serve_config(upstream.url, f"redis://user:{secret}@127.0.0.1:1/0",
                                                 key_prefix()))
    try:
        gateway.launch()
        wait_for(lambda: "gateway serve on" in gateway.stdout() or gateway.exited(),
                 "the startup line", deadline_s=30.0)
    finally:
        gateway.stop()
    assert "gateway serve on" in gateway.stdout(), gateway.stderr()[-2000:]
    assert "127.0.0.1:1" in gateway.stdout()
    assert secret not in gateway.stdout() + gateway.stderr()


def test_ops_endpoints(client: httpx.Client) -> None:
    """healthz and readyz answer 200 JSON, metrics is Prometheus text, other /_gateway/* is 404."""
    assert client.get("/_gateway/healthz").json() == {"status": "ok"}
    assert client.get("/_gateway/readyz").json() == {"status": "ready", "breaker": "closed"}
    scraped = client.get("/_gateway/metrics")
    assert scraped.status_code == 200
    assert scraped.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    Metrics.parse(scraped.text)  # parses as Prometheus text
    for family in ("gateway_requests_total", "gateway_ratelimit_decisions_total",
                   "gateway_idempotency_outcomes_total"):
        assert f"# TYPE {family.removesuffix('_total')} counter" in scraped.text or \
            f"# TYPE {family} counter" in scraped.text, family
    assert "# TYPE gateway_store_latency_seconds histogram" in scraped.text
    assert_problem(client.get("/_gateway/nope"), 404, "urn:gateway:problem:not-found")


# ------------------------------------------------------------------------------------ request
def test_request_reaches_upstream_intact(client: httpx.Client, gateway: GatewayServe,
                                         upstream: Upstream) -> None:
    """Method, raw path, query, body and ordinary headers reach the upstream exactly as sent."""
    path = "/echo/caf%C3%A9/a%20b/%2Fslash%3Bsemi;p=1"
    query = "q=a%2Bb&q=2&empty=&flag&sp=%20x"
    body = bytes(range(256)) * 41
    sent_headers = [("X-Custom", "v1"), ("X-Multi", "one"), ("X-Multi", "two"),
                    ("Content-Type", "application/octet-stream"), ("Authorization", "Bearer t0k")]
    response = client.request("PATCH", f"{path}?{query}", content=body, headers=sent_headers)
    assert response.status_code == 200, response.text
    echo = response.json()
    assert echo["method"] == "PATCH"
    assert echo["raw_path"] == path
    assert echo["query_string"] == query
    assert echo["body_length"] == len(body)
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert header_values(echo, "x-custom") == ["v1"]
    assert header_values(echo, "x-multi") == ["one", "two"]
    assert header_values(echo, "content-type") == ["application/octet-stream"]
    assert header_values(echo, "authorization") == ["Bearer t0k"]
    assert header_values(echo, "user-agent") == [client.headers["user-agent"]]
    assert header_values(echo, "host") == [f"127.0.0.1:{upstream.port}"]
    # nothing the client did not send, besides the proxy's own: no client library defaults
    allowed = {name.lower() for name, _ in sent_headers} | {
        "accept", "accept-encoding", "user-agent", "host", "content-length", "x-forwarded-for",
        "x-forwarded-proto", "x-forwarded-host", "x-request-id"}
    assert {name for name, _ in upstream_headers(echo)} <= allowed


def test_get_without_body_sends_no_body(client: httpx.Client) -> None:
    """A GET without a body reaches the upstream as a GET without a body (no chunked framing)."""
    echo = client.get("/echo").json()
    assert echo["method"] == "GET"
    assert echo["body_length"] == 0
    assert header_values(echo, "transfer-encoding") == []


def test_hop_by_hop_request_headers_are_not_forwarded(client: httpx.Client) -> None:
    """Hop-by-hop request headers, and every header named in Connection, stop at the gateway."""
    response = client.post("/echo", content=b"payload", headers={**HOP_BY_HOP_REQUEST, "X-Keep": "yes"})
    assert response.status_code == 200, response.text
    echo = response.json()
    names = {name for name, _ in upstream_headers(echo)}
    for name in ("x-drop-me", "keep-alive", "te", "trailer", "proxy-authorization",
                 "proxy-connection", "upgrade"):
        assert name not in names, (name, echo["headers"])
    # the proxy may say something about its own connection, never relay the client's
    for value in header_values(echo, "connection"):
        assert "x-drop-me" not in value.lower()
    assert header_values(echo, "x-keep") == ["yes"]
    assert echo["body_length"] == len(b"payload")


def test_forwarded_headers_replace_an_untrusted_chain(client: httpx.Client, gateway: GatewayServe) -> None:
    """X-Forwarded-For/-Proto/-Host name this client, replacing (not extending) what it claimed."""
    plain = client.get("/echo").json()
    spoofed = client.get("/echo", headers={"X-Forwarded-For": "6.6.6.6, 7.7.7.7",
                                            "X-Forwarded-Proto": "https",
                                            "X-Forwarded-Host": "evil.example"}).json()
    for echo in (plain, spoofed):
        assert header_values(echo, "x-forwarded-for") == ["127.0.0.1"]
        assert header_values(echo, "x-forwarded-proto") == ["http"]
        assert header_values(echo, "x-forwarded-host") == [f"127.0.0.1:{gateway.port}"]


@pytest.fixture(scope="module")
def prefixed_gateway(e2e_dir: Path, upstream: Upstream, redis_server: RedisProcess,
                     ) -> Iterator[GatewayServe]:
    """A gateway whose upstream URL carries the path /echo/base and which trusts 127.0.0.0/8."""
    config = serve_config(f"{upstream.url}/echo/base", redis_server.url, key_prefix(),
                          identity={"trusted_proxies": ["127.0.0.0/8"]})
    process = GatewayServe(e2e_dir, config)
    try:
        process.start()
        yield process
    finally:
        process.stop()


def test_upstream_path_prefix_is_prepended(prefixed_gateway: GatewayServe) -> None:
    """The upstream URL's path prefixes the raw request path; the query is kept."""
    with prefixed_gateway.client() as c:
        echo = c.get("/a%20b/c?x=1&y=%2F").json()
    assert echo["raw_path"] == "/echo/base/a%20b/c"
    assert echo["query_string"] == "x=1&y=%2F"


def test_forwarded_chain_extended_for_a_trusted_proxy(prefixed_gateway: GatewayServe) -> None:
    """From a peer in trusted_proxies the X-Forwarded-For chain is extended and its proto/host kept."""
    with prefixed_gateway.client() as c:
        echo = c.get("/", headers={"X-Forwarded-For": "203.0.113.7",
                                   "X-Forwarded-Proto": "https",
                                   "X-Forwarded-Host": "api.example"}).json()
    assert header_values(echo, "x-forwarded-for") == ["203.0.113.7, 127.0.0.1"]
    assert header_values(echo, "x-forwarded-proto") == ["https"]
    assert header_values(echo, "x-forwarded-host") == ["api.example"]


@pytest.mark.parametrize("given", [
    pytest.param("e2e-Abc.123_~:/+=@-", id="well-formed"),
    pytest.param("has space", id="space"),
    pytest.param("x" * 129, id="too-long"),
    pytest.param("", id="empty"),
    pytest.param(None, id="absent"),
])
def test_request_id_goes_upstream_and_is_echoed(client: httpx.Client, given: str | None) -> None:
    """A well-formed X-Request-Id reaches the upstream and is echoed; any other is replaced by a
    generated one that reaches the upstream and is echoed."""
    headers = {} if given is None else {"X-Request-Id": given}
    response = client.get("/echo", headers=headers)
    assert response.status_code == 200
    (upstream_id,) = header_values(response.json(), "x-request-id")
    assert response.headers.get_list("x-request-id") == [upstream_id]
    if given is not None and valid_request_id(given.encode()):
        assert upstream_id == given
    else:
        assert upstream_id != given
        assert valid_request_id(upstream_id.encode())


# ------------------------------------------------------------------------------------ response
def test_response_comes_back_without_hop_by_hop_headers(client: httpx.Client) -> None:
    """Status, body and end-to-end headers come back intact; hop-by-hop response headers do not."""
    response = client.get("/headers-out")
    assert response.status_code == 203
    assert response.content == b'{"hop":"by-hop"}'
    for name in HOP_BY_HOP_RESPONSE:
        assert name not in response.headers, (name, response.headers)
    assert response.headers["x-keep-me"] == "kept"
    assert response.headers.get_list("set-cookie") == ["a=1; Path=/", "b=2; Path=/"]
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["content-type"] == "application/json"
    # uvicorn's own server/date headers are off in the gateway: the upstream's pass through, once
    assert response.headers.get_list("server") == [SERVER_HEADER.decode()]
    assert response.headers.get_list("date") == [DATE_HEADER.decode()]
    # the client's connection survived the upstream's "Connection: close"
    assert client.get("/echo").status_code == 200


def test_every_response_is_dated_once(client: httpx.Client) -> None:
    """The upstream's Date passes through as it was; what has none gets the gateway's (RFC 9110
    §6.6.1): its own answers and a replay (its stored Date is recomputed)."""
    from email.utils import parsedate_to_datetime

    key = new_key()
    first = client.post("/charges", headers={"Idempotency-Key": key}, content=b"{}")
    replay = client.post("/charges", headers={"Idempotency-Key": key}, content=b"{}")
    problem = client.post("/charges", headers={"Idempotency-Key": "bad key with spaces"}, content=b"{}")
    ops = client.get("/_gateway/healthz")
    assert replay.headers["idempotent-replayed"] == "true"
    assert problem.status_code == 400
    assert first.headers.get_list("date") == [DATE_HEADER.decode()]  # the upstream's own
    for response in (replay, problem, ops):
        (date,) = response.headers.get_list("date")
        assert abs(time.time() - parsedate_to_datetime(date).timestamp()) < 60, date


def test_encoded_body_passes_as_is(client: httpx.Client) -> None:
    """A gzip-encoded response comes back byte for byte, still encoded, its Content-Encoding kept."""
    with client.stream("GET", "/gzip", headers={"Accept-Encoding": "gzip"}) as response:
        raw = b"".join(response.iter_raw())
    assert response.status_code == 200
    assert response.headers["content-encoding"] == "gzip"
    assert raw == GZIP_BODY


def test_redirects_are_not_followed(client: httpx.Client) -> None:
    """An upstream redirect reaches the client as the redirect, Location untouched."""
    response = client.get("/redirect")
    assert response.status_code == 302
    assert response.headers["location"] == "/echo"


def test_head_gets_headers_and_no_body(client: httpx.Client) -> None:
    """HEAD comes back with the upstream's status and Content-Length, no body, and the connection
    stays usable."""
    response = client.head("/headers-out")
    assert response.status_code == 203
    assert response.headers["content-length"] == str(len(b'{"hop":"by-hop"}'))
    assert response.content == b""
    assert client.get("/echo").status_code == 200


# ------------------------------------------------------------------------------------ streaming
def serving_pid(gateway: GatewayServe) -> int:
    """The process that serves: the gateway itself, or its only worker."""
    kids = children(gateway.pid)
    return kids[0] if len(kids) == 1 else gateway.pid


def test_upload_streams_through(client: httpx.Client, gateway: GatewayServe, upstream: Upstream) -> None:
    """A 16 MiB chunked upload reaches the upstream while the client is still sending, intact."""
    upload_id = uuid.uuid4().hex
    digest = hashlib.sha256()
    waited: dict[str, int] = {}

    def body() -> Iterator[bytes]:
        for i in range(STREAM_BYTES // CHUNK):
            piece = i.to_bytes(8, "big") + bytes(CHUNK - 8)
            digest.update(piece)
            yield piece
            if i == MIB // CHUNK - 1:  # first MiB out: hold the rest until the upstream has bytes
                with upstream.client() as direct:
                    def received() -> int:
                        got: int = direct.get("/progress", params={"id": upload_id}).json()["received"]
                        return got if got > 0 else 0
                    try:
                        waited["received"] = wait_for(received, "upstream progress", deadline_s=10.0)
                    except AssertionError:
                        waited["received"] = 0

    reset = gateway.reset_peak_rss()
    rss_before = gateway.rss_bytes()
    response = client.post("/upload", params={"id": upload_id}, content=body(), timeout=30.0)
    peak = gateway.peak_rss_bytes()
    assert waited["received"] > 0, "the upstream saw nothing of the body before it was all sent"
    assert waited["received"] <= MIB
    assert response.status_code == 200, response.text
    assert response.json() == {"bytes": STREAM_BYTES, "sha256": digest.hexdigest()}
    if reset and serving_pid(gateway) == gateway.pid:
        assert peak - rss_before < RSS_GROWTH_BOUND, (peak - rss_before) / MIB


def test_download_streams_through(client: httpx.Client, gateway: GatewayServe, upstream: Upstream) -> None:
    """The first bytes of a 16 MiB download reach the client before the upstream sends the rest."""
    download_id = uuid.uuid4().hex
    reset = gateway.reset_peak_rss()
    rss_before = gateway.rss_bytes()
    digest = hashlib.sha256()
    total = 0
    timeout = httpx.Timeout(10.0, read=5.0)
    with client.stream("GET", "/download", params={"mb": STREAM_MIB, "id": download_id},
                       timeout=timeout) as response:
        assert response.status_code == 200
        chunks = response.iter_raw()
        try:
            first = next(chunks)
        except httpx.ReadTimeout:
            pytest.fail("no byte came through before the upstream was released: the gateway buffers")
        assert 0 < len(first) <= CHUNK
        digest.update(first)
        total += len(first)
        with upstream.client() as direct:
            assert direct.get("/release", params={"id": download_id}).status_code == 200
        for piece in chunks:
            digest.update(piece)
            total += len(piece)
    peak = gateway.peak_rss_bytes()
    assert total == STREAM_BYTES
    assert digest.hexdigest() == download_sha256(STREAM_MIB)
    if reset and serving_pid(gateway) == gateway.pid:
        assert peak - rss_before < RSS_GROWTH_BOUND, (peak - rss_before) / MIB


def test_keyed_upload_over_the_cap_is_413(client: httpx.Client, upstream: Upstream) -> None:
    """A keyed request whose body is over max_body_bytes is refused 413 and never reaches the upstream."""
    rid = f"big-{uuid.uuid4().hex}"
    response = client.post("/upload", content=bytes(2 * MIB),
                           headers={"Idempotency-Key": new_key(), "X-Request-Id": rid})
    assert response.status_code == 413, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON)
    assert upstream.seen(rid) == 0


# ------------------------------------------------------------------------------------ failures
def test_cut_off_response_reaches_the_client_cut_off(client: httpx.Client) -> None:
    """When the upstream drops the connection mid-body, the client's response is cut off, not ended."""
    received: list[bytes] = []

    def read_all(response: httpx.Response) -> None:
        received.extend(response.iter_raw())

    with client.stream("GET", "/drop-mid-body") as response:
        assert response.status_code == 200
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            read_all(response)
    assert 0 < sum(map(len, received)) < 1_000_000
    assert client.get("/echo").status_code == 200  # the gateway serves on


def test_keyed_request_cut_off_mid_body_is_replayed_as_outcome_unknown(
    client: httpx.Client, upstream: Upstream
) -> None:
    """A keyed request whose response broke off mid-body is never run again: its retry gets a
    502 outcome-unknown replayed, not a truncated 200, and does not reach the upstream."""
    key = new_key()
    first_rid, retry_rid = f"cut-{uuid.uuid4().hex}", f"cut-retry-{uuid.uuid4().hex}"
    received: list[bytes] = []

    def read_all(response: httpx.Response) -> None:
        received.extend(response.iter_raw())

    with client.stream("POST", "/drop-mid-body", json={"n": 1},
                       headers={"Idempotency-Key": key, "X-Request-Id": first_rid}) as response:
        assert response.status_code == 200
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            read_all(response)
    retry = client.post("/drop-mid-body", json={"n": 1},
                        headers={"Idempotency-Key": key, "X-Request-Id": retry_rid})
    assert_problem(retry, 502, OUTCOME_UNKNOWN)
    assert retry.headers["idempotent-replayed"] == "true"
    assert upstream.seen(first_rid) == 1
    assert upstream.seen(retry_rid) == 0


def test_unreachable_upstream_is_502_and_a_keyed_retry_runs_once(
    e2e_dir: Path, redis_server: RedisProcess
) -> None:
    """Refused: 502 upstream-not-reached; the keyed request was not stored, so its retry runs once."""
    port = free_port()  # nobody listens here until the upstream starts on it below
    gateway = GatewayServe(e2e_dir, serve_config(f"http://127.0.0.1:{port}", redis_server.url,
                                                 key_prefix()))
    late = Upstream(e2e_dir, port=port)
    key = new_key()
    charge = {"amount": 42}
    try:
        gateway.start()
        with gateway.client() as c:
            plain = c.get("/echo")
            body = assert_problem(plain, 502, NOT_REACHED)
            assert "not" in body["detail"].lower()
            line = wait_for_log(gateway, "upstream.unreachable", plain.headers["x-request-id"])
            assert line["request_id"] == plain.headers["x-request-id"]

            first = c.post("/charges", json=charge, headers={"Idempotency-Key": key})
            assert_problem(first, 502, NOT_REACHED)
            assert "idempotent-replayed" not in first.headers

            late.start()
            retry = c.post("/charges", json=charge, headers={"Idempotency-Key": key})
            assert retry.status_code == 201, retry.text
            assert "idempotent-replayed" not in retry.headers
            again = c.post("/charges", json=charge, headers={"Idempotency-Key": key})
            assert again.status_code == 201
            assert again.headers["idempotent-replayed"] == "true"
            assert again.json() == retry.json()
        assert late.executions()["started"].get(key) == 1
        assert gateway.non_json_stderr_lines() == []
    finally:
        gateway.stop()
        late.stop()


@pytest.fixture(scope="module")
def short_gateway(e2e_dir: Path, upstream: Upstream, redis_server: RedisProcess,
                  ) -> Iterator[GatewayServe]:
    """A gateway whose upstream.timeout is 500ms."""
    process = GatewayServe(e2e_dir, serve_config(upstream.url, redis_server.url, key_prefix(),
                                                 timeout="500ms"))
    try:
        process.start()
        yield process
    finally:
        process.stop()


def test_slow_upstream_is_504(short_gateway: GatewayServe) -> None:
    """No response within upstream.timeout: 504 outcome-unknown, in about that time, logged."""
    with short_gateway.client() as c:
        started = time.monotonic()
        response = c.get("/slow", params={"s": 3})
        elapsed = time.monotonic() - started
    assert_problem(response, 504, OUTCOME_UNKNOWN)
    assert 0.4 < elapsed < 2.0, elapsed
    wait_for_log(short_gateway, "upstream.timeout", response.headers["x-request-id"])


def test_slow_keyed_request_is_504_replayed_and_runs_once(short_gateway: GatewayServe,
                                                          upstream: Upstream) -> None:
    """A keyed request that timed out is answered 504, replayed as 504 on retry, and ran once."""
    key = new_key()
    with short_gateway.client() as c:
        first = c.post("/charges", params={"delay": 2}, json={"n": 1}, headers={"Idempotency-Key": key})
        assert_problem(first, 504, OUTCOME_UNKNOWN)
        assert "idempotent-replayed" not in first.headers
        retry = c.post("/charges", params={"delay": 2}, json={"n": 1}, headers={"Idempotency-Key": key})
        assert_problem(retry, 504, OUTCOME_UNKNOWN)
        assert retry.headers["idempotent-replayed"] == "true"
        wait_for(lambda: upstream.executions()["finished"].get(key) == 1,
                 "the slow charge to finish upstream", deadline_s=10.0)
        late = c.post("/charges", params={"delay": 2}, json={"n": 1}, headers={"Idempotency-Key": key})
        assert_problem(late, 504, OUTCOME_UNKNOWN)
        assert late.headers["idempotent-replayed"] == "true"
    assert upstream.executions()["started"].get(key) == 1


def test_slow_steady_upload_is_not_a_timeout(short_gateway: GatewayServe) -> None:
    """An upload that takes longer than upstream.timeout, but never pauses that long, is not a 504."""
    def body() -> Iterator[bytes]:
        for _ in range(8):
            yield b"x" * 1024
            time.sleep(0.2)  # the client's pacing, not a wait for anything: 1.6 s > 500 ms in all

    with short_gateway.client() as c:
        response = c.post("/upload", params={"id": uuid.uuid4().hex}, content=body())
    assert response.status_code == 200, response.text
    assert response.json()["bytes"] == 8 * 1024


def test_dropped_before_response_is_502_outcome_unknown(e2e_dir: Path, redis_server: RedisProcess) -> None:
    """The upstream took the request and closed without answering: 502 outcome-unknown, a keyed
    one is replayed on retry, and the upstream saw each request exactly once."""
    key = new_key()
    with Dropper() as dropper:
        gateway = GatewayServe(e2e_dir, serve_config(dropper.url, redis_server.url, key_prefix()))
        try:
            gateway.start()
            with gateway.client() as c:
                rid = f"drop-{uuid.uuid4().hex}"
                plain = c.get("/anything", headers={"X-Request-Id": rid})
                assert_problem(plain, 502, OUTCOME_UNKNOWN)
                wait_for_log(gateway, "upstream.broken", rid)

                first = c.post("/charges", json={"n": 1}, headers={"Idempotency-Key": key})
                assert_problem(first, 502, OUTCOME_UNKNOWN)
                retry = c.post("/charges", json={"n": 1}, headers={"Idempotency-Key": key})
                assert_problem(retry, 502, OUTCOME_UNKNOWN)
                assert retry.headers["idempotent-replayed"] == "true"
        finally:
            gateway.stop()
        heads = dropper.heads()
    assert sum(rid.encode() in head for head in heads) == 1, heads
    assert sum(key.encode() in head for head in heads) == 1, heads


# ------------------------------------------------------------------------------------ rate limits
RATELIMIT_RE = re.compile(r'^"shared";r=(\d+);t=(\d+)$')


def test_two_gateways_share_one_limit(e2e_dir: Path, upstream: Upstream,
                                      redis_server: RedisProcess) -> None:
    """Two serve processes on one Redis share one bucket: 10 pass between them, the 11th is 429."""
    config = serve_config(upstream.url, redis_server.url, key_prefix(), rate_limit=[
        {"name": "shared", "limit": 10, "burst": 10, "period": "1h", "paths": ["/echo"]}])
    first, second = GatewayServe(e2e_dir, config), GatewayServe(e2e_dir, config)
    try:
        start_all(first, second)
        with first.client() as a, second.client() as b:
            passed = [(a, b)[i % 2].get("/echo") for i in range(10)]
            denied_rid = f"denied-{uuid.uuid4().hex}"
            denied = a.get("/echo", headers={"X-Request-Id": denied_rid})
            denied_too = b.get("/echo")
            unlimited = b.get("/headers-out")  # no policy matches: not limited
    finally:
        first.stop()
        second.stop()
    remaining = []
    for response in passed:
        assert response.status_code == 200, response.text
        assert response.headers["ratelimit-policy"] == '"shared";q=10;w=3600'
        match = RATELIMIT_RE.match(response.headers["ratelimit"])
        assert match, response.headers["ratelimit"]
        remaining.append(int(match.group(1)))
    assert remaining == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    for response in (denied, denied_too):
        body = assert_problem(response, 429, None)
        assert body["violated-policies"] == ["shared"]
        assert response.headers["ratelimit-policy"] == '"shared";q=10;w=3600'
        match = RATELIMIT_RE.match(response.headers["ratelimit"])
        assert match, response.headers["ratelimit"]
        assert match.group(1) == "0"
        assert int(response.headers["retry-after"]) >= max(1, int(match.group(2)))
    assert upstream.seen(denied_rid) == 0
    assert unlimited.status_code == 203
    assert "ratelimit" not in unlimited.headers


# ------------------------------------------------------------------------------------ metrics
def test_metrics_count_what_the_test_did(e2e_dir: Path, upstream: Upstream,
                                         redis_server: RedisProcess) -> None:
    """After 4 allowed, 3 denied, one keyed charge and its replay, the counters say exactly that."""
    allowed, denied = 4, 3
    config = serve_config(upstream.url, redis_server.url, key_prefix(), rate_limit=[
        {"name": "metered", "limit": allowed, "period": "1h", "paths": ["/echo"]}])
    gateway = GatewayServe(e2e_dir, config)
    key = new_key()
    try:
        gateway.start()
        with gateway.client() as c:
            codes = [c.get("/echo").status_code for _ in range(allowed + denied)]
            charged = c.post("/charges", json={"n": 1}, headers={"Idempotency-Key": key})
            replay = c.post("/charges", json={"n": 1}, headers={"Idempotency-Key": key})
            for _ in range(3):  # operations endpoints are not counted
                c.get("/_gateway/healthz")
            m = gateway.metrics()
    finally:
        gateway.stop()
    assert codes == [200] * allowed + [429] * denied
    assert charged.status_code == 201
    assert replay.headers["idempotent-replayed"] == "true"

    assert m.value("gateway_requests_total", code="200") == allowed
    assert m.value("gateway_requests_total", code="429") == denied
    assert m.value("gateway_requests_total", code="201") == 2
    assert m.value("gateway_requests_total") == allowed + denied + 2
    assert m.value("gateway_ratelimit_decisions_total", policy="metered", decision="allow") == allowed
    assert m.value("gateway_ratelimit_decisions_total", policy="metered", decision="deny") == denied
    assert m.value("gateway_ratelimit_decisions_total", decision="error") == 0
    assert m.value("gateway_idempotency_outcomes_total", outcome="executed") == 1
    assert m.value("gateway_idempotency_outcomes_total", outcome="replayed") == 1
    assert m.value("gateway_idempotency_outcomes_total") == 2
    # the upstream was asked for the allowed echoes and the one charge, nothing else
    assert m.value("gateway_upstream_latency_seconds_count") == allowed + 1
    assert m.value("gateway_added_latency_seconds_count") == allowed + denied + 2
    assert m.value("gateway_upstream_errors_total") == 0
    # one call per allowed request and for the first denial; the later denials are answered
    # from the local deny cache without a store call
    assert m.value("gateway_store_latency_seconds_count", operation="ratelimit_take") == allowed + 1
    assert m.value("gateway_store_latency_seconds_count", operation="idempotency_claim") == 2
    assert m.value("gateway_store_latency_seconds_count", operation="idempotency_complete") == 1


def test_upstream_errors_are_counted_by_kind(short_gateway: GatewayServe) -> None:
    """A timeout is counted in gateway_upstream_errors_total{kind="timeout"}."""
    before = short_gateway.metrics().value("gateway_upstream_errors_total", kind="timeout")
    with short_gateway.client() as c:
        assert c.get("/slow", params={"s": 2}).status_code == 504
    after = short_gateway.metrics().value("gateway_upstream_errors_total", kind="timeout")
    assert after == before + 1


def test_two_workers_report_every_request(e2e_dir: Path, upstream: Upstream,
                                          redis_server: RedisProcess) -> None:
    """With --workers 2, whichever worker answers the scrape reports the requests of both."""
    requests = 30
    tmp = e2e_dir / f"tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    gateway = GatewayServe(e2e_dir, serve_config(upstream.url, redis_server.url, key_prefix()),
                           workers=2, env={"TMPDIR": str(tmp)})
    try:
        gateway.start()
        # no PROMETHEUS_MULTIPROC_DIR given: serve made one of its own, in TMPDIR
        (metrics_dir,) = wait_for(lambda: list(tmp.glob("gateway-metrics-*")), "a multiprocess dir")
        line = wait_for(lambda: "gateway serve on" in gateway.stdout(), "the startup line")
        assert line
        assert "2 worker" in gateway.stdout()
        wait_for(lambda: len(children(gateway.pid)) >= 2, "two worker processes")
        for _ in range(requests):  # a new connection each: either worker may take it
            with gateway.client() as c:
                assert c.get("/echo").status_code == 200

        def total() -> float:
            return gateway.metrics().value("gateway_requests_total")

        wait_for(lambda: total() == requests, f"gateway_requests_total == {requests}", deadline_s=5.0)
        scrapes = []
        for _ in range(6):
            with gateway.client() as c:  # new connections: the scrapes land on either worker
                scrapes.append(Metrics.parse(c.get("/_gateway/metrics").text)
                               .value("gateway_requests_total", code="200"))
        assert scrapes == [requests] * 6
        writers = {path.stem.rsplit("_", 1)[-1] for path in metrics_dir.glob("counter_*.db")}
        assert 1 <= len(writers) <= 2
    finally:
        code = gateway.stop()
    assert code == 0, gateway.stderr()[-3000:]
    assert not metrics_dir.exists(), "serve left its multiprocess metrics dir behind"


# ------------------------------------------------------------------------------------ shutdown
def test_sigterm_drains_in_flight_and_settles_the_claim(e2e_dir: Path, upstream: Upstream,
                                                        redis_server: RedisProcess) -> None:
    """On SIGTERM an in-flight keyed request still gets its 201, the gateway exits 0, and a new
    gateway on the same Redis replays that key without running it again."""
    config = serve_config(upstream.url, redis_server.url, key_prefix())
    first = GatewayServe(e2e_dir, config)
    key = new_key()
    charge = {"amount": 7}

    def charge_once(gateway: GatewayServe) -> httpx.Response:
        with gateway.client(timeout_s=20.0) as c:
            return c.post("/charges", params={"delay": 2}, json=charge, headers={"Idempotency-Key": key})

    try:
        first.start()
        with ThreadPoolExecutor(max_workers=1) as pool:
            in_flight = pool.submit(charge_once, first)
            wait_for(lambda: upstream.executions()["started"].get(key) == 1,
                     "the charge to reach the upstream", deadline_s=10.0)
            assert not in_flight.done()
            first.signal()
            response = in_flight.result(timeout=20.0)
        assert response.status_code == 201, response.text
        code = first.wait_exit(timeout_s=15.0)
    finally:
        first.stop()
    assert code == 0, first.stderr()[-3000:]
    assert "Traceback" not in first.stderr()

    second = GatewayServe(e2e_dir, config)
    try:
        second.start()
        replay = charge_once(second)
    finally:
        second.stop()
    assert replay.status_code == 201, replay.text
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.json() == response.json()
    assert upstream.executions()["started"].get(key) == 1


def test_sigterm_refuses_new_connections_while_draining(e2e_dir: Path, upstream: Upstream,
                                                        redis_server: RedisProcess) -> None:
    """After SIGTERM, while a request drains, the gateway takes no new connection."""
    gateway = GatewayServe(e2e_dir, serve_config(upstream.url, redis_server.url, key_prefix()))
    try:
        gateway.start()
        rid = f"drain-{uuid.uuid4().hex}"
        with ThreadPoolExecutor(max_workers=1) as pool:
            def slow() -> int:
                with gateway.client(timeout_s=20.0) as c:
                    return c.get("/slow", params={"s": 2}, headers={"X-Request-Id": rid}).status_code
            in_flight = pool.submit(slow)
            wait_for(lambda: upstream.seen(rid) == 1, "the request to reach the upstream")
            gateway.signal()

            def refused() -> bool:
                try:
                    with socket.create_connection(("127.0.0.1", gateway.port), timeout=0.5):
                        return False
                except OSError:
                    return True
            wait_for(refused, "the listening socket to close", deadline_s=5.0)
            assert not in_flight.done()
            assert in_flight.result(timeout=20.0) == 200
        assert gateway.wait_exit(timeout_s=15.0) == 0
    finally:
        gateway.stop()


def test_readyz_follows_the_store(e2e_dir: Path, upstream: Upstream,
                                  dedicated_redis: RedisProcess) -> None:
    """readyz is 200 with the store up, 503 store-unavailable while it is down, 200 once it is back;
    healthz stays 200 throughout."""
    gateway = GatewayServe(e2e_dir, serve_config(upstream.url, dedicated_redis.url, key_prefix()))
    try:
        gateway.start()
        with gateway.client() as c:
            assert c.get("/_gateway/readyz").status_code == 200
            dedicated_redis.stop()
            down = wait_for(lambda: (r := c.get("/_gateway/readyz")).status_code == 503 and r,
                            "readyz to say 503")
            assert_problem(down, 503, "urn:gateway:problem:store-unavailable")
            assert c.get("/_gateway/healthz").status_code == 200
            dedicated_redis.start()
            wait_for(lambda: c.get("/_gateway/readyz").status_code == 200, "readyz to recover",
                     deadline_s=15.0, interval_s=0.2)
    finally:
        gateway.stop()


# ------------------------------------------------------------------------------------ exit 2
def test_bad_config_exits_2_naming_the_keys(tmp_path: Path) -> None:
    """serve with a bad config exits 2 with one line per problem, each naming its key, no traceback."""
    path = tmp_path / "bad.toml"
    path.write_text('[upstream]\nurl = "ftp://nope"\n\n[store]\nurl = "memory://"\nnope = 1\n')
    result = run_serve("--config", str(path), "--port", str(free_port()))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 2, lines
    assert {line.split(": ", 1)[0] for line in lines} == {"upstream.url", "store.nope"}
    assert "Traceback" not in result.stderr
    assert "gateway serve on" not in result.stdout


def test_missing_config_exits_2(tmp_path: Path) -> None:
    """serve with a config file that does not exist exits 2 with one line naming it."""
    path = tmp_path / "nope.toml"
    result = run_serve("--config", str(path), "--port", str(free_port()))
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert str(path) in line


def test_busy_port_exits_2(tmp_path: Path) -> None:
    """serve on a port that is already bound exits 2 with one line naming the port, no traceback."""
    path = tmp_path / "ok.toml"
    path.write_text('[upstream]\nurl = "http://127.0.0.1:9"\n\n[store]\nurl = "memory://"\n')
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        result = run_serve("--config", str(path), "--host", "127.0.0.1", "--port", str(port))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert str(port) in lines[0]
    assert "Traceback" not in result.stderr


def test_logs_are_json_lines(gateway: GatewayServe) -> None:
    """Everything the long-running gateway wrote to stderr so far is one JSON object per line."""
    assert gateway.non_json_stderr_lines() == []
    assert all(isinstance(json.loads(line), dict) for line in gateway.stderr().splitlines() if line)


def test_concurrent_keyed_requests_run_once(gateway: GatewayServe, upstream: Upstream) -> None:
    """Two concurrent keyed requests through the proxy: one runs (201), the other is refused 409."""
    key = new_key()
    barrier = threading.Barrier(2)

    def post() -> httpx.Response:
        with gateway.client(timeout_s=20.0) as c:
            barrier.wait(timeout=10)
            return c.post("/charges", params={"delay": 1}, json={"n": 1}, headers={"Idempotency-Key": key})

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = sorted(r.status_code for r in pool.map(lambda _: post(), range(2)))
    assert results == [201, 409]
    assert upstream.executions()["started"].get(key) == 1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_idle_gateway_stops_cleanly(e2e_dir: Path, upstream: Upstream, redis_server: RedisProcess,
                                    sig: signal.Signals) -> None:
    """SIGTERM or SIGINT stops an idle gateway with exit status 0 and no traceback."""
    gateway = GatewayServe(e2e_dir, serve_config(upstream.url, redis_server.url, key_prefix()))
    try:
        gateway.start()
        gateway.signal(sig)
        code = gateway.wait_exit(timeout_s=15.0)
    finally:
        gateway.stop()
    assert code == 0, gateway.stderr()[-3000:]
    assert "Traceback" not in gateway.stderr()
