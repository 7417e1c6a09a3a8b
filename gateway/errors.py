"""The gateway's exceptions: one tree, so callers catch what they mean.

    GatewayError
    ├── ConfigError (ValueError)      every problem of a config at once, each naming its key
    └── StoreError                    the store could not decide; the caller applies on_store_error
        ├── StoreUnavailable          no connection, or it broke (refused, reset, pool exhausted)
        │   ├── StoreUnanswered       sent, but no answer came: the call may have run
        │   │   └── StoreTimeout      no answer within store.timeout
        │   └── StoreCircuitOpen      not even tried: the circuit breaker is open (a recent outage)
        └── StoreScriptError          the store answered with an error (a bug or a foreign key type)

Foreign exceptions (redis-py, fakeredis, OSError) are translated into these at one boundary,
``gateway/store/redis.py``; nothing above it sees them.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "GatewayError",
    "StoreCircuitOpen",
    "StoreError",
    "StoreScriptError",
    "StoreTimeout",
    "StoreUnanswered",
    "StoreUnavailable",
]


class GatewayError(Exception):
    """Base of every exception the gateway raises on purpose."""


class ConfigError(GatewayError, ValueError):
    """A configuration is invalid.

    ``problems`` holds one line per problem, each starting with the key it concerns, e.g.
    ``rate_limit[1].period: expected a duration like "2s", got "fast"``.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(self.problems))


class StoreError(GatewayError):
    """The store could not make a decision."""


class StoreUnavailable(StoreError):
    """The store could not be reached, or the connection broke."""


class StoreUnanswered(StoreUnavailable):
    """The call was sent but no answer came back (the connection broke or time ran out): it
    may have run in the store, so a caller holding a claim must treat it as possibly granted."""


class StoreTimeout(StoreUnanswered):
    """The store did not answer within ``store.timeout``."""


class StoreCircuitOpen(StoreUnavailable):
    """The store was not called: after repeated failures the circuit breaker fails calls fast
    until its cool-down ends (``gateway/store/breaker.py``)."""


class StoreScriptError(StoreError):
    """The store answered a script call with an error."""
