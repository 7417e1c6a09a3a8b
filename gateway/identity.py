"""Who is asking: the ``identity.sources`` chain, the client IP, and the hashing of both.

Every value that becomes store key material goes through ``tag()`` first, so no API key or
address is ever stored in clear. ``X-Forwarded-For`` is believed only when the direct peer is
one of ``trusted_proxies``; it is then walked right to left, skipping trusted hops, and the
first untrusted address is the client (the leftmost entries are whatever the client wrote).

References:
    - RFC 7239 §5.2 and MDN "X-Forwarded-For": only the hops your proxies appended are facts.
    - uvicorn ``middleware/proxy_headers.py``: the same right-to-left walk.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

from gateway.config import IdentityConfig
from gateway.context import HeaderValues

__all__ = ["ANONYMOUS_TAG", "GLOBAL_TAG", "TAGS_KEPT", "IdentityResolver", "TrustedProxies", "header_name",
           "tag"]

#: The tag of ``key = "global"`` policies: one bucket for everyone.
GLOBAL_TAG = "global"
_XFF = b"x-forwarded-for"
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def tag(material: bytes) -> str:
    """The store-safe, one-way name of a key value (128-bit BLAKE2b, hex)."""
    return hashlib.blake2b(material, digest_size=16, person=b"gateway-key").hexdigest()


#: Tags kept per resolver for the key values seen lately (a hash per request costs more than a
#: dict lookup; a flood of new values only empties the cache, it never grows past this).
TAGS_KEPT = 16_384


_ANONYMOUS = b"anonymous"
#: The identity tag of a request no source names (no header value, no client address).
ANONYMOUS_TAG = tag(_ANONYMOUS)


class IdentityResolver:
    """Resolves the key values a set of policies needs, in one pass over the headers.

    Args:
        config: the ``[identity]`` section.
        keys: the policy ``key`` values in use (``identity``, ``ip``, ``global``,
            ``header:NAME``); only what they need is computed per request.
    """

    __slots__ = ("_headers", "_ip_needed", "_key_headers", "_keys", "_sources", "_tags", "_trusted")

    def __init__(self, config: IdentityConfig, keys: Iterable[str]) -> None:
        self._keys = tuple(dict.fromkeys(keys))
        # per source, the header name it reads (ASGI names are lowercase); b"" stands for "ip"
        self._sources = tuple(header_name(s) if s.startswith("header:") else b"" for s in config.sources)
        needs_identity = "identity" in self._keys
        self._ip_needed = "ip" in self._keys or (needs_identity and "ip" in config.sources)
        self._trusted = TrustedProxies(config.trusted_proxies)
        self._key_headers = {k: header_name(k) for k in self._keys if k.startswith("header:")}
        wanted = set(self._key_headers.values())
        if needs_identity:
            wanted |= {name for name in self._sources if name}
        if self._ip_needed and self._trusted:
            wanted.add(_XFF)
        self._headers = frozenset(wanted)
        self._tags: dict[bytes, str] = {}  # key material -> tag, bounded by TAGS_KEPT

    def tags(
        self, scope: Mapping[str, Any], keys: Iterable[str] | None = None, *,
        found: HeaderValues | None = None,
    ) -> dict[str, str]:
        """Map each policy key (all in use, or those of ``keys``) to its tag for this request.

        ``found``: the header values the stack's request check read; used, instead of a pass
        over the headers of its own, when it holds every header this resolver reads."""
        if found is not None and self._headers <= found.names:
            return self._tags_of(scope, found.values, keys)
        values: dict[bytes, bytes] = {}
        if self._headers:
            wanted = self._headers
            for name, value in scope["headers"]:
                if name in wanted and value:
                    if name == _XFF and name in values:
                        values[name] += b"," + value  # several header lines form one list
                    elif name not in values:
                        values[name] = value
        return self._tags_of(scope, values, keys)

    def _tags_of(
        self, scope: Mapping[str, Any], found: Mapping[bytes, bytes], keys: Iterable[str] | None
    ) -> dict[str, str]:
        ip = self._client_ip(scope, found.get(_XFF) or None) if self._ip_needed else None
        out: dict[str, str] = {}
        for key in self._keys if keys is None else keys:
            if key == "global":
                out[key] = GLOBAL_TAG
            elif key == "ip":
                out[key] = self._tag(b"ip:" + (ip or "unknown").encode())
            elif key == "identity":
                out[key] = self._tag(self._identity_material(found, ip))
            else:
                name = self._key_headers[key]
                # requests without the header share one bucket (CONTRACT "Rate limits")
                out[key] = self._tag(b"h:" + name + b":" + found.get(name, b""))
        return out

    def _tag(self, material: bytes) -> str:
        """``tag(material)``, remembered for the values seen lately."""
        known = self._tags.get(material)
        if known is None:
            if len(self._tags) >= TAGS_KEPT:
                self._tags.clear()
            known = self._tags[material] = tag(material)
        return known

    def _identity_material(self, found: Mapping[bytes, bytes], ip: str | None) -> bytes:
        for name in self._sources:
            if name:
                value = found.get(name)
                if value:
                    # same material as a header:NAME policy, so both share a bucket tag
                    return b"h:" + name + b":" + value
            elif ip is not None:
                return b"ip:" + ip.encode()
        return _ANONYMOUS

    def _client_ip(self, scope: Mapping[str, Any], xff: bytes | None) -> str | None:
        client = scope.get("client")
        peer = client[0] if client else None
        if peer is not None and peer.startswith("::ffff:"):
            peer = _normalise(peer)  # an IPv4 client on a dual-stack socket is that IPv4 client
        if peer is None or xff is None or not self._trusted or peer not in self._trusted:
            return peer
        hops = [h.strip() for h in xff.decode("latin-1").split(",")]
        hops = [h for h in hops if h]
        for hop in reversed(hops):
            if hop not in self._trusted:
                return _normalise(hop)
        # every hop is one of ours: the leftmost is the client they saw first
        return _normalise(hops[0]) if hops else peer


class TrustedProxies:
    """CIDRs parsed once; ``host in trusted`` answers with a bounded cache."""

    __slots__ = ("_contains", "_networks")

    def __init__(self, cidrs: Iterable[str]) -> None:
        self._networks: tuple[_Network, ...] = tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)
        self._contains = lru_cache(maxsize=4096)(self._lookup)

    def __bool__(self) -> bool:
        return bool(self._networks)

    def __contains__(self, host: object) -> bool:
        return isinstance(host, str) and self._contains(host)

    def _lookup(self, host: str) -> bool:
        addr = _parse_ip(host)
        return addr is not None and any(addr in net for net in self._networks)


def _parse_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address from a hop: bare, or exactly ``1.2.3.4:80`` / ``[::1]`` / ``[::1]:80``.

    Anything else is not an address, so it can never pass for a trusted hop."""
    if host.startswith("["):
        inner, sep, port = host[1:].partition("]")
        if not sep or (port and not (port[0] == ":" and port[1:].isdigit())):
            return None
        host = inner
    elif host.count(":") == 1:
        host, _, port = host.partition(":")
        if not port.isdigit():
            return None
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def header_name(source: str) -> bytes:
    """``header:X-Api-Key`` as the lowercase bytes an ASGI scope carries."""
    return source[len("header:"):].strip().lower().encode("latin-1")


def _normalise(hop: str) -> str:
    """One spelling per address, so ``::ffff:1.2.3.4`` and ``1.2.3.4`` share a bucket."""
    addr = _parse_ip(hop)
    return str(addr) if addr is not None else hop
