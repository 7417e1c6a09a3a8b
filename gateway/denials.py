"""LocalDenials: a client the store just denied is answered 429 here, without a store call,
until the store could allow it again (DESIGN.md: "a denied client cached locally until its
Retry-After, as Envoy does").

Why it is exact: a denying bucket gains tokens only by refilling at its rate, so from the
store's decision until ``wait_ms`` later it denies that request again, whatever other traffic
does. The entry lasts until the *first* of the request's denying buckets could pay, measured
from when the call was sent (the store decided no earlier), so it never outlives the store's
own answer (less 1 ms for the store's whole-millisecond clock and 0.1 % for clock rates).
The one way tokens come back sooner, a Redis Cluster refund of a concurrent request
that another slot denied, can make a local 429 come a little early; that is the cost of not
asking. Replies are aged on the local clock: ``wait_ms`` and ``full_ms`` shrink by the time
passed, so ``Retry-After`` and ``RateLimit`` stay true; a bucket's ``remaining`` is the count
at the denial, a lower bound (it can only have grown).

Only enforced denials are remembered: a shadow policy (``mode = "shadow"``) never refuses, so
a request only a shadow policy would deny is never answered here, and a shadow bucket's wait
does not shorten an entry.

Per process, bounded: at most ``max_entries``; when full, expired entries go first, then the
oldest.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from gateway.store import BucketState, RateDecision

__all__ = ["MAX_ENTRIES", "LocalDenials"]

#: Denied clients remembered per process by default.
MAX_ENTRIES = 10_000


class LocalDenials:
    """Store denials, remembered until they could end.

    Args:
        max_entries: how many denied (plan, client) pairs are remembered at once.
    """

    __slots__ = ("_max", "entries")

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self._max = max_entries
        # key -> (until, sent_at, decision); insertion order is age order
        # (public: empty means nothing is remembered, a check the hot path makes without a call)
        self.entries: dict[Hashable, tuple[float, float, RateDecision]] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def remember(
        self, key: Hashable, decision: RateDecision, sent_at: float, *, among: Sequence[int] | None = None
    ) -> None:
        """Note a denial of ``key`` by the store, for a call sent at ``sent_at`` (loop clock).

        ``among``: the buckets that can deny (the enforced ones); a shadow bucket never refuses,
        so its wait neither makes nor bounds an entry. All of them when None."""
        buckets = decision.buckets if among is None else [decision.buckets[i] for i in among]
        waits = [b.wait_ms for b in buckets if b.wait_ms > 0]
        if not waits:
            return  # no bucket says how long: nothing to answer locally
        entries = self.entries
        entries.pop(key, None)  # re-inserted as the newest
        if len(entries) >= self._max:
            self._evict(sent_at)
        wait_ms = min(waits)
        # the store's clock counts whole ms (up to 1 ms early) and need not run at exactly our
        # clock's rate: end a little before, never after
        entries[key] = (sent_at + (wait_ms - 1 - wait_ms // 1000) / 1000, sent_at, decision)

    def answer(self, key: Hashable, now: float) -> RateDecision | None:
        """The store's denial of ``key`` aged to ``now``, while it still holds; else None."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        until, sent_at, decision = entry
        if now >= until:
            del self.entries[key]
            return None
        elapsed_ms = int((now - sent_at) * 1000)
        return RateDecision(
            False,
            decision.now_ms + elapsed_ms,
            tuple(
                # a shadow bucket's wait may end before the entry does: then it shows 0, it has
                # its cost again (an enforced denying bucket's wait outlasts the entry)
                BucketState(b.remaining, max(0, b.full_ms - elapsed_ms), max(0, b.wait_ms - elapsed_ms))
                for b in decision.buckets
            ),
        )

    def _evict(self, now: float) -> None:
        entries = self.entries
        for key in [k for k, (until, _, _) in entries.items() if until <= now]:
            del entries[key]
        excess = len(entries) - self._max + 1
        if excess > 0:
            for key in list(entries)[:excess]:
                del entries[key]
