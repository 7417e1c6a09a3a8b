"""The client side's record of a run, kept by the Locust users and read by the runner's checks.

Locust's own statistics say how fast; the journal says what each answer meant: per API key the
allowed and denied requests and the window they were sent in, per Idempotency-Key what came
back (a fresh 201, a replay, a 409, a 422), the violations the users saw on the wire, when a
phase began (``marks``), and a fine latency histogram (10 microsecond ticks; Locust rounds to
whole milliseconds below 100 ms, too coarse for a gateway that adds about one). Written as JSON
at test stop.

Pure Python, no Locust: the unit tests build journals by hand.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["MAX_EXAMPLES", "TICK_MS", "Journal", "percentile"]

TICK_MS = 0.01  # latency histogram resolution: 10 microseconds
MAX_EXAMPLES = 20  # violations are counted; only the first few are described
MAX_TICK = 6_000_000  # 60 s: a longer response time is clamped into the last tick


class Journal:
    """What the users saw, in plain dicts and Counters (one Locust process, one journal)."""

    def __init__(self) -> None:
        self.latency: dict[str, Counter[int]] = {}
        self.api_keys: dict[str, dict[str, float]] = {}
        self.keys: dict[str, dict[str, int]] = {}
        self.counts: Counter[str] = Counter()
        self.violations: Counter[str] = Counter()
        self.examples: list[str] = []
        self.marks: dict[str, float] = {}

    # ------------------------------------------------------------------ latency
    def latency_ms(self, name: str, ms: float) -> None:
        ticks = min(MAX_TICK, max(0, round(ms / TICK_MS)))
        self.latency.setdefault(name, Counter())[ticks] += 1

    # ------------------------------------------------------------------ rate limits
    def rate(self, api_key: str, outcome: str, sent: float, received: float) -> None:
        """One answer for ``api_key``: outcome ``allowed``, ``denied`` or ``other``; ``sent`` and
        ``received`` are monotonic seconds (only their differences mean anything)."""
        rec = self.api_keys.get(api_key)
        if rec is None:
            rec = self.api_keys[api_key] = {"allowed": 0, "denied": 0, "other": 0,
                                            "first_sent": sent, "last_received": received}
        rec[outcome] += 1
        rec["first_sent"] = min(rec["first_sent"], sent)
        rec["last_received"] = max(rec["last_received"], received)

    # ------------------------------------------------------------------ idempotency
    def key_sent(self, key: str) -> None:
        """Registered before the first request with ``key`` leaves, so any execution the
        upstream records is of a key the clients know."""
        self.keys.setdefault(key, {"fresh": 0, "replayed": 0, "conflict": 0, "mismatch": 0,
                                   "other": 0})

    def key_answer(self, key: str, kind: str) -> None:
        """``kind``: fresh (2xx, not a replay), replayed, conflict (409), mismatch (422), other."""
        self.key_sent(key)
        self.keys[key][kind] += 1

    # ------------------------------------------------------------------ bookkeeping
    def count(self, what: str, n: int = 1) -> None:
        self.counts[what] += n

    def mark(self, what: str, at: float) -> None:
        """When something first happened (``time.time()``, which the runner's clock shares), e.g.
        the overload scenario's ``flood_started``; later marks of the same name are ignored."""
        self.marks.setdefault(what, at)

    def violation(self, kind: str, detail: str) -> None:
        self.violations[kind] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{kind}: {detail}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "latency_ticks_ms": TICK_MS,
            "latency": {name: {str(t): n for t, n in sorted(c.items())}
                        for name, c in self.latency.items()},
            "api_keys": self.api_keys,
            "keys": self.keys,
            "counts": dict(self.counts),
            "violations": dict(self.violations),
            "examples": self.examples,
            "marks": self.marks,
        }

    def write(self, path: str | Path) -> None:
        """Write atomically: the runner never reads half a journal."""
        target = Path(path)
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict()))
        tmp.replace(target)


def percentile(histogram: Mapping[int, int] | Mapping[str, int], p: float,
               tick_ms: float = TICK_MS) -> float | None:
    """The nearest-rank ``p`` percentile (0 < p <= 100) of a tick histogram, in ms; None if empty."""
    items = sorted((int(t), n) for t, n in histogram.items() if n > 0)
    total = sum(n for _, n in items)
    if total == 0:
        return None
    rank = max(1, math.ceil(p / 100 * total))
    seen = 0
    for ticks, n in items:
        seen += n
        if seen >= rank:
            return round(ticks * tick_ms, 3)
    return round(items[-1][0] * tick_ms, 3)  # unreachable: seen reaches total
