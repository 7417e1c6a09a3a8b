"""JSON log lines carry the request they were written under, even from layers that know no HTTP."""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

from gateway.logs import JsonFormatter
from gateway.requestid import _request

STORE_DIR = Path(__file__).resolve().parent.parent / "gateway" / "store"
# what the store may import from the gateway: its own package, errors, config, metrics, private helpers
_STORE_MAY_IMPORT = ("gateway.store", "gateway.errors", "gateway.config", "gateway.metrics",
                     "gateway.tallies", "gateway._")


def _line(record: logging.LogRecord) -> dict[str, object]:
    out: dict[str, object] = json.loads(JsonFormatter().format(record))
    return out


def _record(**extra: object) -> logging.LogRecord:
    record = logging.LogRecord("gateway.store", logging.WARNING, __file__, 1, "refund failed", (), None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_a_record_without_a_request_id_gets_the_current_one() -> None:
    token = _request.set((b"rid-123", None))
    try:
        assert _line(_record(event="ratelimit.refund_failed"))["request_id"] == "rid-123"
        assert _line(_record(request_id="given"))["request_id"] == "given"  # the record's own wins
    finally:
        _request.reset(token)
    assert "request_id" not in _line(_record())  # outside a request: none made up


def test_the_store_imports_nothing_of_http() -> None:
    """The store decides; request ids, problems and the proxy belong to the layers above it."""
    for path in sorted(STORE_DIR.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gateway"):
                assert node.module.startswith(_STORE_MAY_IMPORT), f"{path.name} imports {node.module}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("gateway") or alias.name.startswith(_STORE_MAY_IMPORT), \
                        f"{path.name} imports {alias.name}"


def test_without_logging_configured_the_library_writes_no_bare_lines() -> None:
    """A warning of the library's, in a process that configured no logging, is not printed by
    Python's last-resort handler as a bare line on stderr."""
    import subprocess
    import sys

    code = ("import logging, gateway; "
            "logging.getLogger('gateway.idempotency').warning('the request ended without a whole response')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          check=True)
    assert done.stderr == ""
