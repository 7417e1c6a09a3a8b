"""The README's two fresh-machine commands stay true: CI runs the very test command it shows."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CI = (ROOT / ".ci" / "run").read_text()


def indented_commands(text: str) -> list[str]:
    """The 4-space-indented one-line blocks of the README (its shell commands)."""
    return [m.group(1) for m in re.finditer(r"\n\n    (\S[^\n]*)\n\n", text)]


def test_ci_runs_the_readme_test_command() -> None:
    """The last command .ci/run executes is, character for character, the README's test command."""
    ci_command = [ln for ln in CI.splitlines() if ln.strip() and not ln.startswith("#")][-1]
    assert ci_command in indented_commands(README)
    assert ci_command.endswith("-m pytest")
    assert "bash .ci/run" in indented_commands(README)


def test_ci_fails_instead_of_skipping_without_redis() -> None:
    """CI exports CI=true (a missing redis-server fails the suite) and stops on the first error."""
    assert "set -euo pipefail" in CI
    assert "export CI=true" in CI
    assert os.access(ROOT / ".ci" / "run", os.X_OK)


def test_readme_demo_command_installs_and_runs_the_demo() -> None:
    """The first command installs the package into a fresh venv and runs `gateway demo`."""
    demo = [c for c in indented_commands(README) if c.endswith("gateway demo")]
    assert demo == ["python3 -m venv .venv && .venv/bin/pip install -q -e . && .venv/bin/gateway demo"]


def test_readme_metric_table_is_what_the_gateway_exports() -> None:
    """The README's metric table names exactly the families /_gateway/metrics exposes."""
    from prometheus_client.parser import text_string_to_metric_families

    from gateway.metrics import Metrics

    section = README.split("## Operations", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(gateway_[a-z_]+)` \|", section, re.MULTILINE))
    exposed = set()
    for family in text_string_to_metric_families(Metrics(["p"]).exposition().decode()):
        if not family.name.endswith("_created"):  # prometheus_client's own series (off under serve)
            exposed.add(family.name + ("_total" if family.type == "counter" else ""))
    assert documented == exposed
