"""Path prefixes matched by segment: ``/api`` is /api and /api/..., never /apiary."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["PathPrefixes"]


class PathPrefixes:
    """A compiled set of path prefixes (``[[rate_limit]].paths``, ``required_paths``)."""

    __slots__ = ("_prefixes", "everything")

    def __init__(self, paths: Iterable[str]) -> None:
        paths = tuple(paths)
        self.everything = "/" in paths
        self._prefixes = tuple((p, p + "/") for p in paths)

    def __bool__(self) -> bool:
        return bool(self._prefixes)

    def matches(self, path: str) -> bool:
        if self.everything:
            return True
        return any(path == p or path.startswith(ps) for p, ps in self._prefixes)
