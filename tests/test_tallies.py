"""Hot-path tallies (gateway/tallies.py): what a request adds shows in every read of the metrics,
none of it is lost, and the histogram files each value where prometheus-client would."""

from __future__ import annotations

import asyncio
import threading

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram

from gateway.metrics import Metrics
from gateway.tallies import Tallies
from tests.asgi_helpers import poll

BOUNDS = (0.001, 0.01, 0.1, 1.0)


def registry_with_tallies() -> tuple[CollectorRegistry, Tallies, Counter, Histogram]:
    registry = CollectorRegistry(auto_describe=True)
    tallies = Tallies()
    registry.register(tallies)
    counter = Counter("hits", "hits", registry=registry)
    histogram = Histogram("took_seconds", "took", buckets=BOUNDS, registry=registry)
    return registry, tallies, counter, histogram


def test_a_registry_read_folds_what_is_pending() -> None:
    """Increments and observations are invisible to nobody: any read of the registry shows them."""
    registry, tallies, counter, histogram = registry_with_tallies()
    hits = tallies.counter(counter)
    took = tallies.histogram(histogram, BOUNDS)
    for _ in range(5):
        hits.inc()
    hits.inc(2.5)
    assert registry.get_sample_value("hits_total") == 7.5
    hits.inc()
    assert registry.get_sample_value("hits_total") == 8.5  # folded again, nothing counted twice
    for value in (0.0005, 0.001, 0.002, 0.5, 3.0):
        took.observe(value)
    assert registry.get_sample_value("took_seconds_count") == 5
    assert registry.get_sample_value("took_seconds_sum") == pytest.approx(3.5035)


@pytest.mark.parametrize("value", [0.0, 0.001, 0.0010001, 0.01, 0.05, 1.0, 1.5, 1e9])
def test_a_value_lands_in_the_bucket_prometheus_client_would_file_it_in(value: float) -> None:
    """Bucket boundaries are inclusive upper bounds, as Histogram.observe has them."""
    registry, tallies, _counter, histogram = registry_with_tallies()
    tallies.histogram(histogram, BOUNDS).observe(value)
    reference = CollectorRegistry()
    Histogram("took_seconds", "took", buckets=BOUNDS, registry=reference).observe(value)
    for le in (*BOUNDS, float("inf")):
        label = {"le": "+Inf" if le == float("inf") else str(le)}
        assert registry.get_sample_value("took_seconds_bucket", label) == reference.get_sample_value(
            "took_seconds_bucket", label), le


def test_a_read_on_another_thread_folds_nothing_and_loses_nothing() -> None:
    """A scrape rendered in a worker thread does not race the counting thread: it folds nothing,
    and the counts reach the registry on the next fold on the counting thread."""
    registry, tallies, counter, _histogram = registry_with_tallies()
    hits = tallies.counter(counter)
    hits.inc(3)
    seen: list[float | None] = []
    reader = threading.Thread(target=lambda: seen.append(registry.get_sample_value("hits_total")))
    reader.start()
    reader.join(10)
    assert seen == [0.0]
    assert hits.pending == 3
    tallies.fold()
    assert registry.get_sample_value("hits_total") == 3


async def test_folding_every_interval_moves_the_counts_without_a_read() -> None:
    """While the app runs, pending counts reach the children on a timer (what another worker's
    scrape reads under --workers N), and stopping folds once more."""
    _registry, tallies, counter, _histogram = registry_with_tallies()
    hits = tallies.counter(counter)
    tallies.fold_every(0.01)
    try:
        hits.inc(4)
        await poll(lambda: counter._value.get() == 4, deadline_s=5)
        hits.inc()
    finally:
        tallies.stop_folding()
    assert counter._value.get() == 5
    hits.inc()
    await asyncio.sleep(0.05)  # stopped: no timer folds any more
    assert counter._value.get() == 5


def test_the_stacks_metrics_read_current_counts() -> None:
    """Metrics binds one tally per labelled child, so two lookups count into one series."""
    metrics = Metrics(["p"])
    metrics.decision("p", "allow").inc()
    metrics.decision("p", "allow").inc()
    metrics.count_response(200)
    metrics.store_latency["ratelimit_take"].observe(0.0002)
    sample = metrics.registry.get_sample_value
    assert sample("gateway_ratelimit_decisions_total", {"policy": "p", "decision": "allow"}) == 2
    assert sample("gateway_requests_total", {"code": "200"}) == 1
    bucket = {"operation": "ratelimit_take", "le": "0.00025"}
    assert sample("gateway_store_latency_seconds_bucket", bucket) == 1
    assert b'gateway_requests_total{code="200"} 1.0' in metrics.exposition()
