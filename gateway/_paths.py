"""Request paths: the normal form the gateway forwards, and the form every path matcher compares.

Two views of one path, so that what the gateway decides on is never narrower than what an
upstream may make of the same bytes:

* ``normal_target(raw_path)``: the request target as the gateway forwards it (RFC 3986 §6.2.2):
  percent-encoded unreserved characters decoded (``%2e`` is ``.``), runs of ``/`` merged (as
  nginx and Envoy's ``merge_slashes`` do), then dot segments removed (§5.2.4). Other escapes
  stay as sent: an encoded ``/`` (``%2F``) is one segment to the upstream, and matched as the
  ``/`` an upstream that decodes it would see. A ``\\`` (raw or ``%5C``: a separator to some
  servers), an encoded NUL or a malformed escape has no one meaning across servers: refused.
* ``match_form(path)``: what ``paths`` and ``required_paths`` are compared with: the decoded
  path (``%2F`` counts as ``/``), and looser still: ASCII case folded and each segment's
  ``;params`` cut before dot segments are removed, since upstreams that match case-insensitively
  or drop path parameters (``/x/..;/pay``) exist. A matcher may then count more requests than
  the upstream routes to its prefix, never fewer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["PathPrefixes", "is_pattern", "match_form", "normal_target"]

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")
# an encoded \ or NUL, a raw \, or a % not followed by two hex digits
_AMBIGUOUS = re.compile(rb"%(?:5[Cc]|00)|\\|%(?![0-9A-Fa-f]{2})")
_NEEDS_WORK = re.compile(rb"%|//|/\.|\\")


def normal_target(raw_path: bytes) -> bytes | None:
    """``raw_path`` in normal form (itself when already normal), or None when it is refused."""
    if not raw_path.startswith(b"/"):
        return raw_path if raw_path == b"*" else None  # OPTIONS *; anything else is not a path
    if not _NEEDS_WORK.search(raw_path):
        return raw_path
    if _AMBIGUOUS.search(raw_path):
        return None
    decoded = _ESCAPE.sub(_decode_unreserved, raw_path)
    normal = _remove_dot_segments(_merge_slashes(decoded.decode("latin-1"))).encode("latin-1")
    return raw_path if normal == raw_path else normal


def match_form(path: str) -> str:
    """The form a path matcher compares: case folded, ``;params`` cut, normal segments."""
    folded = path.lower()
    if ";" in folded:
        folded = "/".join(segment.partition(";")[0] for segment in folded.split("/"))
    if "//" in folded or "/." in folded:
        folded = _remove_dot_segments(_merge_slashes(folded))
    return folded


def _decode_unreserved(match: re.Match[bytes]) -> bytes:
    byte = int(match.group(1), 16)
    return bytes((byte,)) if byte in _UNRESERVED else match.group(0)


def _merge_slashes(path: str) -> str:
    while "//" in path:  # bounded: each pass shortens the path
        path = path.replace("//", "/")
    return path


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 on an absolute path: ``/a/./b/../c`` is ``/a/c``; never above ``/``."""
    out: list[str] = []
    segments = path.split("/")[1:]
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == ".":
            if last:
                out.append("")
        elif segment == "..":
            if out:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(segment)
    return "/" + "/".join(out)


class _Wild:
    """A pattern token: ``ANY`` stands for one segment, ``REST`` for any number (0 or more)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


_ANY = _Wild("ANY")
_REST = _Wild("REST")
_Token = str | _Wild


def is_pattern(path: str) -> bool:
    """Whether a ``paths`` entry is a segment pattern (``*`` or ``{name}`` segments)."""
    return "*" in path or "{" in path


def _compile(pattern: str) -> tuple[_Token, ...]:
    """A pattern as tokens: a literal segment (in match form), or a wildcard. A wildcard matches
    one segment, or several: an encoded slash (``%2F``) is one segment to some upstreams and two
    in the decoded path matchers compare, so to cover the request either way it may span more
    (never fewer requests). The pattern is a prefix, as a plain entry is: ``REST`` closes it."""
    tokens: list[_Token] = []
    for segment in match_form(pattern).split("/")[1:]:
        if segment == "*" or (segment.startswith("{") and segment.endswith("}")):
            tokens += (_ANY, _REST)
        elif segment:
            tokens.append(segment)
    tokens.append(_REST)
    return tuple(tokens)


def _glob(tokens: tuple[_Token, ...], segments: list[str]) -> bool:
    """Whether ``tokens`` match all of ``segments``: the wildcard matching of shells, over
    segments, backtracking only to the last ``REST`` (O(len(tokens) * len(segments)), no regex
    to blow up on a path of thousands of segments)."""
    i = j = 0
    star = -1
    mark = 0
    n, m = len(tokens), len(segments)
    while j < m:  # bounded: each pass moves j forward, or moves mark (and j) forward
        token = tokens[i] if i < n else None
        if token is _REST:
            star, mark = i, j
            i += 1
        elif token is not None and (token is _ANY or token == segments[j]):
            i += 1
            j += 1
        elif star >= 0:
            i = star + 1
            mark += 1
            j = mark
        else:
            return False
    while i < n and tokens[i] is _REST:
        i += 1
    return i == n


class PathPrefixes:
    """A compiled set of paths (``[[rate_limit]].paths``, ``required_paths``...), matched by
    segment on the ``match_form`` of both sides.

    A plain entry is a prefix: ``/api`` is /api and /api/..., never /apiary. A pattern has
    wildcard segments, ``*`` or ``{name}`` (``/v1/charges/*/capture``, ``/users/{id}``), each
    standing for one segment (or more, see ``_compile``), and is a prefix too: it matches the
    paths it names and those below them (``/users/{id}`` is /users/7 and /users/7/orders, never
    /users). ``exempt``: paths (plain or patterns) taken back out of the set."""

    __slots__ = ("_all", "_exempt", "_patterns", "_prefixes", "everything")

    def __init__(self, paths: Iterable[str], exempt: Iterable[str] = ()) -> None:
        paths = tuple(paths)
        plain = tuple(match_form(p) for p in paths if not is_pattern(p))
        self._patterns = tuple(_compile(p) for p in paths if is_pattern(p))
        self._all = "/" in plain
        self._prefixes = tuple((p, p.rstrip("/") + "/") for p in plain)
        exempt = tuple(exempt)
        self._exempt = PathPrefixes(exempt) if exempt else None
        #: every path, none exempt: no need to look at the path at all
        self.everything = self._all and self._exempt is None

    def __bool__(self) -> bool:
        return bool(self._prefixes or self._patterns)

    def matches(self, path: str) -> bool:
        return self.everything or self.matches_form(match_form(path))

    def matches_form(self, form: str) -> bool:
        """``matches`` for a path already in ``match_form`` (one form for many path sets)."""
        if self.everything:
            return True
        if self._exempt is not None and self._exempt.matches_form(form):
            return False
        if self._all or any(form == p or form.startswith(ps) for p, ps in self._prefixes):
            return True
        if self._patterns:
            segments = form.split("/")[1:]
            if segments and not segments[-1]:
                segments.pop()  # a trailing slash names the same resource
            return any(_glob(p, segments) for p in self._patterns)
        return False
