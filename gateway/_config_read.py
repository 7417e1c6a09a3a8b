"""Reading one config table: typed getters that record problems instead of raising.

Every getter returns a usable value (the default when the given one is bad) and records what
was wrong under the key's full name, so ``load_config`` can report every problem at once.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

_T = TypeVar("_T", bound=str)
_MISSING: Any = object()

# patterns are used with fullmatch: "$" would also accept a trailing newline
# ASCII digits only ("\d" would take "٣s", and float() reads it), and no spaces anywhere
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 §5.6.2 token
#: The IANA HTTP Method Registry (RFC 9110 and the WebDAV, versioning, calendaring and other
#: registrations), plus PURGE, which caches use: a method outside it is refused as a typo.
KNOWN_METHODS = frozenset({
    "ACL", "BASELINE-CONTROL", "BIND", "CHECKIN", "CHECKOUT", "CONNECT", "COPY", "DELETE", "GET", "HEAD",
    "LABEL", "LINK", "LOCK", "MERGE", "MKACTIVITY", "MKCALENDAR", "MKCOL", "MKREDIRECTREF", "MKWORKSPACE",
    "MOVE", "OPTIONS", "ORDERPATCH", "PATCH", "POST", "PRI", "PROPFIND", "PROPPATCH", "PURGE", "PUT", "QUERY",
    "REBIND", "REPORT", "SEARCH", "TRACE", "UNBIND", "UNCHECKOUT", "UNLINK", "UNLOCK", "UPDATE",
    "UPDATEREDIRECTREF", "VERSION-CONTROL",
})
_POLICY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_KEY_PREFIX = re.compile(r"[A-Za-z0-9._:-]{1,64}")  # no braces: they would hijack hash tags
_PATH_PREFIX = re.compile(r"/[^\s?#]*")
_WILDCARD = re.compile(r"\*|\{[A-Za-z_][A-Za-z0-9_]*\}")  # a pattern's wildcard segment
_ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):([0-9]{1,5})")  # host:port, [v6]:port


def show(value: object) -> str:
    """A value as the user wrote it: strings quoted, the rest as Python prints it."""
    return json.dumps(value) if isinstance(value, str) else repr(value)


class Reader:
    """Collects the problems of one load."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def problem(self, key: str, message: str) -> None:
        # a key the user made up is quoted, so one problem is always one line
        shown = key if key.isprintable() else show(key)
        self.problems.append(f"{shown}: {message}")

    def table(self, data: object, path: str) -> Table:
        if not isinstance(data, Mapping):
            self.problem(path or "config", f"expected a table, got {show(data)}")
            data = {}
        return Table(self, data, path)


class Table:
    """One table of the config; getters mark keys as read so ``finish`` can name the rest."""

    def __init__(self, reader: Reader, data: Mapping[str, Any], path: str) -> None:
        self._reader = reader
        self._data = data
        self._path = path
        self._read: set[str] = set()

    def _name(self, key: str) -> str:
        return f"{self._path}.{key}" if self._path else key

    def problem(self, key: str, message: str) -> None:
        self._reader.problem(self._name(key), message)

    def problem_count(self) -> int:
        return len(self._reader.problems)

    def _get(self, key: str) -> Any:
        self._read.add(key)
        return self._data.get(key, _MISSING)

    def given_keys(self) -> list[str]:
        """The keys given (each then counts as read: the caller reads or refuses it)."""
        names = [str(k) for k in self._data]
        self._read.update(names)
        return names

    def has(self, key: str) -> bool:
        """Whether ``key`` is given (it then counts as read)."""
        return self._get(key) is not _MISSING

    def finish(self) -> None:
        """Report every key that no getter asked for: unknown keys are errors."""
        for key in self._data:
            if key not in self._read:
                self.problem(str(key), "unknown key")

    # ----------------------------------------------------------------- nested tables
    def sub(self, key: str) -> Table:
        value = self._get(key)
        return self._reader.table({} if value is _MISSING else value, self._name(key))

    def table_list(self, key: str) -> list[Table]:
        value = self._get(key)
        if value is _MISSING:
            return []
        if not isinstance(value, Sequence) or isinstance(value, str):
            self.problem(key, f"expected an array of tables ([[{key}]]), got {show(value)}")
            return []
        return [self._reader.table(v, f"{self._name(key)}[{i}]") for i, v in enumerate(value)]

    # ----------------------------------------------------------------- scalars
    def string(self, key: str, default: str) -> str:
        value = self._get(key)
        if value is _MISSING:
            return default
        if not isinstance(value, str) or not value.strip():
            self.problem(key, f"expected a non-empty string, got {show(value)}")
            return default
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key)
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            self.problem(key, f"expected true or false, got {show(value)}")
            return default
        return value

    def integer(self, key: str, default: int, *, low: int, high: int) -> int:
        value = self._get(key)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(key, f"expected a whole number, got {show(value)}")
            return default
        if not low <= value <= high:
            self.problem(key, f"must be between {low} and {high}, got {value}")
            return default
        return value

    def fraction(self, key: str, default: float) -> float:
        """A share between 0 (included) and 1 (excluded), as a number."""
        value = self._get(key)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
            self.problem(key, f"expected a number from 0 up to (not including) 1, got {show(value)}")
            return default
        return float(value)

    def header_match(self, key: str) -> tuple[str, str] | None:
        """``"Name: value"``: the lowercase name and the exact value, or None when absent."""
        value = self._get(key)
        if value is _MISSING:
            return None
        name, sep, wanted = value.partition(":") if isinstance(value, str) else ("", "", "")
        if not sep or not _TOKEN.fullmatch(name.strip()) or not wanted.strip():
            self.problem(key, f'expected "Header-Name: value", got {show(value)}')
            return None
        return name.strip().lower(), wanted.strip()

    def duration(self, key: str, default: float, *, low: float = 0.001, high: float = 1e9) -> float:
        """Seconds, from ``"250ms"``/``"2s"``/``"5m"``/``"24h"``/``"7d"`` or a number of seconds,
        between ``low`` (at least 1ms: a shorter timeout or expiry only defeats its purpose) and
        ``high``. The same bounds hold for strings and numbers."""
        value = self._get(key)
        if value is _MISSING:
            return default
        seconds: float | None = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            seconds = float(value) if abs(value) < 1e18 else math.inf  # huge ints: out of range, not a crash
        elif isinstance(value, str) and (m := _DURATION.fullmatch(value)):
            seconds = float(m.group(1)) * _UNIT_S[m.group(2)]
        if seconds is None or math.isnan(seconds):
            self.problem(key, f'expected a duration like "2s", got {show(value)}')
            return default
        if not low <= seconds <= high:  # also refuses zero, negatives and infinities
            self.problem(key, f"must be at least {low:g}s and at most {high:g}s, got {show(value)}")
            return default
        return seconds

    def choice(self, key: str, default: _T, options: Iterable[_T]) -> _T:
        value = self._get(key)
        options = tuple(options)
        if value is _MISSING:
            return default
        if value not in options:
            allowed = " or ".join(show(o) for o in options)
            self.problem(key, f"expected {allowed}, got {show(value)}")
            return default
        result: _T = value
        return result

    def url(
        self, key: str, default: str, *, schemes: tuple[str, ...], override: tuple[str, str] | None
    ) -> str:
        name = key
        value = self._get(key)
        if override is not None:
            value, name = override
        if value is _MISSING:
            return default
        message = _url_problem(value, schemes)
        if message:
            if override is not None:
                self._reader.problem(name, message)
            else:
                self.problem(key, message)
            return default
        result: str = value
        return result

    def _matching(self, key: str, default: str, pattern: re.Pattern[str], expected: str) -> str:
        value = self._get(key)
        if value is _MISSING:
            return default
        if not isinstance(value, str) or not pattern.fullmatch(value):
            self.problem(key, f"expected {expected}, got {show(value)}")
            return default
        return value

    def key_prefix(self, key: str, default: str) -> str:
        return self._matching(key, default, _KEY_PREFIX, "1-64 characters of A-Z a-z 0-9 . _ : -")

    def policy_name(self, key: str, default: str) -> str:
        return self._matching(key, default, _POLICY_NAME,
                              "1-64 characters of A-Z a-z 0-9 . _ - starting with a letter or digit")

    def header_name(self, key: str, default: str) -> str:
        return self._matching(key, default, _TOKEN, "an HTTP header name")

    def policy_key(self, key: str, default: str) -> str:
        value = self._get(key)
        if value is _MISSING:
            return default
        if value in ("identity", "ip", "global"):
            result: str = value
            return result
        header = _header_source(value)
        if header is None:
            self.problem(key, f'expected "identity", "ip", "global" or "header:NAME", got {show(value)}')
            return default
        return header

    # ----------------------------------------------------------------- lists
    def _list(self, key: str) -> list[Any] | None:
        value = self._get(key)
        if value is _MISSING:
            return None
        if isinstance(value, str) or not isinstance(value, Sequence):
            self.problem(key, f"expected a list, got {show(value)}")
            return None
        return list(value)

    def identity_sources(self, key: str, default: tuple[Any, ...]) -> tuple[Any, ...]:
        """``ip``, ``header:NAME``, ``cookie:NAME``, ``bearer``, ``jwt:CLAIM``, or (in-process) a
        callable; at least one, no duplicates."""
        items = self._list(key)
        if items is None:
            return default
        if not items:
            self.problem(key, f"expected at least one source ({_SOURCES})")
            return default
        sources: list[Any] = []
        for i, item in enumerate(items):
            source = item if callable(item) else identity_source(item)
            if source is None:
                self.problem(f"{key}[{i}]", f"expected {_SOURCES} or a callable, got {show(item)}")
            elif source in sources:
                self.problem(f"{key}[{i}]", f"duplicate source {show(item)}")
            else:
                sources.append(source)
        return tuple(sources)

    def plan_source(self, key: str) -> Any:
        """Where a client's plan is read: ``jwt:CLAIM``, ``header:NAME`` or a callable; None
        when not given."""
        value = self._get(key)
        if value is _MISSING:
            return None
        if callable(value):
            return value
        source = identity_source(value)
        if source is None or not source.startswith(("jwt:", "header:")):
            self.problem(key, f'expected "jwt:CLAIM", "header:NAME" or a callable, got {show(value)}')
            return None
        return source

    def strings(self, key: str) -> tuple[str, ...]:
        """One non-empty string or a list of them."""
        value = self._get(key)
        if value is _MISSING:
            return ()
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, Sequence) or not items or not all(isinstance(v, str) and v for v in items):
            self.problem(key, f"expected a string or a list of strings, got {show(value)}")
            return ()
        return tuple(items)

    def algorithms(self, key: str, families: Mapping[str, str]) -> tuple[str, ...]:
        """JWT algorithms, pinned: required, all of one family, never ``none``."""
        items = self._list(key)
        if not items:
            self.problem(key, f'required: the algorithms tokens are signed with, e.g. ["RS256"] '
                         f"(one family of {', '.join(families)})")
            return ()
        found: list[str] = []
        before = self.problem_count()
        for i, item in enumerate(items):
            if not isinstance(item, str) or item not in families:
                why = " (an unsigned token is never believed)" if str(item).lower() == "none" else ""
                self.problem(f"{key}[{i}]", f"expected one of {', '.join(families)}{why}, got {show(item)}")
            elif item not in found:
                found.append(item)
        if len({families[a] for a in found}) > 1:
            self.problem(key, "mixes algorithm families: one key serves one family (an RSA public key "
                         f"must never be taken as an HMAC secret), got {', '.join(found)}")
            return ()
        return tuple(found) if self.problem_count() == before else ()

    def networks(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        items = self._list(key)
        if items is None:
            return default
        nets: list[str] = []
        for i, item in enumerate(items):
            try:
                if not isinstance(item, str):
                    raise TypeError  # noqa: TRY301 - one message for both cases below
                nets.append(str(ipaddress.ip_network(item.strip(), strict=False)))
            except (TypeError, ValueError):
                expected = 'expected an IP address or CIDR like "10.0.0.0/8"'
                self.problem(f"{key}[{i}]", f"{expected}, got {show(item)}")
        return tuple(nets)

    def addresses(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        """``["host:port", ...]``, each port 1-65535, no duplicates."""
        items = self._list(key)
        if items is None:
            return default
        found: list[str] = []
        for i, item in enumerate(items):
            m = _ADDRESS.fullmatch(item) if isinstance(item, str) else None
            if m is None or not 1 <= int(m.group(2)) <= 65535:
                expected = 'expected "host:port" with a port between 1 and 65535'
                self.problem(f"{key}[{i}]", f"{expected}, got {show(item)}")
            elif item in found:
                self.problem(f"{key}[{i}]", f"duplicate address {show(item)}")
            else:
                found.append(item)
        return tuple(found)

    def paths(self, key: str, default: tuple[str, ...], *, empty_ok: bool) -> tuple[str, ...]:
        items = self._list(key)
        if items is None:
            return default
        if not items and not empty_ok:
            self.problem(key, 'expected at least one path prefix, e.g. ["/"]')
            return default
        paths: list[str] = []
        for i, item in enumerate(items):
            if not isinstance(item, str) or not _PATH_PREFIX.fullmatch(item):
                self.problem(f"{key}[{i}]", f'expected a path prefix starting with "/", got {show(item)}')
                continue
            if not _segments_ok(item):
                self.problem(f"{key}[{i}]", f'a wildcard is a whole segment, "*" or "{{name}}" (as in '
                             f'"/v1/charges/*/capture"), got {show(item)}')
                continue
            prefix = item.rstrip("/") or "/"
            if prefix not in paths:
                paths.append(prefix)
        return tuple(paths)

    def statuses(self, key: str, default: frozenset[int], *, low: int, high: int, why: str) -> frozenset[int]:
        """A list of HTTP status codes, each between ``low`` and ``high`` (``why`` says why)."""
        items = self._list(key)
        if items is None:
            return default
        found: set[int] = set()
        for i, item in enumerate(items):
            if isinstance(item, bool) or not isinstance(item, int):
                self.problem(f"{key}[{i}]", f"expected a status code like 422, got {show(item)}")
            elif not low <= item <= high:
                self.problem(f"{key}[{i}]", f"must be between {low} and {high} ({why}), got {item}")
            else:
                found.add(item)
        return frozenset(found)

    def methods(self, key: str, default: frozenset[str]) -> frozenset[str]:
        items = self._list(key)
        if items is None:
            return default
        methods: set[str] = set()
        for i, item in enumerate(items):
            if not isinstance(item, str) or not _TOKEN.fullmatch(item):
                self.problem(f"{key}[{i}]", f'expected an HTTP method like "POST", got {show(item)}')
            elif item.upper() not in KNOWN_METHODS:
                # a policy on a method no client sends would never match: a typo, most likely
                close = difflib.get_close_matches(item.upper(), KNOWN_METHODS, n=1)
                hint = f' (did you mean "{close[0]}"?)' if close else ""
                self.problem(f"{key}[{i}]", f"not a registered HTTP method: {show(item)}{hint}")
            else:
                methods.add(item.upper())
        return frozenset(methods)


_SOURCES = '"ip", "header:NAME", "cookie:NAME", "bearer" or "jwt:CLAIM"'
_COOKIE_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 6265 §4.1.1 cookie-name: a token
_CLAIM = re.compile(r"[!-~]{1,256}")  # a JWT claim name: visible ASCII (URIs included), no spaces


def identity_source(value: object) -> str | None:
    """A source as configured, normalised (header names lowercased), or None when it is none."""
    if value in ("ip", "bearer"):
        return str(value)
    if not isinstance(value, str):
        return None
    if value.startswith("header:"):
        return _header_source(value)
    if value.startswith("cookie:"):
        name = value[len("cookie:"):]
        return value if _COOKIE_NAME.fullmatch(name) else None  # cookie names are case-sensitive
    if value.startswith("jwt:"):
        return value if _CLAIM.fullmatch(value[len("jwt:"):]) else None
    return None


def _segments_ok(path: str) -> bool:
    """Whether every segment with a wildcard character is a whole wildcard (``*``, ``{name}``)."""
    return all(_WILDCARD.fullmatch(seg) for seg in path.split("/") if "*" in seg or "{" in seg or "}" in seg)


def _header_source(value: object) -> str | None:
    """``"header:NAME"`` normalised to a lowercase name, or None when it is not one."""
    if not isinstance(value, str) or not value.startswith("header:"):
        return None
    name = value[len("header:"):].strip()
    return f"header:{name.lower()}" if _TOKEN.fullmatch(name) else None


def _url_problem(value: object, schemes: tuple[str, ...]) -> str | None:
    wanted = " or ".join(f"{s}://" for s in schemes)
    # urlsplit silently drops tabs and newlines; the string itself is what gets used
    if not isinstance(value, str) or any(c <= " " or c == "\x7f" for c in value):
        return f"expected a URL ({wanted}), got {show(value)}"
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        return f"expected a URL ({wanted}), got {show(value)}"
    if parts.scheme not in schemes:
        return f"expected a URL ({wanted}), got {show(value)}"
    if parts.scheme == "memory":
        return None if value == "memory://" else f'expected exactly "memory://", got {show(value)}'
    if parts.scheme == "unix":
        return None if parts.path else f"expected unix:///path/to/redis.sock, got {show(value)}"
    if not parts.hostname:
        return f"expected a host in the URL, got {show(value)}"
    if port == 0:
        return f"expected a port between 1 and 65535, got {show(value)}"
    db = parts.path.strip("/")
    if parts.scheme in ("redis", "rediss") and db and not db.isdigit():
        return f"expected a database number as the path (redis://host:6379/0), got {show(value)}"
    return None
