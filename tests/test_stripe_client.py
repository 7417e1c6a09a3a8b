"""The official ``stripe`` Python library against ``gateway serve`` with ``[errors] format =
"stripe"``, in front of a Stripe-like upstream (``tests/e2e_upstream.py``, ``/v1/customers``),
on a real Redis.

Per refusal: the exception class stripe-python raises, its ``code`` (stripe-python passes the
code only to some classes, e.g. ``InvalidRequestError``; the error object, ``exc.error.code``,
always has it), ``http_status``, ``request_id`` (the gateway's request id, which it sends as
``Request-Id``), and what its retry logic did: the attempts the gateway answered (its
``gateway_requests_total`` by status) and the attempts the upstream saw (its own count per
``Idempotency-Key``). stripe-python retries 409 and 5xx unless ``Stripe-Should-Retry: false``
says otherwise, and any status with ``Stripe-Should-Retry: true``; the clients here make up
to 2 retries (its default), sleeping its own backoff (0.5 s, then up to 1 s).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import stripe

from tests.redis_process import RedisProcess, free_port
from tests.serve_process import GatewayServe, Upstream, serve_config, wait_for

pytestmark = pytest.mark.slow

RETRIES = 2  # stripe-python's default max_network_retries


class Stack:
    """The upstream and four gateways (all ``format = "stripe"``, one Redis):

    * ``main``: rate limit of 1 a minute on ``/v1/limited``, 1 request in flight per client on
      ``/v1/one-at-a-time``, ``max_body_bytes = 400``;
    * ``slow``: ``upstream.timeout = 500ms`` (the proxy's 504 outcome unknown);
    * ``dead_upstream``: an upstream port nobody listens on (the proxy's 502, not sent);
    * ``dead_store``: a store port nobody listens on (503 store unavailable), and a local load
      shedder that sheds past one request in flight.
    """

    def __init__(self, workdir: Path, redis_server: RedisProcess) -> None:
        self.upstream = Upstream(workdir)
        prefix = f"st{uuid.uuid4().hex[:10]}"
        stripe_format = {"format": "stripe"}
        main = serve_config(
            self.upstream.url, redis_server.url, prefix, errors=stripe_format,
            rate_limit=[{"name": "per-client", "limit": 1, "period": "1m", "paths": ["/v1/limited"]}],
            concurrency_limit=[{"name": "one-at-a-time", "limit": 1, "paths": ["/v1/one-at-a-time"]}],
            idempotency={"max_body_bytes": 400},
        )
        slow = serve_config(self.upstream.url, redis_server.url, prefix, timeout="500ms",
                            errors=stripe_format)
        dead_upstream = serve_config(f"http://127.0.0.1:{free_port()}", redis_server.url, prefix,
                                     errors=stripe_format)
        dead_store = serve_config(
            self.upstream.url, f"redis://127.0.0.1:{free_port()}/0", prefix, errors=stripe_format,
            priority=[{"name": "critical", "paths": ["/v1/critical"]}],
            shedding={"local": {"enabled": True, "max_in_flight": 1}},
        )
        self.main = GatewayServe(workdir, main)
        self.slow = GatewayServe(workdir, slow)
        self.dead_upstream = GatewayServe(workdir, dead_upstream)
        self.dead_store = GatewayServe(workdir, dead_store)
        self.processes = [self.upstream, self.main, self.slow, self.dead_upstream, self.dead_store]

    def start(self) -> None:
        for process in self.processes:
            process.launch()
        for process in self.processes:
            process.wait_ready()

    def stop(self) -> None:
        for process in self.processes:
            process.stop()

    def upstream_attempts(self, key: str) -> int:
        with self.upstream.client() as client:
            count: int = client.get("/v1/attempts", params={"key": key}).json()["count"]
        return count

    def release(self, name: str) -> None:
        with self.upstream.client() as client:
            client.get("/release", params={"id": name})


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisProcess) -> Iterator[Stack]:
    built = Stack(tmp_path_factory.mktemp("stripe"), redis_server)
    try:
        built.start()
        yield built
    finally:
        built.stop()


def client_of(gateway: GatewayServe) -> stripe.StripeClient:
    return stripe.StripeClient("sk_test_gateway", base_addresses={"api": gateway.url},
                               max_network_retries=RETRIES)


def answered(gateway: GatewayServe) -> dict[int, float]:
    """How many responses the gateway has sent, by status."""
    metrics = gateway.metrics()
    return {code: metrics.value("gateway_requests_total", code=str(code))
            for code in (200, 400, 409, 429, 502, 503, 504)}


def raised(gateway: GatewayServe, call: Callable[[], Any]) -> tuple[stripe.StripeError, dict[int, float]]:
    """The error ``call`` raised, and the responses the gateway sent meanwhile, by status."""
    before = answered(gateway)
    with pytest.raises(stripe.StripeError) as info:
        call()
    after = answered(gateway)
    return info.value, {code: after[code] - before[code] for code in after if after[code] != before[code]}


def create(client: stripe.StripeClient, key: str, description: str = "ok") -> Any:
    """``client.v1.customers.create`` (POST /v1/customers, form body) with ``key`` as its
    Idempotency-Key."""
    return client.v1.customers.create(params={"description": description}, options={"idempotency_key": key})


def post(client: stripe.StripeClient, path: str, key: str, description: str = "ok") -> Any:
    """``client.raw_request`` on any path: the same requestor, error mapping and retries as the
    typed services."""
    response = client.raw_request("post", path, description=description, idempotency_key=key)
    return client.deserialize(response, api_mode="V1")


def assert_request_id(error: stripe.StripeError) -> None:
    """``request_id`` is the gateway's request id (``Request-Id``, echoing ``X-Request-Id``)."""
    assert error.request_id is not None
    assert error.headers is not None
    assert error.request_id == error.headers["x-request-id"]


def hold_in_background(gateway: GatewayServe, path: str, headers: dict[str, str]) -> threading.Thread:
    """A request through ``gateway`` that the upstream holds until released, in a thread."""
    thread = threading.Thread(target=lambda: httpx.post(gateway.url + path, headers=headers, timeout=30,
                                                        data={"description": "hold"}, trust_env=False))
    thread.start()
    return thread


class TestRefusals:
    def test_a_rate_limit_is_a_rate_limit_error_not_retried(self, stack: Stack) -> None:
        """429: RateLimitError, code rate_limit, Retry-After and Stripe-Should-Retry: false; the
        client does not retry (one attempt at the gateway, none upstream)."""
        client = client_of(stack.main)
        key = f"rl-{uuid.uuid4().hex}"
        post(client, "/v1/limited", f"first-{key}")  # the bucket's one token
        error, seen = raised(stack.main, lambda: post(client, "/v1/limited", key))
        assert type(error) is stripe.RateLimitError
        assert error.http_status == 429
        assert error.error is not None
        assert (error.error.type, error.error.code) == ("invalid_request_error", "rate_limit")
        assert error.error.violated_policies == ["per-client"]
        assert error.headers is not None
        assert int(error.headers["retry-after"]) >= 1
        assert error.headers["stripe-should-retry"] == "false"
        assert_request_id(error)
        assert seen == {429: 1}
        assert stack.upstream_attempts(key) == 0

    def test_a_key_reused_with_other_parameters_is_an_idempotency_error(self, stack: Stack) -> None:
        """422 becomes Stripe's 400 idempotency_error: IdempotencyError, not retried."""
        client = client_of(stack.main)
        key = f"reuse-{uuid.uuid4().hex}"
        first = create(client, key, "one")
        assert first.object == "customer"
        error, seen = raised(stack.main, lambda: create(client, key, "two"))
        assert type(error) is stripe.IdempotencyError
        assert error.http_status == 400
        assert error.error is not None
        assert (error.error.type, error.error.code) == ("idempotency_error", "idempotency_key_reused")
        assert_request_id(error)
        assert seen == {400: 1}
        assert stack.upstream_attempts(key) == 1

    def test_a_key_in_use_is_retried_then_an_api_error(self, stack: Stack) -> None:
        """409 (the first request still running): Stripe-Should-Retry: true, so the client makes
        its 2 retries (3 attempts at the gateway, none of them upstream), then APIError with
        code idempotency_key_in_use; once the first is done, the same call is its replay."""
        client = client_of(stack.main)
        key = f"inuse-{uuid.uuid4().hex}"
        holder = hold_in_background(stack.main, "/v1/customers", {"Idempotency-Key": key})
        try:
            wait_for(lambda: stack.upstream_attempts(key) == 1, "the first request upstream")
            error, seen = raised(stack.main, lambda: create(client, key, "hold"))
        finally:
            stack.release(key)
            holder.join(30)
        assert type(error) is stripe.APIError
        assert error.http_status == 409
        assert error.error is not None
        assert (error.error.type, error.error.code) == ("idempotency_error", "idempotency_key_in_use")
        assert error.headers is not None
        assert error.headers["stripe-should-retry"] == "true"
        assert_request_id(error)
        assert seen == {409: 1 + RETRIES}
        replay = create(client, key, "hold")
        assert replay.object == "customer"
        assert replay.last_response.headers["idempotent-replayed"] == "true"
        assert stack.upstream_attempts(key) == 1

    def test_a_body_too_large_is_an_invalid_request_error(self, stack: Stack) -> None:
        """413 becomes Stripe's 400 invalid_request_error: InvalidRequestError with its code."""
        client = client_of(stack.main)
        key = f"big-{uuid.uuid4().hex}"
        error, seen = raised(stack.main, lambda: create(client, key, "x" * 1000))
        assert type(error) is stripe.InvalidRequestError
        assert (error.http_status, error.code) == (400, "body_too_large")
        assert_request_id(error)
        assert seen == {400: 1}
        assert stack.upstream_attempts(key) == 0

    def test_a_bad_key_is_an_invalid_request_error(self, stack: Stack) -> None:
        """A 256-character key: InvalidRequestError, code idempotency_key_invalid, not retried."""
        client = client_of(stack.main)
        key = "k" * 256
        error, seen = raised(stack.main, lambda: create(client, key))
        assert type(error) is stripe.InvalidRequestError
        assert (error.http_status, error.code) == (400, "idempotency_key_invalid")
        assert_request_id(error)
        assert seen == {400: 1}

    def test_a_concurrency_refusal_is_retried_then_a_rate_limit_error(self, stack: Stack) -> None:
        """429 concurrency limit: Stripe-Should-Retry: true (it passes once the other request
        ends), 3 attempts, then RateLimitError code rate_limit; nothing reached the upstream."""
        client = client_of(stack.main)
        hold_id = f"slot-{uuid.uuid4().hex}"
        holder = hold_in_background(stack.main, "/v1/one-at-a-time", {"Idempotency-Key": hold_id})
        key = f"conc-{uuid.uuid4().hex}"
        try:
            wait_for(lambda: stack.upstream_attempts(hold_id) == 1, "the slot's holder upstream")
            error, seen = raised(stack.main, lambda: post(client, "/v1/one-at-a-time", key))
        finally:
            stack.release(hold_id)
            holder.join(30)
        assert type(error) is stripe.RateLimitError
        assert error.http_status == 429
        assert error.error is not None
        assert error.error.code == "rate_limit"
        assert error.error.violated_policies == ["one-at-a-time"]
        assert_request_id(error)
        assert seen == {429: 1 + RETRIES}
        assert stack.upstream_attempts(key) == 0

    def test_the_upstreams_own_error_passes_through(self, stack: Stack) -> None:
        """The upstream's Stripe error is the upstream's: InvalidRequestError with its code and
        its own Request-Id, not retried; its retry with the key is the replay, not a new run."""
        client = client_of(stack.main)
        key = f"upstream-{uuid.uuid4().hex}"
        error, seen = raised(stack.main, lambda: create(client, key, "reject"))
        assert type(error) is stripe.InvalidRequestError
        assert (error.http_status, error.code) == (400, "parameter_invalid_empty")
        assert error.request_id is not None
        assert error.request_id.startswith("req_up_")
        assert seen == {400: 1}
        again, _ = raised(stack.main, lambda: create(client, key, "reject"))
        assert again.request_id == error.request_id
        assert again.headers is not None
        assert again.headers["idempotent-replayed"] == "true"
        assert stack.upstream_attempts(key) == 1

    def test_an_upstream_timeout_is_an_outcome_unknown_never_retried(self, stack: Stack) -> None:
        """504 outcome unknown (sent, no answer in time): Stripe-Should-Retry: false, so the
        client does not retry a 5xx it would otherwise retry; the same call later gets the
        replayed 504, and the upstream saw the request once."""
        client = client_of(stack.slow)
        key = f"timeout-{uuid.uuid4().hex}"
        error, seen = raised(stack.slow, lambda: create(client, key, "sleep:2"))
        assert type(error) is stripe.APIError
        assert error.http_status == 504
        assert error.error is not None
        assert (error.error.type, error.error.code) == ("api_error", "outcome_unknown")
        assert error.headers is not None
        assert error.headers["stripe-should-retry"] == "false"
        assert_request_id(error)
        assert seen == {504: 1}
        replayed, seen_again = raised(stack.slow, lambda: create(client, key, "sleep:2"))
        assert (replayed.http_status, seen_again) == (504, {504: 1})
        assert replayed.headers is not None
        assert replayed.headers["idempotent-replayed"] == "true"
        assert replayed.headers["stripe-should-retry"] == "false"
        assert stack.upstream_attempts(key) == 1

    def test_an_unreachable_upstream_is_retried(self, stack: Stack) -> None:
        """502 upstream not reached (certainly not sent, the key freed): Stripe-Should-Retry:
        true, 3 attempts, then APIError code upstream_not_reached."""
        client = client_of(stack.dead_upstream)
        key = f"unreached-{uuid.uuid4().hex}"
        error, seen = raised(stack.dead_upstream, lambda: create(client, key))
        assert type(error) is stripe.APIError
        assert error.http_status == 502
        assert error.error is not None
        assert (error.error.type, error.error.code) == ("api_error", "upstream_not_reached")
        assert_request_id(error)
        assert seen == {502: 1 + RETRIES}

    def test_a_store_outage_is_retried(self, stack: Stack) -> None:
        """503 store unavailable (the key could not be checked, nothing ran): retried, then
        APIError code store_unavailable with Retry-After; the upstream never saw it."""
        client = client_of(stack.dead_store)
        key = f"store-{uuid.uuid4().hex}"
        error, seen = raised(stack.dead_store, lambda: create(client, key))
        assert type(error) is stripe.APIError
        assert error.http_status == 503
        assert error.error is not None
        assert (error.error.type, error.error.code) == ("api_error", "store_unavailable")
        assert error.headers is not None
        assert error.headers["retry-after"] == "1"
        assert_request_id(error)
        assert seen == {503: 1 + RETRIES}
        assert stack.upstream_attempts(key) == 0

    def test_a_shed_request_is_retried(self, stack: Stack) -> None:
        """503 load shed (one request in flight past max_in_flight): retried, then APIError
        code load_shed with the request's priority class."""
        client = client_of(stack.dead_store)
        hold_id = f"shed-{uuid.uuid4().hex}"

        def hold() -> None:
            """The one request in flight: sent again while it is shed itself, as it is when the
            previous test's last request has answered but not yet left the stack."""
            end = time.monotonic() + 10.0
            while time.monotonic() < end:
                held = httpx.get(f"{stack.dead_store.url}/v1/hold?id={hold_id}", timeout=30, trust_env=False)
                if held.status_code != 503:
                    return
                time.sleep(0.05)

        holder = threading.Thread(target=hold)
        holder.start()
        try:
            wait_for(lambda: stack.upstream_attempts(hold_id) == 1, "the held request upstream")
            error, seen = raised(stack.dead_store, lambda: create(client, f"shed-{hold_id}"))
        finally:
            stack.release(hold_id)
            holder.join(30)
        assert type(error) is stripe.APIError
        assert error.http_status == 503
        assert error.error is not None
        assert (error.error.code, error.error.priority) == ("load_shed", "default")
        assert_request_id(error)
        assert seen == {503: 1 + RETRIES}

