"""Hot-path counting: plain numbers per request, folded into the Prometheus children when read.

Why: a prometheus-client ``Counter.inc`` takes a lock and checks the metric's state (~0.5 µs), a
``Histogram.observe`` does that twice and walks the buckets in Python (~1 µs); a request through
the whole stack made five of them, more than the identity, key and framing work of its decision.
Here a request adds to a Python int (a histogram: one ``bisect`` into a list of ints), and the
pending amounts go into the real children only when somebody looks:

* whenever the registry is read on the thread that counts (a scrape answered in-process, a
  test's ``get_sample_value``): ``Tallies`` is registered first in the registry as a collector
  whose ``collect`` folds and yields nothing, so every collector after it sees current values;
* before ``/_gateway/metrics`` renders in a worker thread (``Metrics.exposition`` is called
  there; the ops layer folds on the event loop first, ``Metrics.fold``);
* once a second while the app runs (``Tallies.fold_every``, started by the stack's lifespan), so
  that under ``--workers N`` (prometheus-client's multiprocess files) the scrape any worker
  answers shows every worker's counts at most that old.

Counting and folding happen on the event loop's thread only: a fold from another thread is not
done (the pending amounts wait for the next fold on the right thread), so no increment is lost
to a race between ``+=`` and the fold's reset.
"""

from __future__ import annotations

import asyncio
import threading
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import Counter, Histogram
    from prometheus_client.metrics_core import Metric

__all__ = ["CounterTally", "HistogramTally", "Tallies"]


class CounterTally:
    """A ``Counter`` child's increments, pending until the next fold."""

    __slots__ = ("_child", "pending")

    def __init__(self, child: Counter) -> None:
        self._child = child
        self.pending: float = 0

    def inc(self, amount: float = 1) -> None:
        self.pending += amount

    def fold(self) -> None:
        pending = self.pending
        if pending:
            self.pending = 0
            self._child.inc(pending)


class HistogramTally:
    """A ``Histogram`` child's observations, pending until the next fold: a count per bucket
    (the first bucket whose upper bound is at least the value, as prometheus-client files it)
    and the sum."""

    __slots__ = ("_bounds", "_child", "counts", "total")

    def __init__(self, child: Histogram, bounds: Sequence[float]) -> None:
        self._child = child
        self._bounds = (*bounds, float("inf"))
        self.counts = [0] * len(self._bounds)
        self.total = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self._bounds, amount)] += 1
        self.total += amount

    def fold(self) -> None:
        counts = self.counts
        if not any(counts):
            return
        total, self.total = self.total, 0.0
        self.counts = [0] * len(counts)
        child: Any = self._child  # its per-bucket values are prometheus-client's own, not API
        child._sum.inc(total)
        for bucket, n in zip(child._buckets, counts, strict=True):
            if n:
                bucket.inc(n)


class Tallies:
    """Every tally of one ``Metrics``, and the folding of them (a collector that yields nothing)."""

    def __init__(self) -> None:
        self._tallies: list[CounterTally | HistogramTally] = []
        self._thread = threading.get_ident()
        self._timer: asyncio.TimerHandle | None = None

    def counter(self, child: Counter) -> CounterTally:
        tally = CounterTally(child)
        self._tallies.append(tally)
        return tally

    def histogram(self, child: Histogram, bounds: Sequence[float]) -> HistogramTally:
        tally = HistogramTally(child, bounds)
        self._tallies.append(tally)
        return tally

    def fold(self) -> None:
        """Move every pending amount into its child (on the counting thread; elsewhere a no-op)."""
        if threading.get_ident() != self._thread:
            return
        for tally in self._tallies:
            tally.fold()

    def collect(self) -> Iterator[Metric]:
        """The registry reads its collectors in order and this one is first: fold, show nothing."""
        self.fold()
        return iter(())

    def fold_every(self, interval_s: float) -> None:
        """Fold every ``interval_s`` on the running loop until ``stop_folding``."""
        self._thread = threading.get_ident()
        loop = asyncio.get_running_loop()

        def tick() -> None:
            self.fold()
            self._timer = loop.call_later(interval_s, tick)

        self.stop_folding()
        self._timer = loop.call_later(interval_s, tick)

    def stop_folding(self) -> None:
        """Stop the periodic fold, folding once more."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.fold()
