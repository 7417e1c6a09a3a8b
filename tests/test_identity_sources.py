"""Identity sources beyond a header and the address: ``cookie:NAME``, ``bearer``, ``jwt:CLAIM``
(a claim of a verified bearer JWT) and, in-process, a callable (sync or async).

Issue 16, item 1: a forged, expired or otherwise unverifiable token is no identity at all (the
chain falls through to its next source), never an error a client could probe the verifier
with; algorithms are pinned by config; verified tokens are cached, and the cache respects
``exp``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from gateway import GatewayMiddleware, IdempotencyMiddleware, RateLimitMiddleware, load_config
from gateway.bearer import JwtVerifier, bearer_token, load_keys
from gateway.config import IdentityConfig
from gateway.errors import ConfigError
from gateway.identity import IdentityResolver, tag
from tests.asgi_helpers import CountingApp, client_for, lifespan_running
from tests.jwt_keys import SECRET, bearer, ec_key, jwks, public_pem, rsa_key, token, unsigned

PEER = ("198.51.100.9", 1234)


def scope_with(*headers: tuple[bytes, bytes], client: tuple[str, int] = PEER) -> dict[str, Any]:
    return {"type": "http", "method": "GET", "path": "/", "headers": list(headers), "client": client}


def rsa_jwt(**more: Any) -> dict[str, Any]:
    """An ``[identity.jwt]`` section that verifies RS256 tokens of ``rsa_key()``."""
    return {"algorithms": ["RS256"], "key": public_pem(rsa_key()), **more}


def resolver_of(sources: list[Any], jwt: dict[str, Any] | None = None, **identity: Any) -> IdentityResolver:
    section: dict[str, Any] = {"sources": sources, **identity}
    if jwt is not None:
        section["jwt"] = jwt
    return IdentityResolver(load_config({"identity": section}).identity, ("identity",))


def ident(r: IdentityResolver, *headers: tuple[bytes, bytes], client: tuple[str, int] = PEER) -> str:
    return r.tags(scope_with(*headers, client=client))["identity"]


def ip_identity(addr: str = PEER[0]) -> str:
    return tag(b"ip:" + addr.encode())


def hs256_forged_with(secret: bytes, claims: dict[str, Any]) -> str:
    """An HS256 token whose HMAC key is ``secret``: the algorithm-confusion forgery when the
    secret is the verifier's RSA public key (RFC 8725 §2.1)."""
    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    sig = b64(hmac.new(secret, head + b"." + body, hashlib.sha256).digest())
    return (head + b"." + body + b"." + sig).decode()


class TestCookieAndBearer:
    def test_cookie_names_the_client_and_its_absence_falls_through(self) -> None:
        """``cookie:session`` is the client's session cookie; without it the next source decides."""
        r = resolver_of(["cookie:session", "ip"])
        a = ident(r, (b"cookie", b"theme=dark; session=abc"))
        assert a == ident(r, (b"cookie", b"session=abc"))
        assert a != ident(r, (b"cookie", b"session=abd"))
        assert a != ip_identity()
        assert ident(r, (b"cookie", b"theme=dark")) == ip_identity()
        assert ident(r, (b"cookie", b"session=")) == ip_identity()  # empty counts as absent
        assert ident(r, (b"cookie", b"Session=abc")) == ip_identity()  # names are case-sensitive

    def test_cookie_lines_form_one_list(self) -> None:
        """HTTP/2 sends each cookie on a line of its own (RFC 9113 §8.2.3): they are one list."""
        r = resolver_of(["cookie:session"])
        assert ident(r, (b"cookie", b"theme=dark"), (b"cookie", b"session=abc")) == ident(
            r, (b"cookie", b"theme=dark; session=abc"))

    def test_bearer_is_the_token_of_a_bearer_authorization(self) -> None:
        """``bearer`` reads ``Authorization: Bearer <token>`` (any case of the scheme) and nothing else."""
        r = resolver_of(["bearer", "ip"])
        a = ident(r, (b"authorization", b"Bearer tok.en-1"))
        assert a == ident(r, (b"authorization", b"bearer tok.en-1"))
        assert a != ident(r, (b"authorization", b"Bearer tok.en-2"))
        assert a != ip_identity()
        for other in (b"Basic dXNlcjpwYXNz", b"Bearer", b"Bearer a b", b"Bearer a=b", b"Bearertok"):
            assert ident(r, (b"authorization", other)) == ip_identity(), other

    @pytest.mark.parametrize(("value", "expected"), [
        (b"Bearer abc", b"abc"), (b"BEARER  abc==", b"abc=="), (b"Bearer a/b+c~d", b"a/b+c~d"),
        (b"Token abc", None), (b"Bearer ", None), (b"Bearer a,b", None), (b"Bearer =a", None), (None, None),
    ])
    def test_bearer_token_syntax(self, value: bytes | None, expected: bytes | None) -> None:
        """The token is one token68 (RFC 9110 §11.2); anything else is no token."""
        assert bearer_token(value) == expected


class TestJwt:
    def test_a_verified_claim_names_the_client_across_rotated_tokens(self) -> None:
        """Two tokens for one ``sub`` are one client; another ``sub`` is another client."""
        r = resolver_of(["jwt:sub", "ip"], rsa_jwt())
        first = ident(r, bearer(token(ttl_s=300)))
        rotated = ident(r, bearer(token(ttl_s=600)))
        assert first == rotated != ip_identity()
        assert ident(r, bearer(token({"sub": "user-2"}))) not in (first, ip_identity())

    @pytest.mark.parametrize("forged", [
        pytest.param(lambda: token(key=rsa_key(1)), id="another-rsa-key"),
        pytest.param(lambda: token(ttl_s=-120), id="expired"),
        pytest.param(unsigned, id="alg-none"),
        pytest.param(lambda: hs256_forged_with(public_pem(rsa_key()).encode(),
                                               {"sub": "user-1", "exp": int(time.time()) + 300}),
                     id="hs256-with-the-public-key"),
        pytest.param(lambda: token(algorithm="ES256"), id="unpinned-algorithm"),
        pytest.param(lambda: token()[:-4] + "AAAA", id="tampered-signature"),
        pytest.param(lambda: "not.a.jwt", id="garbage"),
        pytest.param(lambda: token({"exp": None}), id="no-exp"),
        pytest.param(lambda: token({"sub": {"id": 1}}), id="claim-not-a-string"),
        pytest.param(lambda: token(nbf=int(time.time()) + 600), id="not-yet-valid"),
    ])
    def test_an_unverifiable_token_is_no_identity(self, forged: Any) -> None:
        """A token that does not verify names nobody: the chain goes on to the client address."""
        r = resolver_of(["jwt:sub", "ip"], rsa_jwt())
        assert ident(r, bearer(forged())) == ip_identity()

    def test_leeway_allows_small_clock_skew(self) -> None:
        """A token expired within ``leeway`` still verifies; past it, it does not."""
        r = resolver_of(["jwt:sub", "ip"], rsa_jwt(leeway="30s"))
        assert ident(r, bearer(token(ttl_s=-10))) != ip_identity()
        assert ident(r, bearer(token(ttl_s=-60))) == ip_identity()

    def test_audience_and_issuer_are_checked_when_configured(self) -> None:
        """With ``audience`` and ``issuer`` set, a token for another audience or issuer names nobody."""
        r = resolver_of(["jwt:sub", "ip"], rsa_jwt(audience="api", issuer="https://id.example"))
        good = {"aud": "api", "iss": "https://id.example"}
        assert ident(r, bearer(token(good))) != ip_identity()
        assert ident(r, bearer(token({**good, "aud": "other"}))) == ip_identity()
        assert ident(r, bearer(token({**good, "iss": "https://evil.example"}))) == ip_identity()
        assert ident(r, bearer(token({"iss": "https://id.example"}))) == ip_identity()  # no aud

    def test_without_exp_only_when_allowed(self) -> None:
        """``require_exp = false`` accepts a token without ``exp``."""
        r = resolver_of(["jwt:sub", "ip"], rsa_jwt(require_exp=False))
        assert ident(r, bearer(token({"exp": None}))) != ip_identity()

    def test_hmac_and_ec_keys(self) -> None:
        """HS256 with an inline secret and ES256 with a PEM key verify their own tokens only."""
        hs = resolver_of(["jwt:sub", "ip"], {"algorithms": ["HS256"], "key": SECRET})
        assert ident(hs, bearer(token(algorithm="HS256"))) != ip_identity()
        assert ident(hs, bearer(token(algorithm="HS256", key="x" * 40))) == ip_identity()
        es = resolver_of(["jwt:sub", "ip"], {"algorithms": ["ES256"], "key": public_pem(ec_key())})
        assert ident(es, bearer(token(algorithm="ES256"))) != ip_identity()
        assert ident(es, bearer(token(algorithm="ES256", key=ec_key(1)))) == ip_identity()

    def test_jwks_file_picks_the_key_by_kid(self, tmp_path: Path) -> None:
        """A JWKS file's key is the one the token's ``kid`` names; an unknown ``kid`` names nobody."""
        path = tmp_path / "jwks.json"
        path.write_text(jwks(("a", rsa_key()), ("b", rsa_key(1))))
        r = resolver_of(["jwt:sub", "ip"], {"algorithms": ["RS256"], "jwks_file": str(path)})
        assert ident(r, bearer(token(kid="a"))) != ip_identity()
        assert ident(r, bearer(token(key=rsa_key(1), kid="b"))) != ip_identity()
        assert ident(r, bearer(token(key=rsa_key(1), kid="a"))) == ip_identity()  # b's key, a's kid
        assert ident(r, bearer(token(kid="c"))) == ip_identity()

    def test_key_file(self, tmp_path: Path) -> None:
        """``key_file`` holds the PEM public key (a trailing newline is fine)."""
        path = tmp_path / "key.pem"
        path.write_text(public_pem(rsa_key()) + "\n")
        r = resolver_of(["jwt:sub", "ip"], {"algorithms": ["RS256"], "key_file": str(path)})
        assert ident(r, bearer(token())) != ip_identity()

    def test_numeric_claims_are_values(self) -> None:
        """A whole-number claim is a value (as its decimal string); a boolean is not."""
        r = resolver_of(["jwt:uid", "ip"], rsa_jwt())
        assert ident(r, bearer(token({"uid": 42}))) != ip_identity()
        assert ident(r, bearer(token({"uid": True}))) == ip_identity()


class TestVerifierCache:
    def verifier(self, **more: Any) -> JwtVerifier:
        keys = load_keys(("RS256",), key=public_pem(rsa_key()).encode())
        return JwtVerifier(keys=keys, algorithms=("RS256",), claims=("sub",), **more)

    def test_a_token_is_verified_once_then_answered_from_the_cache(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Repeated tokens, good or forged, cost one verification each."""
        v = self.verifier()
        calls: list[bytes] = []
        real = JwtVerifier._verify
        monkeypatch.setattr(JwtVerifier, "_verify", lambda self, t: calls.append(t) or real(self, t))
        good, forged = token().encode(), token(key=rsa_key(1)).encode()
        for _ in range(5):
            assert v.claims(good) == {"sub": "user-1"}
            assert v.claims(forged) is None
        assert calls == [good, forged]

    def test_a_cached_token_expires_with_its_exp(self) -> None:
        """A verified token stops verifying once ``exp`` (plus leeway) has passed, cached or not."""
        v = self.verifier(leeway_s=5.0)
        good = token(ttl_s=60).encode()
        now = time.time()
        assert v.claims(good, now) == {"sub": "user-1"}
        assert v.claims(good, now + 60 + 5 + 1) is None
        assert v.claims(good, now) is None  # expired stays expired

    def test_a_token_not_yet_valid_is_not_remembered(self) -> None:
        """A token refused for ``nbf`` verifies once its time has come."""
        v = self.verifier(leeway_s=0.0)
        soon = token(nbf=int(time.time()) + 1).encode()
        assert v.claims(soon) is None
        deadline = time.monotonic() + 5
        while v.claims(soon) is None:
            assert time.monotonic() < deadline, "the token never became valid"
            time.sleep(0.05)

    def test_the_cache_is_bounded(self) -> None:
        """At most ``cache_size`` tokens are remembered; the oldest go first."""
        v = self.verifier(cache_size=3)
        tokens = [token({"sub": f"u{i}"}).encode() for i in range(5)]
        for t in tokens:
            v.claims(t)
        assert len(v._cache) == 3


class TestCallable:
    def test_a_sync_callable_names_the_client(self) -> None:
        """A callable source's value is the identity; None hands over to the next source."""
        r = resolver_of([lambda scope: scope.get("user"), "ip"])
        s = scope_with()
        assert r.tags({**s, "user": "alice"})["identity"] == r.tags({**s, "user": "alice"})["identity"]
        assert r.tags({**s, "user": "alice"})["identity"] != r.tags({**s, "user": "bob"})["identity"]
        assert r.tags(s)["identity"] == ip_identity()

    async def test_an_async_callable_is_awaited(self) -> None:
        """An async callable is awaited (``tags_async``), with the same outcomes."""
        async def who(scope: Any) -> str | None:
            return scope.get("user")
        r = resolver_of([who, "ip"])
        assert r.awaits
        s = scope_with()
        assert (await r.tags_async({**s, "user": "alice"}))["identity"] != ip_identity()
        assert (await r.tags_async(s))["identity"] == ip_identity()

    def test_a_raising_callable_is_logged_and_skipped(self, caplog: pytest.LogCaptureFixture) -> None:
        """A callable that raises names nobody (the next source decides) and is logged."""
        def broken(scope: Any) -> str:
            raise RuntimeError("bug")
        r = resolver_of([broken, "ip"])
        with caplog.at_level(logging.WARNING, logger="gateway.identity"):
            assert ident(r) == ip_identity()
        assert [rec.event for rec in caplog.records] == ["identity.source_error"]  # type: ignore[attr-defined]


class TestConfig:
    def problems(self, identity: dict[str, Any]) -> list[str]:
        with pytest.raises(ConfigError) as info:
            load_config({"identity": identity})
        return info.value.problems

    def test_jwt_without_pyjwt_is_one_line_naming_the_key(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without PyJWT, a config that verifies JWTs fails at load, one line naming the key."""
        monkeypatch.setattr("gateway.bearer.jwt_available", lambda: False)
        (line,) = self.problems({"sources": ["jwt:sub"], "jwt": rsa_jwt()})
        assert line.startswith("identity.jwt: ")
        assert "PyJWT" in line

    @pytest.mark.parametrize(("jwt", "key"), [
        ({"algorithms": ["none"], "key": SECRET}, "identity.jwt.algorithms[0]"),
        ({"algorithms": ["HS256", "RS256"], "key": SECRET}, "identity.jwt.algorithms"),
        ({"key": SECRET}, "identity.jwt.algorithms"),
        ({"algorithms": ["HS256"], "key": "short"}, "identity.jwt.key"),
        ({"algorithms": ["RS256"], "key": "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----"},
         "identity.jwt.key"),
        ({"algorithms": ["HS256"], "key": public_pem(rsa_key())}, "identity.jwt.key"),  # public key as secret
        ({"algorithms": ["RS256"]}, "identity.jwt.key"),
        ({"algorithms": ["RS256"], "key": "k" * 40, "key_file": "/nonexistent"}, "identity.jwt.key"),
        ({"algorithms": ["RS256"], "key_file": "/nonexistent/key.pem"}, "identity.jwt.key_file"),
        ({"algorithms": ["RS256"], "jwks_file": "/nonexistent/jwks.json"}, "identity.jwt.jwks_file"),
        ({"algorithms": ["HS256"], "key": SECRET, "leeway": "1h"}, "identity.jwt.leeway"),
        ({"algorithms": ["HS256"], "key": SECRET, "typo": 1}, "identity.jwt.typo"),
    ])
    def test_bad_jwt_sections(self, jwt: dict[str, Any], key: str) -> None:
        """Each bad ``[identity.jwt]`` is one line naming its key."""
        (line,) = self.problems({"sources": ["jwt:sub"], "jwt": jwt})
        assert line.startswith(f"{key}: "), line

    def test_jwks_of_another_family_is_refused(self, tmp_path: Path) -> None:
        """A JWKS whose key is not of the pinned family is refused at load."""
        path = tmp_path / "jwks.json"
        path.write_text(jwks(("a", ec_key())))
        jwt = {"algorithms": ["RS256"], "jwks_file": str(path)}
        (line,) = self.problems({"sources": ["jwt:sub"], "jwt": jwt})
        assert line.startswith("identity.jwt.jwks_file: ")

    def test_identity_keyword_takes_a_callable(self) -> None:
        """``identity=`` of a single middleware takes a callable, with ``config=`` too."""
        mw = RateLimitMiddleware(CountingApp(), config={"rate_limit": [{}]}, identity=lambda scope: "x")
        assert mw._resolver._sources[0].kind == "call"
        with pytest.raises(TypeError):
            GatewayMiddleware(CountingApp(), identity="header:x")  # type: ignore[arg-type]

    def test_identity_config_repr_hides_the_secret(self) -> None:
        """An HMAC secret never shows in a repr of the config."""
        jwt = {"algorithms": ["HS256"], "key": SECRET}
        cfg = load_config({"identity": {"sources": ["jwt:sub"], "jwt": jwt}})
        assert SECRET not in repr(cfg.identity)
        assert isinstance(cfg.identity, IdentityConfig)


class TestRequestCheck:
    async def test_two_authorization_lines_are_refused_when_a_source_reads_it(self) -> None:
        """With a ``bearer`` source, two Authorization lines are ambiguous: 400."""
        app = CountingApp()
        gw = GatewayMiddleware(app, {"identity": {"sources": ["bearer", "ip"]}, "rate_limit": [{}]})
        async with lifespan_running(gw), client_for(gw) as c:
            r = await c.get("/", headers=[("authorization", "Bearer a"), ("authorization", "Bearer b")])
            ok = await c.get("/", headers=[("authorization", "Bearer a")])
        assert r.status_code == 400
        assert "authorization" in r.json()["detail"]
        assert ok.status_code == 200
        assert app.calls == 1

    async def test_a_cookie_a_source_reads_may_come_once(self) -> None:
        """The session cookie twice (one line or two) is ambiguous: 400; other cookies on lines
        of their own are one list."""
        app = CountingApp()
        gw = GatewayMiddleware(app, {"identity": {"sources": ["cookie:session"]}, "rate_limit": [{}]})
        async with lifespan_running(gw), client_for(gw) as c:
            twice = await c.get("/", headers=[("cookie", "session=a; session=b")])
            two_lines = await c.get("/", headers=[("cookie", "session=a"), ("cookie", "session=b")])
            split = await c.get("/", headers=[("cookie", "theme=dark"), ("cookie", "session=a")])
        assert twice.status_code == two_lines.status_code == 400
        assert "session cookie" in twice.json()["detail"]
        assert split.status_code == 200
        assert app.calls == 1


def one_per_client(store: dict[str, Any], sources: list[Any], **identity: Any) -> dict[str, Any]:
    return {"store": store, "identity": {"sources": sources, **identity},
            "rate_limit": [{"name": "one", "limit": 1, "period": "1h"}]}


class TestThroughTheStack:
    async def test_jwt_sub_is_the_client_and_forgeries_fall_to_the_address(
        self, store_section: dict[str, Any]
    ) -> None:
        """One bucket per verified ``sub`` (a rotated token is the same client); a forged or
        expired token is counted against the client's address, and is never an error."""
        app = CountingApp()
        gw = GatewayMiddleware(app, one_per_client(store_section, ["jwt:sub", "ip"], jwt=rsa_jwt()))
        async with lifespan_running(gw), client_for(gw) as c:
            def auth(t: str) -> dict[str, str]:
                return {"authorization": f"Bearer {t}"}
            statuses = [(await c.get("/", headers=auth(token(ttl_s=t)))).status_code for t in (300, 600)]
            other = await c.get("/", headers=auth(token({"sub": "user-2"})))
            forged = await c.get("/", headers=auth(token({"sub": "user-3"}, key=rsa_key(1))))
            expired = await c.get("/", headers=auth(token({"sub": "user-4"}, ttl_s=-600)))
        assert statuses == [200, 429]
        assert other.status_code == 200
        assert forged.status_code == 200  # the address's first request
        assert expired.status_code == 429  # the address's second: the same bucket as the forgery
        assert expired.json()["violated-policies"] == ["one"]

    async def test_cookie_clients(self, store_section: dict[str, Any]) -> None:
        """Two session cookies are two clients."""
        gw = GatewayMiddleware(CountingApp(), one_per_client(store_section, ["cookie:session"]))
        async with lifespan_running(gw), client_for(gw) as c:
            a = [(await c.get("/", headers={"cookie": "session=a"})).status_code for _ in range(2)]
            b = (await c.get("/", headers={"cookie": "session=b"})).status_code
        assert (a, b) == ([200, 429], 200)

    @pytest.mark.parametrize("kind", ["sync", "async"])
    async def test_callable_identity_in_the_stack_and_alone(
        self, store_section: dict[str, Any], kind: str
    ) -> None:
        """``identity=`` a callable (sync or async) names the client, in GatewayMiddleware and in
        RateLimitMiddleware alone."""
        def sync_who(scope: Any) -> str | None:
            return dict(scope["headers"]).get(b"x-user", b"").decode() or None

        async def async_who(scope: Any) -> str | None:
            return sync_who(scope)

        who = sync_who if kind == "sync" else async_who
        config = one_per_client(store_section, ["ip"])
        stack = GatewayMiddleware(CountingApp(), config, identity=who)
        alone = RateLimitMiddleware(CountingApp(), rate_limit=config["rate_limit"], store=store_section,
                                    identity=who)
        for n, app in enumerate((stack, alone)):  # one store: other users each time
            async with lifespan_running(app), client_for(app) as c:
                alice = [(await c.get("/", headers={"x-user": f"alice{n}"})).status_code for _ in range(2)]
                bob = (await c.get("/", headers={"x-user": f"bob{n}"})).status_code
            assert (alice, bob) == ([200, 429], 200)

    async def test_idempotency_keys_are_scoped_to_the_callable_identity(
        self, store_section: dict[str, Any]
    ) -> None:
        """One Idempotency-Key from two clients a callable tells apart is two records."""
        app = CountingApp()
        mw = IdempotencyMiddleware(app, store=store_section,
                                   identity=lambda scope: dict(scope["headers"]).get(b"x-user"))
        async with lifespan_running(mw), client_for(mw) as c:
            for user in ("alice", "bob", "alice"):
                await c.post("/", headers={"x-user": user, "idempotency-key": "k"})
            nobody = await c.post("/", headers={"idempotency-key": "k"})
        assert app.calls == 2
        assert nobody.status_code == 400  # no identity: never a shared anonymous scope
