"""The shipped example config is valid and means what its comments say."""

from __future__ import annotations

from pathlib import Path

from gateway import load_config
from gateway.cli import main

EXAMPLE = Path(__file__).resolve().parents[1] / "deploy" / "gateway.example.toml"


def test_example_config_passes_check() -> None:
    """`gateway check deploy/gateway.example.toml` exits 0."""
    assert main(["check", str(EXAMPLE)]) == 0


def test_example_config_values() -> None:
    """The example's policies load in order with the documented meaning."""
    config = load_config(EXAMPLE, env={})
    assert [p.name for p in config.rate_limits] == ["per-client", "writes", "fleet"]
    per_client, writes, fleet = config.rate_limits
    assert (per_client.limit, per_client.period_ms, per_client.burst) == (100, 60_000, 20)
    assert writes.methods == frozenset({"POST", "PUT", "PATCH", "DELETE"})
    assert writes.paths == ("/v1",)
    assert (fleet.key, fleet.on_store_error, fleet.period_ms) == ("global", "deny", 1000)
    assert config.identity.trusted_proxies == ("10.0.0.0/8",)
    assert config.store.url == "redis://127.0.0.1:6379/0"
