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

__all__ = ["PathPrefixes", "match_form", "normal_target"]

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


class PathPrefixes:
    """A compiled set of path prefixes (``[[rate_limit]].paths``, ``required_paths``), matched by
    segment (``/api`` is /api and /api/..., never /apiary) on the ``match_form`` of both sides."""

    __slots__ = ("_prefixes", "everything")

    def __init__(self, paths: Iterable[str]) -> None:
        paths = tuple(match_form(p) for p in paths)
        self.everything = "/" in paths
        self._prefixes = tuple((p, p.rstrip("/") + "/") for p in paths)

    def __bool__(self) -> bool:
        return bool(self._prefixes)

    def matches(self, path: str) -> bool:
        return self.everything or self.matches_form(match_form(path))

    def matches_form(self, form: str) -> bool:
        """``matches`` for a path already in ``match_form`` (one form for many prefix sets)."""
        return self.everything or any(form == p or form.startswith(ps) for p, ps in self._prefixes)
