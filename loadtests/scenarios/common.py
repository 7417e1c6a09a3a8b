"""What every scenario's users share: the run's plan, the journal, the base user, header checks.

The plan and the journal are per process on purpose: one Locust process runs one scenario, its
users are greenlets of that process, and the journal is written once at test stop
(``loadtests/locustfile.py``). Every network wait is bounded by the user's timeouts.
"""

from __future__ import annotations

import functools
import itertools
import os
import random
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from locust import FastHttpUser, constant

from loadtests.journal import Journal
from loadtests.plan import Plan

__all__ = ["JOURNAL", "GatewayUser", "current_plan", "header", "missing_fields"]

#: The run's journal: written to ``Plan.journal_path`` when the test stops.
JOURNAL = Journal()


@functools.cache
def current_plan() -> Plan:
    return Plan.from_env(os.environ)


def header(headers: Mapping[str, Any] | None, name: str) -> str | None:
    """One response header (geventhttpclient's headers are case-insensitive)."""
    if headers is None:
        return None
    value = headers.get(name)
    return None if value is None else str(value)


def missing_fields(headers: Mapping[str, Any] | None, names: Iterable[str]) -> list[str]:
    return [name for name in names if not header(headers, name)]


class GatewayUser(FastHttpUser):
    """A user aimed at the gateway (``--host``), with no think time and bounded network waits.

    ``index`` numbers the users of each class from 0, so API keys spread evenly; ``rng`` is the
    user's own generator, seeded from ``--seed`` and the index (a run's choices repeat)."""

    abstract = True
    wait_time = constant(0)
    network_timeout = 10.0
    connection_timeout = 5.0
    _numbers: ClassVar[itertools.count[int]] = itertools.count()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._numbers = itertools.count()  # each class numbers its own users

    def on_start(self) -> None:
        self.index = next(type(self)._numbers)
        self.rng = random.Random(f"{current_plan().seed}-{type(self).__name__}-{self.index}")
