"""payments: ``POST /charges`` with an Idempotency-Key, the way clients of a payment API retry.

Each iteration takes a new key and a new body, then (by the user's seeded generator):

- ``P_BURST``: a duplicate burst: ``BURST_SIZE`` requests with that key at once (greenlets of
  this user, its connection pool sized for them). Exactly one runs (a fresh 201); the others get
  ``409`` with ``Retry-After`` or, once it completed, its replay. A retry afterwards is a replay.
- otherwise one request, a fresh 201, and then
  ``P_RETRY``: one or two retries with the same body: each the same 201, byte for byte, with
  ``Idempotent-Replayed: true``;
  ``P_REUSE``: the key again with another body: ``422``.

What the users see is written to the journal (the answer kinds per key, the violations); the
runner then checks the upstream's own record: no key executed twice, every key answered 201
executed exactly once. Expected refusals (409, 422) are successes to Locust.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from gevent.pool import Group  # type: ignore[import-untyped]
from locust import task

from loadtests.plan import CHARGE_BURST, CHARGE_NEW, CHARGE_RETRY, CHARGE_REUSE
from loadtests.scenarios.common import JOURNAL, GatewayUser, header

__all__ = ["BURST_SIZE", "PaymentUser"]

P_BURST, P_RETRY, P_REUSE = 0.2, 0.3, 0.1
BURST_SIZE = 5
BURST_WAIT_S = 30.0  # bound on one burst: each request is bounded by the user's timeouts anyway


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    replayed: bool
    body: bytes
    retry_after: str | None

    @property
    def kind(self) -> str:
        if 200 <= self.status < 300:
            return "replayed" if self.replayed else "fresh"
        return {409: "conflict", 422: "mismatch"}.get(self.status, "other")


class PaymentUser(GatewayUser):
    """One payment per iteration, retried, duplicated or reused as a real client might."""

    concurrency = BURST_SIZE + 1  # the burst's requests each need a connection of their own

    @task
    def pay(self) -> None:
        key = f"lt-{self.index}-{self.rng.getrandbits(64):016x}"
        body = self._body()
        JOURNAL.key_sent(key)
        roll = self.rng.random()
        if roll < P_BURST:
            self._burst(key, body)
            return
        JOURNAL.count("new")
        first = self._send(key, body, CHARGE_NEW)
        if first.kind != "fresh" or first.status != 201:
            JOURNAL.violation("first_not_fresh", f"{key}: first request got {first.status} "
                              f"(replayed={first.replayed})")
            return
        if roll < P_BURST + P_RETRY:
            for _ in range(self.rng.randint(1, 2)):
                JOURNAL.count("retry")
                self._check_replay(key, self._send(key, body, CHARGE_RETRY), first)
        elif roll < P_BURST + P_RETRY + P_REUSE:
            JOURNAL.count("reuse")
            other = self._send(key, self._body(), CHARGE_REUSE)
            if other.status != 422:
                JOURNAL.violation("reuse_not_422", f"{key}: another body got {other.status}")

    def _body(self) -> str:
        charge = {"amount": self.rng.randint(100, 99_999), "currency": "eur",
                  "customer": f"cus_{self.index}", "nonce": self.rng.getrandbits(32)}
        return json.dumps(charge)

    def _burst(self, key: str, body: str) -> None:
        JOURNAL.count("burst")
        group = Group()
        greenlets = [group.spawn(self._send, key, body, CHARGE_BURST) for _ in range(BURST_SIZE)]
        try:
            group.join(timeout=BURST_WAIT_S)
        finally:
            group.kill(block=False)  # only ever acts when the user is stopped mid-burst
        answers: list[Answer] = [g.value for g in greenlets if g.successful()]
        fresh = [a for a in answers if a.kind == "fresh"]
        if len(answers) == BURST_SIZE and len(fresh) != 1:
            JOURNAL.violation("burst_not_one_fresh", f"{key}: {len(fresh)} fresh answers of "
                              f"{[a.status for a in answers]}")
        for answer in answers:
            if answer.kind == "conflict" and not answer.retry_after:
                JOURNAL.violation("conflict_without_retry_after", f"{key}: 409 without Retry-After")
            elif answer.kind not in ("fresh", "replayed", "conflict"):
                JOURNAL.violation("burst_unexpected", f"{key}: {answer.status} in a burst")
        if len(fresh) == 1:
            for answer in answers:
                if answer.kind == "replayed":
                    self._check_replay(key, answer, fresh[0])
            JOURNAL.count("retry")
            self._check_replay(key, self._send(key, body, CHARGE_RETRY), fresh[0])

    def _check_replay(self, key: str, answer: Answer, first: Answer) -> None:
        if answer.kind == "fresh":
            JOURNAL.violation("ran_again", f"{key}: a retry was answered by a new execution")
        elif answer.kind != "replayed":
            JOURNAL.violation("replay_missing", f"{key}: a retry got {answer.status}")
        elif answer.status != first.status or answer.body != first.body:
            JOURNAL.violation("replay_differs", f"{key}: replay {answer.status} "
                              f"{answer.body[:80]!r} vs {first.status} {first.body[:80]!r}")

    def _send(self, key: str, body: str, name: str) -> Answer:
        headers = {"Idempotency-Key": key, "Content-Type": "application/json",
                   "X-Api-Key": f"lt-payer-{self.index}"}
        with self.client.post("/charges", data=body, headers=headers, name=name,
                              catch_response=True) as response:
            answer = Answer(status=response.status_code,
                            replayed=header(response.headers, "Idempotent-Replayed") == "true",
                            body=response.content or b"",
                            retry_after=header(response.headers, "Retry-After"))
            JOURNAL.key_answer(key, answer.kind)
            if answer.status in (409, 422):
                response.success()  # the gateway refusing a duplicate is the point
            elif answer.status != 201:
                response.failure(f"unexpected status {answer.status}")
        return answer
