"""Who is asking: the ``identity.sources`` chain, the client IP, and the hashing of both.

A source is ``ip``, ``header:NAME``, ``cookie:NAME`` (the named cookie; several ``Cookie`` lines,
as HTTP/2 sends them, form one list), ``bearer`` (the token of ``Authorization: Bearer``),
``jwt:CLAIM`` (a claim of a bearer JWT that verifies with ``[identity.jwt]``: ``bearer.py``), or
in-process a callable given the ASGI scope (sync or async; None for nobody). The first source
with a value names the client; one without (no cookie, a forged or expired JWT, a callable that
returned None or raised) hands over to the next, and a request none names is anonymous.

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
import inspect
import ipaddress
import logging
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

from gateway._kept import Kept
from gateway.bearer import JwtVerifier, bearer_token, load_keys
from gateway.config import IdentityConfig, IdentitySource, SourceFunction
from gateway.context import HeaderValues

__all__ = ["ANONYMOUS_TAG", "AUTHORIZATION", "COOKIE", "GLOBAL_TAG", "TAGS_KEPT", "IdentityResolver",
           "TrustedProxies", "cookie_names", "cookie_value", "header_name", "source_headers", "tag"]

#: The tag of ``key = "global"`` policies: one bucket for everyone.
GLOBAL_TAG = "global"
AUTHORIZATION = b"authorization"
COOKIE = _COOKIE = b"cookie"
_XFF = b"x-forwarded-for"
_log = logging.getLogger("gateway.identity")
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


class _Source:
    """One ``identity.sources`` entry, compiled: what it reads and how it makes key material."""

    __slots__ = ("awaits", "claim", "fn", "kind", "name")

    def __init__(self, source: IdentitySource) -> None:
        self.name = b""
        self.claim = ""
        self.fn: SourceFunction | None = None
        self.awaits = False
        if callable(source):
            self.kind = "call"
            self.fn = source
            self.awaits = inspect.iscoroutinefunction(source) or inspect.iscoroutinefunction(
                getattr(source, "__call__", None))  # noqa: B004 - an object whose __call__ is async
        elif source in {"ip", "bearer"}:
            self.kind = source
        else:
            self.kind, _, arg = source.partition(":")
            if self.kind == "header":
                self.name = header_name(source)
            elif self.kind == "cookie":
                self.name = arg.encode("latin-1")
            else:
                self.claim = arg

    @property
    def header(self) -> bytes:
        """The request header the source reads (b"" for none: ip, a callable)."""
        if self.kind == "header":
            return self.name
        if self.kind == "cookie":
            return _COOKIE
        if self.kind in ("bearer", "jwt"):
            return AUTHORIZATION
        return b""


class IdentityResolver:
    """Resolves the key values a set of policies needs, in one pass over the headers.

    Args:
        config: the ``[identity]`` section.
        keys: the policy ``key`` values in use (``identity``, ``ip``, ``global``,
            ``header:NAME``); only what they need is computed per request.
        claims: more JWT claims to verify tokens for (a rate limit's ``plan = "jwt:CLAIM"``), so
            one verification (and one cache entry) serves both.
    """

    __slots__ = ("_headers", "_ip_needed", "_key_headers", "_keys", "_sources", "_tags", "_trusted", "awaits",
                 "jwt")

    def __init__(self, config: IdentityConfig, keys: Iterable[str], *, claims: Iterable[str] = ()) -> None:
        self._keys = tuple(dict.fromkeys(keys))
        needs_identity = "identity" in self._keys
        self._sources = tuple(_Source(s) for s in config.sources) if needs_identity else ()
        self._ip_needed = "ip" in self._keys or any(s.kind == "ip" for s in self._sources)
        self._trusted = TrustedProxies(config.trusted_proxies)
        self._key_headers = {k: header_name(k) for k in self._keys if k.startswith("header:")}
        wanted = set(self._key_headers.values())
        wanted |= {s.header for s in self._sources if s.header}
        if self._ip_needed and self._trusted:
            wanted.add(_XFF)
        claims = (*(s.claim for s in self._sources if s.kind == "jwt"), *claims)
        #: the verifier of the ``jwt:`` sources (None without any)
        self.jwt = _verifier(config, claims)
        if self.jwt is not None:
            wanted.add(AUTHORIZATION)
        self._headers = frozenset(wanted)
        #: whether a source is an async callable: then ``tags_async`` must be used
        self.awaits = any(s.awaits for s in self._sources)
        self._tags: Kept[bytes, str] = Kept(TAGS_KEPT)  # key material -> tag

    def tags(
        self, scope: Mapping[str, Any], keys: Iterable[str] | None = None, *,
        found: HeaderValues | None = None,
    ) -> dict[str, str]:
        """Map each policy key (all in use, or those of ``keys``) to its tag for this request.

        ``found``: the header values the stack's request check read; used, instead of a pass
        over the headers of its own, when it holds every header this resolver reads. Not for a
        resolver that ``awaits`` (an async callable source): ``tags_async``."""
        values = self.header_values(scope, found)
        return self._tags_of(scope, values, keys, None)

    async def tags_async(
        self, scope: Mapping[str, Any], keys: Iterable[str] | None = None, *,
        found: HeaderValues | None = None,
    ) -> dict[str, str]:
        """``tags``, awaiting the async callable sources."""
        values = self.header_values(scope, found)
        material: bytes | None = None
        if "identity" in (self._keys if keys is None else keys):
            ip = self._client_ip(scope, values.get(_XFF) or None) if self._ip_needed else None
            material = await self._identity_material_async(scope, values, ip)
        return self._tags_of(scope, values, keys, material)

    def header_values(
        self, scope: Mapping[str, Any], found: HeaderValues | None = None
    ) -> Mapping[bytes, bytes]:
        """The values of the headers this resolver reads (``found`` when it holds them all)."""
        if found is not None and self._headers <= found.names:
            return found.values
        values: dict[bytes, bytes] = {}
        if self._headers:
            wanted = self._headers
            for name, value in scope["headers"]:
                if name in wanted and value:
                    if name in values:
                        if name == _XFF:
                            values[name] += b"," + value  # several header lines form one list
                        elif name == _COOKIE:
                            values[name] += b"; " + value  # HTTP/2 splits Cookie (RFC 9113 §8.2.3)
                    else:
                        values[name] = value
        return values

    def _tags_of(
        self, scope: Mapping[str, Any], found: Mapping[bytes, bytes], keys: Iterable[str] | None,
        material: bytes | None,
    ) -> dict[str, str]:
        ip = self._client_ip(scope, found.get(_XFF) or None) if self._ip_needed else None
        out: dict[str, str] = {}
        for key in self._keys if keys is None else keys:
            if key == "global":
                out[key] = GLOBAL_TAG
            elif key == "ip":
                out[key] = self._tag(b"ip:" + (ip or "unknown").encode())
            elif key == "identity":
                if material is None:
                    material = self._identity_material(scope, found, ip)
                out[key] = self._tag(material)
            else:
                name = self._key_headers[key]
                # requests without the header share one bucket (CONTRACT "Rate limits")
                out[key] = self._tag(b"h:" + name + b":" + found.get(name, b""))
        return out

    def _tag(self, material: bytes) -> str:
        """``tag(material)``, remembered for the values seen lately."""
        known = self._tags.get(material)
        if known is None:
            known = self._tags.keep(material, tag(material))
        return known

    def _identity_material(
        self, scope: Mapping[str, Any], found: Mapping[bytes, bytes], ip: str | None
    ) -> bytes:
        for source in self._sources:
            material = self._one(source, scope, found, ip)
            if material is not None:
                return material
        return _ANONYMOUS

    async def _identity_material_async(
        self, scope: Mapping[str, Any], found: Mapping[bytes, bytes], ip: str | None
    ) -> bytes:
        for source in self._sources:
            if source.awaits:
                assert source.fn is not None
                try:
                    material = _material(await source.fn(scope))
                except Exception:  # the app's code: logged, and the next source decides
                    _source_failed(source.fn)
                    material = None
            else:
                material = self._one(source, scope, found, ip)
            if material is not None:
                return material
        return _ANONYMOUS

    def _one(
        self, source: _Source, scope: Mapping[str, Any], found: Mapping[bytes, bytes], ip: str | None
    ) -> bytes | None:
        """The key material of one (not async) source, None when it names nobody."""
        kind = source.kind
        if kind == "header":
            value = found.get(source.name)
            # same material as a header:NAME policy, so both share a bucket tag
            return b"h:" + source.name + b":" + value if value else None
        if kind == "ip":
            return b"ip:" + ip.encode() if ip is not None else None
        if kind == "call":
            assert source.fn is not None
            try:
                return _material(source.fn(scope))
            except Exception:  # the app's code: logged, and the next source decides
                _source_failed(source.fn)
                return None
        return self._read(source, found)

    def _read(self, source: _Source, found: Mapping[bytes, bytes]) -> bytes | None:
        """The material of a cookie, bearer or jwt source; None when the request has none."""
        if source.kind == "cookie":
            value = cookie_value(found.get(_COOKIE), source.name)
            return b"c:" + source.name + b":" + value if value else None
        token = bearer_token(found.get(AUTHORIZATION))
        if token is None:
            return None
        if source.kind == "bearer":
            return b"bearer:" + token
        claims = self.jwt.claims(token) if self.jwt is not None else None
        value_ = claims.get(source.claim) if claims else None
        return b"jwt:" + source.claim.encode() + b":" + value_.encode() if value_ else None

    def claims(self, found: Mapping[bytes, bytes]) -> Mapping[str, str] | None:
        """The verified claims of the request's bearer JWT (None when it has none that verifies)."""
        token = bearer_token(found.get(AUTHORIZATION))
        return self.jwt.claims(token) if token is not None and self.jwt is not None else None

    def client_ip(self, scope: Mapping[str, Any], found: Mapping[bytes, bytes]) -> str | None:
        """The client's address, ``X-Forwarded-For`` believed only from trusted proxies."""
        return self._client_ip(scope, found.get(_XFF) or None)

    def peer_trusted(self, scope: Mapping[str, Any]) -> bool:
        """Whether the direct peer is one of ``trusted_proxies`` (its headers are believed)."""
        client = scope.get("client")
        if not client or not self._trusted:
            return False
        return _normalise(client[0]) in self._trusted

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


def source_headers(sources: Iterable[IdentitySource]) -> set[bytes]:
    """The request headers a list of sources reads (lowercase), callables and ``ip`` aside."""
    return {h for h in (_Source(s).header for s in sources) if h}


def cookie_value(cookie: bytes | None, name: bytes) -> bytes | None:
    """The value of cookie ``name`` in a ``Cookie`` field (lines joined with ``; ``): the first
    one, as sent (quotes kept); None when absent or empty. The stack refuses a request that
    carries the name twice (``request_check.py``), so there the first is the only one."""
    if not cookie or name not in cookie:
        return None
    for pair in cookie.split(b";"):
        key, eq, value = pair.partition(b"=")
        if eq and key.strip(b" \t") == name:
            return value.strip(b" \t") or None
    return None


def cookie_names(cookie: bytes) -> list[bytes]:
    """Every cookie name in a ``Cookie`` field, in order, repeats kept."""
    return [pair.partition(b"=")[0].strip(b" \t") for pair in cookie.split(b";") if b"=" in pair]


def _material(value: object) -> bytes | None:
    """A callable source's return value as key material: str or bytes, non-empty."""
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, bytes | bytearray) and value:
        return b"fn:" + bytes(value)
    return None


def _source_failed(fn: SourceFunction) -> None:
    _log.warning("identity source raised; trying the next one", exc_info=True,
                 extra={"event": "identity.source_error", "source": getattr(fn, "__qualname__", repr(fn))})


def _verifier(config: IdentityConfig, claims: Iterable[str]) -> JwtVerifier | None:
    """The JWT verifier of the claims wanted, on ``[identity.jwt]``; None when none is."""
    wanted = tuple(dict.fromkeys(claims))
    jwt = config.jwt
    if not wanted or jwt is None:
        return None
    keys = load_keys(jwt.algorithms, key=jwt.key, jwks=jwt.jwks)
    return JwtVerifier(keys=keys, algorithms=jwt.algorithms, audience=jwt.audience, issuer=jwt.issuer,
                       leeway_s=jwt.leeway_s, require_exp=jwt.require_exp, claims=wanted)
