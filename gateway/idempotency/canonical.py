"""Canonical JSON for the request fingerprint (``idempotency.fingerprint = "json"``).

Two bodies that say the same thing in JSON get the same canonical bytes: object members are
sorted by name (a stable sort, so a repeated name keeps its members' order: ``{"a":1,"a":2}`` is
not ``{"a":2,"a":1}``, since apps disagree on which one wins), insignificant whitespace is gone
and strings are re-encoded one way (``"\\u0041"`` is ``"A"``). Numbers stay as written: ``1``,
``1.0`` and ``1e0`` are three bodies (an amount's precision is the app's business, and parsing
into floats would make ``0.1`` and ``0.10000000000000001`` one request).

A body that is not JSON (not UTF-8/16/32, a syntax error, ``NaN``) or that nests deeper than
``MAX_DEPTH`` has no canonical form: the caller fingerprints its raw bytes. The depth bound is
fixed, not the interpreter's recursion limit, so whether a body is canonicalised never depends
on how deep the call stack happened to be; hostile nesting costs one bounded parse attempt.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["MAX_DEPTH", "canonical_json"]

#: Arrays and objects nested deeper than this are fingerprinted as raw bytes.
MAX_DEPTH = 64


class _Number(str):
    """A JSON number, kept as its lexeme."""

    __slots__ = ()


class _Members(list[tuple[str, Any]]):
    """A JSON object's members, in order, repeated names included."""

    __slots__ = ()


class _NotCanonical(Exception):
    """The document has no canonical form here (too deep)."""


def _refuse_constant(name: str) -> Any:
    raise ValueError(name)  # NaN, Infinity, -Infinity: Python's extensions, not JSON


def _string(value: str) -> str:
    # ensure_ascii: one spelling per string, lone surrogates included (they cannot be UTF-8)
    return json.dumps(value, ensure_ascii=True)


def canonical_json(body: bytes) -> bytes | None:
    """The canonical form of ``body``, or None when it is not JSON this function canonicalises."""
    try:
        document = json.loads(
            body, parse_int=_Number, parse_float=_Number, parse_constant=_refuse_constant,
            object_pairs_hook=_Members,
        )
        out: list[str] = []
        _write(document, out)
    except (ValueError, RecursionError, _NotCanonical):  # JSONDecodeError, UnicodeDecodeError too
        return None
    return "".join(out).encode("ascii")


def _write(root: Any, out: list[str]) -> None:
    """Serialise ``root`` without recursion: an explicit stack of what is left to write."""
    # each entry: a value to write, or a literal piece (a str that is not a _Number) to emit
    stack: list[tuple[Any, int]] = [(root, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, _Piece):
            out.append(value.text)
        elif isinstance(value, _Number):
            out.append(str.__str__(value))
        elif isinstance(value, str):
            out.append(_string(value))
        elif value is None:
            out.append("null")
        elif value is True:
            out.append("true")
        elif value is False:
            out.append("false")
        elif depth >= MAX_DEPTH:
            raise _NotCanonical
        elif isinstance(value, _Members):
            members = sorted(value, key=lambda m: m[0])
            stack.append((_CLOSE_OBJECT, depth))
            for i in range(len(members) - 1, -1, -1):
                name, item = members[i]
                stack.append((item, depth + 1))
                stack.append((_Piece(("," if i else "") + _string(name) + ":"), depth))
            stack.append((_OPEN_OBJECT, depth))
        else:  # a list
            stack.append((_CLOSE_ARRAY, depth))
            for i in range(len(value) - 1, -1, -1):
                stack.append((value[i], depth + 1))
                if i:
                    stack.append((_COMMA, depth))
            stack.append((_OPEN_ARRAY, depth))


class _Piece:
    """Literal text to emit as it is."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


_OPEN_OBJECT, _CLOSE_OBJECT = _Piece("{"), _Piece("}")
_OPEN_ARRAY, _CLOSE_ARRAY = _Piece("["), _Piece("]")
_COMMA = _Piece(",")
