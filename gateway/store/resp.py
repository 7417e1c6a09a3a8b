"""RESP2 command framing, built once where it can be: the hot path only frames the keys.

A script call is ``EVALSHA sha numkeys key... arg...``; its head (count, command, sha, numkeys)
depends only on the script and the argument counts, and a rate-limit plan's arguments never
change, so both are framed once and reused by every request.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

__all__ = ["ScriptCall", "bulk", "bulks", "command"]


def bulk(value: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%b\r\n" % (len(value), value)


def bulks(values: Iterable[int | str | bytes]) -> bytes:
    """Several arguments as consecutive bulk strings (ints in decimal, str as UTF-8)."""
    out = []
    for v in values:
        raw = v if isinstance(v, bytes) else str(v).encode()
        out.append(b"$%d\r\n%b\r\n" % (len(raw), raw))
    return b"".join(out)


def command(*args: int | str | bytes) -> bytes:
    """A whole command as a RESP array."""
    return b"*%d\r\n%b" % (len(args), bulks(args))


class ScriptCall:
    """One Lua script: its source, SHA1 (computed locally) and framed EVALSHA heads."""

    __slots__ = ("_heads", "load", "name", "sha", "source")

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()  # noqa: S324 - Redis names scripts by SHA1
        self.load = command("SCRIPT", "LOAD", source)
        self._heads: dict[tuple[int, int], bytes] = {}

    def evalsha(self, keys: Sequence[bytes], args: bytes, nargs: int) -> bytes:
        """``EVALSHA`` with ``keys`` and ``args`` (already framed, ``nargs`` of them)."""
        return self.head(len(keys), nargs) + b"".join(b"$%d\r\n%b\r\n" % (len(k), k) for k in keys) + args

    def head(self, nkeys: int, nargs: int) -> bytes:
        """What comes before the keys of an ``EVALSHA`` with ``nkeys`` keys and ``nargs``
        arguments: the array's length, the command, the SHA1 and the key count."""
        shape = (nkeys, nargs)
        head = self._heads.get(shape)
        if head is None:
            # bounded: one per (key count, argument count) a caller ever uses
            head = self._heads[shape] = b"*%d\r\n%b" % (
                3 + nkeys + nargs, bulks((b"EVALSHA", self.sha, nkeys)))
        return head
