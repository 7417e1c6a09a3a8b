"""``idempotency.fingerprint``: "raw" (the body's bytes) or "json" (a JSON body's canonical form).

The canonical form is checked directly (``canonical_json``) and on the wire through
``IdempotencyMiddleware`` on fakeredis and real Redis (the ``store`` fixture).
"""

from __future__ import annotations

import json
import time

import pytest

from gateway import IdempotencyMiddleware
from gateway.idempotency.canonical import MAX_DEPTH, canonical_json
from gateway.idempotency.request import is_json_media_type
from gateway.store.redis import RedisStore
from tests.asgi_helpers import PROBLEM, client_for
from tests.test_idempotency import App

JSON = {"content-type": "application/json"}


class TestCanonicalForm:
    def test_member_order_and_whitespace_do_not_matter(self) -> None:
        """Reordered members and insignificant whitespace give the same canonical bytes."""
        a = canonical_json(b'{"amount": 100, "currency": "eur", "meta": {"b": [1, 2], "a": null}}')
        b = canonical_json(b'\n{ "meta":{"a":null,"b":[1,2]},\t"currency":"eur","amount":100 }\r\n')
        assert a == b == b'{"amount":100,"currency":"eur","meta":{"a":null,"b":[1,2]}}'

    @pytest.mark.parametrize(("one", "other"), [
        (b"1", b"1.0"), (b"1e2", b"100"), (b"0.1", b"0.10000000000000001"), (b"-0", b"0"),
        (b"100000000000000000000000001", b"100000000000000000000000000"),
    ])
    def test_numbers_stay_as_written(self, one: bytes, other: bytes) -> None:
        """Numbers are compared as written, never through a float: 1 and 1.0 are two requests."""
        assert canonical_json(one) == one
        assert canonical_json(one) != canonical_json(other)

    def test_a_huge_integer_is_kept_whole(self) -> None:
        """A 5000-digit integer (past Python's int parsing limit) is kept as its digits."""
        digits = b"9" * 5000
        assert canonical_json(b'{"n":%b}' % digits) == b'{"n":%b}' % digits

    def test_strings_have_one_spelling(self) -> None:
        """Escapes are normalised: "\\u0041" and "A", "\\/" and "/" are the same string."""
        assert canonical_json(b'["\\u0041\\/", "\xc3\xa9"]') == canonical_json(b'["A/", "\\u00e9"]')
        assert canonical_json(b'["\\ud800"]') == b'["\\ud800"]'  # a lone surrogate stays escaped

    def test_repeated_names_keep_their_order(self) -> None:
        """{"a":1,"a":2} is not {"a":2,"a":1}: apps differ on which repeated member wins."""
        assert canonical_json(b'{"a":1,"a":2}') != canonical_json(b'{"a":2,"a":1}')
        assert canonical_json(b'{"b":0,"a":1,"a":2}') == b'{"a":1,"a":2,"b":0}'

    @pytest.mark.parametrize("body", [
        b"", b"{", b"amount=100&currency=eur", b'{"a": NaN}', b"[Infinity]", b"\xff\xfe{", b'{"a":1} x',
    ])
    def test_not_json_has_no_canonical_form(self, body: bytes) -> None:
        """Anything that is not strict JSON (NaN, a form body, bad UTF-8, trailing text) has none."""
        assert canonical_json(body) is None

    def test_nesting_is_bounded(self) -> None:
        """MAX_DEPTH levels are canonicalised; one more, or hostile depth, falls back, quickly."""
        ok = b"[" * MAX_DEPTH + b"]" * MAX_DEPTH
        assert canonical_json(ok) == ok
        assert canonical_json(b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1)) is None
        started = time.perf_counter()
        deep_object = b'{"a":' * 300_000 + b"1" + b"}" * 300_000
        hostile = (b"[" * 1_000_000, b"[" * 500_000 + b"]" * 500_000, deep_object)
        for body in hostile:
            assert canonical_json(body) is None
        assert time.perf_counter() - started < 5

    @pytest.mark.parametrize(("value", "expected"), [
        (b"application/json", True), (b"Application/JSON; charset=utf-8", True),
        (b"application/merchant-data+json", True), (b"text/plain", False), (b"application/jsonx", False),
        (b"application/x-www-form-urlencoded", False), (b"", False),
    ])
    def test_json_media_types(self, value: bytes, expected: bool) -> None:
        """application/json and the structured +json types are JSON; others are not."""
        assert is_json_media_type(value) is expected


def idem(app: App, store: RedisStore, **settings: object) -> IdempotencyMiddleware:
    return IdempotencyMiddleware(app, idempotency=settings, store=store)


class TestOnTheWire:
    async def test_json_fingerprint_replays_reordered_json(self, store: RedisStore) -> None:
        """With fingerprint = "json" the same JSON, keys reordered and spaced, is a replay."""
        app = App(status=201)
        async with client_for(idem(app, store, fingerprint="json")) as c:
            first = await c.post("/charges", content=b'{"amount":100,"currency":"eur"}',
                                 headers={"Idempotency-Key": "k", **JSON})
            spaced = b'{ "currency": "eur", "amount": 100 }'
            charset = {"Idempotency-Key": "k", "content-type": "application/json; charset=utf-8"}
            again = await c.post("/charges", content=spaced, headers=charset)
        assert (first.status_code, again.status_code) == (201, 201)
        assert again.content == first.content
        assert again.headers["idempotent-replayed"] == "true"
        assert app.calls == 1

    async def test_raw_fingerprint_refuses_reordered_json(self, store: RedisStore) -> None:
        """By default (raw) the same JSON with its keys in another order is a 422 mismatch."""
        app = App(status=201)
        async with client_for(idem(app, store)) as c:
            await c.post("/charges", content=b'{"a":1,"b":2}', headers={"Idempotency-Key": "k", **JSON})
            again = await c.post("/charges", content=b'{"b":2,"a":1}',
                                 headers={"Idempotency-Key": "k", **JSON})
        assert again.status_code == 422
        assert again.json()["type"] == PROBLEM + "idempotency-key-reused"
        assert app.calls == 1

    @pytest.mark.parametrize(("first", "second"), [
        (b'{"amount":1}', b'{"amount":1.0}'),  # numbers as written
        (b'{"amount":1}', b'{"amount":2}'),
        (b'[1,2]', b'[2,1]'),  # array order is meaning
    ])
    async def test_json_fingerprint_still_tells_requests_apart(
        self, store: RedisStore, first: bytes, second: bytes
    ) -> None:
        """Under "json", a different value (1 vs 1.0 included) or array order is still a 422."""
        app = App(status=201)
        async with client_for(idem(app, store, fingerprint="json")) as c:
            await c.post("/p", content=first, headers={"Idempotency-Key": "k", **JSON})
            again = await c.post("/p", content=second, headers={"Idempotency-Key": "k", **JSON})
        assert again.status_code == 422
        assert app.calls == 1

    async def test_non_json_bodies_fall_back_to_raw(self, store: RedisStore) -> None:
        """A JSON-looking body sent as text/plain, and a body that is not JSON, are compared raw."""
        app = App(status=201)
        async with client_for(idem(app, store, fingerprint="json")) as c:
            text_key = {"Idempotency-Key": "t", "content-type": "text/plain"}
            bad_key = {"Idempotency-Key": "bad", **JSON}
            await c.post("/p", content=b'{"a":1,"b":2}', headers=text_key)
            text = await c.post("/p", content=b'{"b":2,"a":1}', headers=text_key)
            await c.post("/p", content=b'{"a":1, oops', headers=bad_key)
            same_bad = await c.post("/p", content=b'{"a":1, oops', headers=bad_key)
            other_bad = await c.post("/p", content=b'{"a":1,  oops', headers=bad_key)
        assert text.status_code == 422
        assert same_bad.headers["idempotent-replayed"] == "true"
        assert other_bad.status_code == 422
        assert app.calls == 2

    async def test_hostile_nesting_is_fingerprinted_raw(self, store: RedisStore) -> None:
        """A 500 000-deep JSON body under "json" is run once and replayed, not a crash."""
        body = b"[" * 500_000 + b"]" * 500_000
        app = App(status=201, body=b"done")
        async with client_for(idem(app, store, fingerprint="json", max_body_bytes=2_000_000)) as c:
            first = await c.post("/p", content=body, headers={"Idempotency-Key": "deep", **JSON})
            again = await c.post("/p", content=body, headers={"Idempotency-Key": "deep", **JSON})
        assert (first.status_code, again.status_code) == (201, 201)
        assert again.headers["idempotent-replayed"] == "true"
        assert app.calls == 1

    async def test_the_app_gets_the_body_as_sent(self, store: RedisStore) -> None:
        """Canonicalising is for the fingerprint only: the app reads the bytes the client sent."""
        app = App(status=201)
        sent = b'{ "b": 2,\n "a": 1 }'
        async with client_for(idem(app, store, fingerprint="json")) as c:
            await c.post("/p", content=sent, headers={"Idempotency-Key": "k", **JSON})
        assert app.bodies == [sent]
        assert json.loads(app.bodies[0]) == {"a": 1, "b": 2}
