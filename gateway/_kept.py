"""``Kept``: what a hot path remembers about recent requests, bounded by emptying when full.

Framed store commands per client, identity tags per key value, normal paths and valid hosts:
each is a pure function of its key, recomputed on a miss, so forgetting all of it at once is
only a cost, never a wrong answer. Emptying when full (instead of evicting one entry at a time)
keeps a hit a plain ``dict.get`` at C speed, and a flood of new keys costs what it would cost
without the memory, with the memory never past ``limit`` entries.
"""

from __future__ import annotations

from typing import TypeVar

__all__ = ["Kept"]

_K = TypeVar("_K")
_V = TypeVar("_V")


class Kept(dict[_K, _V]):
    """A dict of at most ``limit`` entries: ``get`` to look, ``keep`` to remember."""

    __slots__ = ("limit",)

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def keep(self, key: _K, value: _V) -> _V:
        """Remember ``value`` under ``key`` (emptied first when full); ``value`` again."""
        if len(self) >= self.limit:
            self.clear()
        self[key] = value
        return value
