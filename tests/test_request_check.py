"""The request view every layer decides on: normal paths, matcher forms, ambiguous requests refused.

In-process (``GatewayMiddleware`` over httpx's ASGI transport) and at the function level; the
same cases against a real ``gateway serve`` with raw bytes are in ``test_hostile_input.py``.
"""

from __future__ import annotations

import posixpath
import re
from typing import Any
from urllib.parse import unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import GatewayMiddleware
from gateway._asgi import ASGIApp
from gateway._paths import PathPrefixes, match_form, normal_target
from gateway.config import load_config
from gateway.errors import ConfigError
from gateway.ratelimit import RateLimitMiddleware
from tests.asgi_helpers import PROBLEM, CountingApp, assert_problem, call_asgi, client_for


async def raw_call(app: ASGIApp, method: str, raw_path: bytes,
                   headers: list[tuple[bytes, bytes]] | None = None, *, version: str = "1.1") -> int:
    """One request with this exact target (httpx would resolve dot segments itself); its status."""
    scope = {"type": "http", "http_version": version, "method": method, "raw_path": raw_path,
             "path": unquote(raw_path.decode()), "query_string": b"", "client": ("127.0.0.1", 1),
             "headers": [(b"host", b"gw")] if headers is None else headers, "server": ("gw", 80),
             "scheme": "http", "root_path": ""}
    sent = await call_asgi(app, scope)
    status: int = sent[0]["status"]
    return status


# ------------------------------------------------------------------------------ normal_target
@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        (b"/pay", b"/pay"),
        (b"/x/../pay", b"/pay"),
        (b"/x/%2e%2e/pay", b"/pay"),
        (b"/x/%2E%2e/pay", b"/pay"),
        (b"//pay", b"/pay"),
        (b"/a//b///c", b"/a/b/c"),
        (b"/a/./b/../c", b"/a/c"),
        (b"/a/.", b"/a/"),
        (b"/a/..", b"/"),
        (b"/../../etc", b"/etc"),
        (b"/%7Euser/%41", b"/~user/A"),
        (b"/a%3ab", b"/a%3ab"),  # a reserved character stays encoded, as sent
        (b"/a%2Fb", b"/a%2Fb"),  # an encoded slash too: one segment upstream
        (b"/a/%2e%2e%2Fb", b"/a/..%2Fb"),  # no dot segment; matched as /b (the decoded path)
        (b"/pay;x", b"/pay;x"),  # params and case are kept: only the matchers fold them
        (b"/PAY", b"/PAY"),
        (b"/.well-known/x", b"/.well-known/x"),
        (b"*", b"*"),
    ],
)
def test_normal_target(raw: bytes, normal: bytes) -> None:
    assert normal_target(raw) == normal


def test_a_normal_target_is_the_same_object() -> None:
    """The middleware rewrites the scope only when the path changed."""
    for raw in (b"/pay", b"/a%3Ab", b"/.well-known/x"):
        assert normal_target(raw) is raw


@pytest.mark.parametrize("raw",
                         [b"/a%5cb", b"/a%5Cb", b"/a\\b", b"/%zz", b"/%4", b"/%00", b"pay",
                          b"@x/y"])
def test_a_target_with_no_one_meaning_is_refused(raw: bytes) -> None:
    assert normal_target(raw) is None


_PIECES = st.sampled_from(["a", "B", ".", "..", "", "%2e", "%2E%2E", "%41", "%7e", "x;y", "%3A", "~"])


@given(st.lists(_PIECES, max_size=8))
def test_normal_form_is_normal_and_stable(pieces: list[str]) -> None:
    raw = ("/" + "/".join(pieces)).encode()
    normal = normal_target(raw)
    assert normal is not None
    assert normal_target(normal) == normal
    segments = normal.split(b"/")[1:]
    assert b"." not in segments
    assert b".." not in segments
    assert b"//" not in normal
    assert not re.search(rb"%(2[eE]|4[1-9a-fA-F]|7[eE])", normal)
    # the same place a resolver of dot segments and merger of slashes would reach
    expected = posixpath.normpath(re.sub("/+", "/", raw.decode().replace("%2e", ".").replace("%2E", ".")
                                         .replace("%41", "A").replace("%7e", "~")))
    assert (normal.decode().rstrip("/") or "/") == (expected.rstrip("/") or "/")


# ---------------------------------------------------------------------------------- matchers
@pytest.mark.parametrize(
    ("path", "form"),
    [("/pay", "/pay"), ("/PAY", "/pay"), ("/pay;x", "/pay"), ("/x/..;/pay", "/pay"), ("//pay/", "/pay/"),
     ("/a/./b", "/a/b"), ("/V1/Charges;v=2/ch_1", "/v1/charges/ch_1")],
)
def test_match_form(path: str, form: str) -> None:
    assert match_form(path) == form


def test_prefixes_match_every_spelling_an_upstream_may_route_to_them() -> None:
    prefixes = PathPrefixes(["/pay", "/V1/Charges"])
    for path in ("/pay", "/PAY", "/pay;x", "/x/../pay", "/x/..;/pay", "//pay", "/pay/1", "/v1/charges/ch_1",
                 "/V1/CHARGES"):
        assert prefixes.matches(path), path
    for path in ("/payx", "/pay/../x", "/v1/chargesx", "/"):
        assert not prefixes.matches(path), path


async def test_a_lone_rate_limit_middleware_matches_the_same_way() -> None:
    """Without the stack (no path rewriting), the policy's paths still catch /LIMITED and //limited."""
    app = CountingApp()
    config = load_config({"rate_limit": [{"name": "p", "limit": 1, "period": "1h", "paths": ["/limited"]}]})
    mw = RateLimitMiddleware(app, rate_limit=config.rate_limits)
    assert await raw_call(mw, "GET", b"/limited") == 200
    for path in (b"/LIMITED", b"//limited", b"/limited;v=1", b"/x/../limited", b"/x/%2e%2e/limited"):
        assert await raw_call(mw, "GET", path) == 429, path
    assert app.calls == 1


# ------------------------------------------------------------------------- the stack in-process
def _gateway(app: CountingApp, **sections: Any) -> GatewayMiddleware:
    config = {"identity": {"sources": ["header:x-api-key", "ip"]},
              "idempotency": {"required_paths": ["/pay"]}, **sections}
    return GatewayMiddleware(app, config)


async def test_the_app_sees_the_normal_path() -> None:
    app = CountingApp()
    assert await raw_call(_gateway(app), "GET", b"/x/%2e%2e/echo//a%3A") == 200
    [scope] = [s for s in app.scopes if s["type"] == "http"]
    assert (scope["path"], scope["raw_path"]) == ("/echo/a:", b"/echo/a%3A")


@pytest.mark.parametrize("path", [b"/x/../pay", b"/x/%2e%2e/pay", b"//pay", b"/pay;x", b"/PAY"])
async def test_a_required_path_in_another_spelling_needs_a_key_in_process(path: bytes) -> None:
    app = CountingApp()
    assert await raw_call(_gateway(app), "POST", path) == 400
    assert app.calls == 0


async def test_reject_mode_names_the_normal_form() -> None:
    app = CountingApp()
    gw = _gateway(app, request={"path_normalization": "reject"})
    assert await raw_call(gw, "GET", b"/x/../echo") == 400
    assert await raw_call(gw, "GET", b"/echo") == 200
    assert app.calls == 1


@pytest.mark.parametrize(
    ("headers", "status", "type_"),
    [
        ([("X-Api-Key", "a"), ("X-Api-Key", "b")], 400, "ambiguous-request"),
        ([("Idempotency-Key", "a"), ("Idempotency-Key", "b")], 400, "ambiguous-request"),
        ([("X-Tenant", "a"), ("X-Tenant", "b")], 400, "ambiguous-request"),  # a policy's header:NAME key
        ([("Expect", "200-ok")], 417, "expectation-failed"),
        ([("Host", "a b")], 400, "ambiguous-request"),
    ],
    ids=["identity-source", "idempotency-key", "policy-key", "expect", "bad-host"],
)
async def test_ambiguous_requests_are_refused_in_process(headers: list[tuple[str, str]], status: int,
                                                         type_: str) -> None:
    app = CountingApp()
    gw = _gateway(app, rate_limit=[{"name": "t", "key": "header:X-Tenant", "limit": 100, "period": "1m"}])
    async with client_for(gw) as c:
        r = await c.post("/echo", content=b"{}", headers=headers)
    assert_problem(r, status, PROBLEM + type_)
    assert app.calls == 0
    reason = "expect" if status == 417 else ("host" if headers[0][0] == "Host" else "duplicate_header")
    assert gw.metrics.registry.get_sample_value("gateway_requests_refused_total", {"reason": reason}) == 1


async def test_a_header_the_gateway_does_not_read_may_repeat() -> None:
    app = CountingApp()
    async with client_for(_gateway(app)) as c:
        r = await c.get("/echo", headers=[("Accept", "a"), ("Accept", "b"), ("X-Forwarded-For", "1.2.3.4"),
                                          ("X-Forwarded-For", "5.6.7.8")])
    assert r.status_code == 200


async def test_http_1_1_without_host_and_http_0_9_are_refused() -> None:
    app = CountingApp()
    gw = _gateway(app)
    assert await raw_call(gw, "GET", b"/echo", [], version="1.1") == 400
    assert await raw_call(gw, "GET", b"/echo", [(b"host", b"gw")], version="0.9") == 400
    assert await raw_call(gw, "GET", b"/echo", [], version="1.0") == 200
    assert app.calls == 1


def test_path_normalization_is_one_of_two_rules() -> None:
    with pytest.raises(ConfigError) as err:
        load_config({"request": {"path_normalization": "off"}})
    assert "request.path_normalization" in str(err.value)


async def test_a_server_that_gives_no_raw_path_is_served_from_the_path() -> None:
    """Some ASGI servers leave raw_path out: the decoded path (any characters) still works."""
    app = CountingApp()
    gw = _gateway(app)
    for path, seen in (("/echo/€uro", "/echo/€uro"), ("/x/../echo", "/echo")):
        scope = {"type": "http", "http_version": "1.1", "method": "GET", "path": path, "query_string": b"",
                 "headers": [(b"host", b"gw")], "client": ("127.0.0.1", 1), "scheme": "http", "root_path": ""}
        sent = await call_asgi(gw, scope)
        assert sent[0]["status"] == 200
        assert app.scopes[-1]["path"] == seen


_RID = b"x-request-id"


@pytest.mark.parametrize(
    ("lines", "kept"),
    [
        ([], None),
        ([b"given-1"], b"given-1"),
        ([b"<script>"], None),
        ([b"given-1", b"given-2"], b"given-1"),
        ([b"<script>", b"given-2"], None),  # the first line decides, as RequestIdMiddleware has it
    ],
    ids=["none", "valid", "invalid", "two-valid-first", "two-invalid-first"],
)
async def test_the_stack_takes_the_request_id_in_the_checks_pass(
        lines: list[bytes], kept: bytes | None) -> None:
    """The id found in the request check's one pass: the client's first line when well formed,
    else a new one; the app sees exactly that one line, and the response echoes it."""
    app = CountingApp()
    headers = [(b"host", b"gw"), *((_RID, v) for v in lines), (b"accept", b"*/*")]
    scope = {"type": "http", "http_version": "1.1", "method": "GET", "raw_path": b"/echo", "path": "/echo",
             "query_string": b"", "client": ("127.0.0.1", 1), "headers": headers}
    sent = await call_asgi(_gateway(app), scope)
    echoed = [v for n, v in sent[0]["headers"] if n == _RID]
    seen = [v for n, v in app.scopes[-1]["headers"] if n == _RID]
    assert len(echoed) == 1
    assert seen == echoed
    if kept is None:
        assert re.fullmatch(rb"[0-9a-f]{32}", echoed[0])
    else:
        assert echoed == [kept]
    assert (b"accept", b"*/*") in app.scopes[-1]["headers"]
    assert headers == [(b"host", b"gw"), *((_RID, v) for v in lines), (b"accept", b"*/*")]  # not changed


async def test_a_refusal_echoes_the_clients_id_sent_after_the_ambiguity() -> None:
    """The check's pass stops at a second key line; the 400 still carries the id that came later."""
    app = CountingApp()
    headers = [(b"host", b"gw"), (b"x-api-key", b"a"), (b"x-api-key", b"b"), (_RID, b"later-id")]
    scope = {"type": "http", "http_version": "1.1", "method": "GET", "raw_path": b"/echo", "path": "/echo",
             "query_string": b"", "client": ("127.0.0.1", 1), "headers": headers}
    sent = await call_asgi(_gateway(app), scope)
    assert sent[0]["status"] == 400
    assert [v for n, v in sent[0]["headers"] if n == _RID] == [b"later-id"]
    assert app.calls == 0


async def test_remembered_paths_and_hosts_stay_bounded_and_decide_as_the_check() -> None:
    """Normal paths and valid hosts are remembered (no re-check), at most REMEMBERED of each; a
    path that needs work and a bad Host are still rewritten and refused among them."""
    app = CountingApp()
    gw = _gateway(app)
    check = gw._check
    check._normal_paths.limit = check._hosts.limit = 3
    for round_ in range(2):
        for i in range(5):
            host = b"h%d.example:80" % i
            assert await raw_call(gw, "GET", b"/echo/%d" % i, [(b"host", host)]) == 200, round_
            assert await raw_call(gw, "GET", b"/x/../echo/%d" % i, [(b"host", host)]) == 200
            assert app.scopes[-1]["raw_path"] == b"/echo/%d" % i
            assert await raw_call(gw, "GET", b"/echo", [(b"host", b"bad host")]) == 400
            assert len(check._normal_paths) <= 3
            assert len(check._hosts) <= 3
    assert b"/x/../echo/4" not in check._normal_paths
    assert b"bad host" not in check._hosts
