"""One JSON object per line for the gateway's log records; installed by the CLI only.

The library logs through ``logging.getLogger("gateway.<module>")`` with structured ``extra``
fields (``event``, ``request_id``, ...) and never configures logging itself (DESIGN.md). A
record without a ``request_id`` gets the id of the request being handled here, so layers that
know nothing of HTTP (the store) still log under it without importing the request id.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from gateway.requestid import current_request_id, current_request_line

__all__ = ["JsonFormatter", "install_json_logging", "uvicorn_log_config"]

# attributes every LogRecord has; anything else on a record came from `extra=`
_ACCESS = "uvicorn.access"
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """``{"ts": ..., "level": ..., "logger": ..., "message": ..., <extra fields>}``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if "request_id" not in out:
            rid = current_request_id()
            if rid is not None:
                out["request_id"] = rid
        if "method" not in out:
            line = current_request_line()
            if line is not None:  # the request being handled: what a denial, a refusal... was about
                out["method"], out["path"] = line
        if record.name == _ACCESS and isinstance(record.args, tuple) and len(record.args) == 5:
            # uvicorn's access line: (client, method, path with query, HTTP version, status)
            client, method, path, version, status = record.args
            out.update(event="http.access", client=client, method=method, path=path, http_version=version,
                       status=status)
        if record.exc_info and record.exc_info[0] is not None:
            out["error_type"] = record.exc_info[0].__name__
        return json.dumps(out, default=str, separators=(",", ":"))


def install_json_logging(level: int = logging.INFO) -> None:
    """Send the ``gateway`` loggers to stderr as JSON lines (idempotent)."""
    logger = logging.getLogger("gateway")
    if any(isinstance(h.formatter, JsonFormatter) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def uvicorn_log_config(level: str = "WARNING", *, access_log: bool = False) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for uvicorn's own loggers: JSON lines on stderr too, so
    everything the server writes there is one JSON object per line. ``access_log``: one line per
    response (``event: "http.access"``, at INFO whatever ``level`` is)."""
    levels = {"uvicorn": level, "uvicorn.error": level, "uvicorn.access": "INFO" if access_log else level}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": f"{__name__}.JsonFormatter"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json",
                                "stream": "ext://sys.stderr"}},
        "loggers": {
            name: {"handlers": ["stderr"], "level": named, "propagate": False}
            for name, named in levels.items()
        },
    }
