"""A bounded fuzz of ``gateway serve`` with hostile requests: what the upstream gets is what was decided.

Hypothesis builds requests from the pieces the hostile-input report used (dot segments, encoded
dots and slashes, ``;params``, case, duplicate and trailer fields, odd versions, ``Expect``,
broken framing) and writes each on its own connection to a real ``gateway serve`` in front of
``tests/hostile.py``'s recording upstream. For every request it checks:

* the gateway never answers 5xx itself (the upstream only ever answers 200) and always answers;
* a forwarded request carries no trailer field, exactly the head's line of each header a
  decision reads (``X-Api-Key``, ``Idempotency-Key``), the head's ``Host`` as
  ``X-Forwarded-Host``, and the head's ``X-Forwarded-For`` chain extended by the peer;
* its path is in normal form, and if an upstream that folds case, drops ``;params`` and resolves
  dot segments would route it under ``/pay``, the gateway required (and saw) one key line;
* and, at the end, no traceback in the gateway's log.

``HOSTILE_FUZZ_EXAMPLES`` sets the number of requests (3000 by default: ~20 s here).
"""

from __future__ import annotations

import itertools
import os
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.hostile import RecordingUpstream, exchange
from tests.serve_process import GatewayServe, serve_config

EXAMPLES = int(os.environ.get("HOSTILE_FUZZ_EXAMPLES", "3000"))
TRAILER_MARK = b"trl"  # every trailer value carries it; no forwarded header value may
_ids = itertools.count(1)

# weighted towards pieces that pass: most requests should reach the upstream to be checked there
_SEGMENTS = ["pay", "pay", "pay", "PAY", "Pay", "echo", "echo", "x", "x", "..", "..", ".", "", "%2e%2e",
             "%2E%2e", "%2e", ";x", "pay;p=1", "..;", "%70ay", "a%3Ab", "~u", "%7E", "%41",
             "%2f", "%5C", "%zz", "%", "\\", "%00"]
_HEADERS: dict[bytes, list[bytes]] = {
    b"Host": [b"gw", b"gw", b"gw", b"GW:8080", b"[::1]", b"", b"a b", b"x/y"],
    b"X-Api-Key": [b"k1", b"k2", b"", b" k3 ", b"k\tk"],
    b"Idempotency-Key": [b"key-1", b"key-2", b'"key-1"', b'"a\\"b"', b"", b"bad key", b'"open'],
    b"X-Forwarded-For": [b"10.0.0.1", b"10.0.0.2, 10.0.0.3", b"garbage", b"127.0.0.1"],
    b"Expect": [b"100-continue", b"200-ok", b"100-CONTINUE"],
    b"Content-Type": [b"application/json"],
    b"X-Other": [b"1"],
}
_CASES = {b"X-Api-Key": [b"X-Api-Key", b"x-api-key", b"X-API-KEY"],
          b"Idempotency-Key": [b"Idempotency-Key", b"idempotency-key"], b"Host": [b"Host", b"host"]}
_TRAILERS = [b"Idempotency-Key", b"X-Api-Key", b"X-Forwarded-For", b"Host", b"X-Trailer"]


@dataclass
class Request:
    method: bytes
    target: bytes
    version: bytes
    head: list[tuple[bytes, bytes]]  # as sent (name spelling kept)
    framing: str
    body: bytes
    trailers: list[tuple[bytes, bytes]]

    def lines(self, name: bytes) -> list[bytes]:
        return [v.strip(b" \t") for n, v in self.head if n.lower() == name]

    def wire(self, fuzz_id: bytes) -> bytes:
        line = self.method + b" " + self.target + (b" " + self.version if self.version else b"")
        head = [line, b"X-Fuzz-Id: " + fuzz_id, *(n + b": " + v for n, v in self.head)]
        if self.framing == "length":
            head.append(b"Content-Length: %d" % len(self.body))
            return b"\r\n".join(head) + b"\r\n\r\n" + self.body
        if self.framing in ("chunked", "length+chunked", "bad-chunk"):
            if self.framing == "length+chunked":
                head.append(b"Content-Length: %d" % len(self.body))
            head.append(b"Transfer-Encoding: chunked")
            size = b"zz" if self.framing == "bad-chunk" else b"%x" % len(self.body)
            chunks = (size + b"\r\n" + self.body + b"\r\n") if self.body else b""
            trailer = b"".join(n + b": " + v + b"\r\n" for n, v in self.trailers)
            return b"\r\n".join(head) + b"\r\n\r\n" + chunks + b"0\r\n" + trailer + b"\r\n"
        return b"\r\n".join(head) + b"\r\n\r\n"


@st.composite
def requests(draw: st.DrawFn) -> Request:
    segments = draw(st.lists(st.sampled_from(_SEGMENTS), min_size=1, max_size=5))
    target = ("/" + "/".join(segments)).encode() + draw(st.sampled_from([b"", b"?a=1", b"?a=%2e"]))
    head: list[tuple[bytes, bytes]] = []
    for name, values in _HEADERS.items():
        # hypothesis leans towards the first option: it is the usual one
        count = draw(st.sampled_from([1] * 16 + [0, 0, 0, 2]) if name != b"Expect"
                     else st.sampled_from([0] * 9 + [1]))
        for _ in range(count):
            head.append((draw(st.sampled_from(_CASES.get(name, [name]))), draw(st.sampled_from(values))))
    head = draw(st.permutations(head))
    trailers = [(n, TRAILER_MARK + b"-" + draw(st.sampled_from([b"1", b"10.9.9.9", b"key-9"])))
                for n in draw(st.lists(st.sampled_from(_TRAILERS), max_size=3))]
    return Request(
        method=draw(st.sampled_from([b"GET", b"POST", b"POST", b"PATCH"])),
        target=target,
        version=draw(st.sampled_from([b"HTTP/1.1"] * 7 + [b"HTTP/1.0", b"HTTP/1.0", b""])),
        head=head,
        framing=draw(st.sampled_from(["none", "none", "length", "length", "chunked", "chunked", "chunked",
                                      "length+chunked", "bad-chunk"])),
        body=draw(st.sampled_from([b"", b"{}", b"hello"])),
        trailers=trailers,
    )


@pytest.fixture(scope="module")
def gateway(recording_upstream: RecordingUpstream,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServe]:
    config = serve_config(
        recording_upstream.url, "memory://", "fuzz",
        identity={"sources": ["header:x-api-key", "ip"], "trusted_proxies": ["127.0.0.1/32"]},
        idempotency={"required_paths": ["/pay"]},
        rate_limit=[{"name": "generous", "limit": 1_000_000, "period": "1m"}],
        server={"header_timeout": "2s"},
    )
    gw = GatewayServe(tmp_path_factory.mktemp("fuzz"), config).start()
    yield gw
    gw.stop()
    assert "Traceback" not in gw.stderr(), gw.stderr()[-3000:]
    assert not [e for e in gw.logs() if e.get("level") in ("ERROR", "CRITICAL", "error", "critical")]


def upstream_view(path: bytes) -> str:
    """Where a lenient upstream would route ``path``: decoded, case folded, params cut, dots resolved."""
    text = unquote(path.decode("latin-1")).lower().replace("\\", "/")
    text = "/".join(segment.partition(";")[0] for segment in text.split("/"))
    text = re.sub("/+", "/", text)
    return posixpath.normpath(text) if text else "/"


def _is_normal(path: bytes) -> bool:
    segments = path.split(b"/")[1:]
    return (b"//" not in path and b"." not in segments and b".." not in segments
            and not re.search(rb"%(2[dDeE]|5[fF]|7[eE]|[46][1-9a-fA-F]|[57][0-9aA]|3[0-9])", path))


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(request=requests())
def test_the_upstream_receives_only_what_the_gateway_decided_on(
        gateway: GatewayServe, recording_upstream: RecordingUpstream, request: Request) -> None:
    fuzz_id = b"f%d" % next(_ids)
    answer = exchange(gateway.port, request.wire(fuzz_id), timeout_s=5.0)
    assert answer.status is not None, f"no answer to {request.wire(fuzz_id)!r}"
    assert answer.status < 500, (answer, request.wire(fuzz_id))
    forwarded = [r for r in recording_upstream.received() if r.values(b"x-fuzz-id") == [fuzz_id]]
    if answer.status == 200 and answer.body == b"ok" and answer.header(b"idempotent-replayed") is None:
        assert len(forwarded) == 1, "an upstream answer without one forwarded request"
    assert len(forwarded) <= 1
    if not forwarded:
        return
    [got] = forwarded
    wire = request.wire(fuzz_id)
    assert not [v for _, v in got.headers if TRAILER_MARK in v], (got.headers, wire)
    for name in (b"x-api-key", b"idempotency-key"):
        sent = request.lines(name)
        assert len(sent) <= 1, f"forwarded with {len(sent)} {name!r} lines: {wire!r}"
        assert got.values(name) == sent, (name, got.headers, wire)
    hosts = request.lines(b"host")
    assert len(hosts) <= 1, wire
    assert got.values(b"x-forwarded-host") == [h for h in hosts if h], (got.headers, wire)
    chain = [b", ".join(request.lines(b"x-forwarded-for"))] if request.lines(b"x-forwarded-for") else []
    assert got.values(b"x-forwarded-for") == [b", ".join([*chain, b"127.0.0.1"])], (got.headers, wire)
    assert _is_normal(got.path), (got.path, wire)
    view = upstream_view(got.path)
    if request.method in (b"POST", b"PATCH") and (view == "/pay" or view.startswith("/pay/")):
        assert len(request.lines(b"idempotency-key")) == 1, f"{wire!r} reached {view} without a key"
