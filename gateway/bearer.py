"""Bearer tokens: the token of ``Authorization: Bearer ...``, and the claims of a verified JWT.

``bearer_token`` reads the token (RFC 6750 §2.1: the scheme is case-insensitive, RFC 9110
§11.1; the token is one ``token68``). ``JwtVerifier`` verifies a JWT with the key (or JWKS
file) of ``[identity.jwt]`` through PyJWT, an optional dependency (``pip install
'gateway[jwt]'``), and returns the claims the gateway reads from it.

What is believed, and why:

* The algorithms are the configured ones, never the token's ``alg`` alone and never ``none``
  (RFC 8725 §3.1: the algorithm-confusion attacks); config refuses mixing families, so an
  RSA public key can never be used as an HMAC secret.
* ``exp`` and ``nbf`` (and ``iat``) are checked with ``leeway`` seconds of clock skew; ``exp``
  is required unless ``require_exp = false``; ``aud`` and ``iss`` when configured (a token
  that names an audience needs ``audience`` set: PyJWT refuses it otherwise).
* Any token that does not verify (forged, expired, another key's, malformed, a claim of the
  wrong type) is no value at all: the identity chain falls through to its next source. The
  client never learns why: no error page to probe the verifier with.

Verifying costs tens of microseconds (RSA, ECDSA) on every request that carries the token, so
the outcome is cached per process in a bounded LRU keyed by the token's BLAKE2b hash (never the
token itself): a verified token is answered from the cache until its ``exp`` (plus leeway),
a forged or expired one is remembered as no value. A token not valid yet (``nbf``) is not
cached. Keys are read once, at load: rotating a key (or a JWKS file) takes a restart.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["ALGORITHM_FAMILIES", "CACHE_SIZE", "JwtVerifier", "bearer_token", "claim_value", "jwt_available",
           "load_keys"]

#: Verified (and refused) tokens remembered per verifier.
CACHE_SIZE = 10_000

#: The algorithms a config may pin, by family: one family per config, so a key is only ever
#: used the way it was meant (an RSA public key is never taken as an HMAC secret).
ALGORITHM_FAMILIES: Mapping[str, str] = {
    **dict.fromkeys(("HS256", "HS384", "HS512"), "HMAC"),
    **dict.fromkeys(("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"), "RSA"),
    **dict.fromkeys(("ES256", "ES256K", "ES384", "ES512"), "EC"),
    "EdDSA": "OKP",
}
_TOKEN68 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/="
_BEARER = b"bearer"
_NOT_CACHED = math.nan  # a refusal that may turn into a pass (nbf): never remembered


def jwt_available() -> bool:
    """Whether PyJWT is installed (the ``jwt`` extra)."""
    import importlib.util

    return importlib.util.find_spec("jwt") is not None


def bearer_token(authorization: bytes | None) -> bytes | None:
    """The token of ``Authorization: Bearer <token>``; None for any other value."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(b" ")
    if scheme.lower() != _BEARER:
        return None
    token = token.strip(b" ")
    if not token or token.translate(None, _TOKEN68) or b"=" in token.rstrip(b"="):
        return None  # not one token68 (RFC 9110 §11.2): "=" only as trailing padding
    return token


def claim_value(value: object) -> str | None:
    """A claim as key material: a non-empty string, or a whole number; anything else is none."""
    if isinstance(value, str):
        return value or None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


class JwtVerifier:
    """Verifies bearer JWTs with the configured key; the claims it was asked for, cached.

    Args:
        keys: ``kid`` -> key object, from a JWKS file; a single key under ``None`` otherwise
            (also the key of a JWKS file holding one key, for a token without ``kid``).
        algorithms: the pinned algorithms.
        audience, issuer: checked when set.
        leeway_s: clock skew allowed on ``exp``, ``nbf`` and ``iat``.
        require_exp: whether a token without ``exp`` is refused.
        claims: the claims the gateway reads (``sub``, ``plan``...): only they are cached.
        cache_size: tokens remembered.
    """

    __slots__ = ("_algorithms", "_audience", "_cache", "_claims", "_issuer", "_jwt", "_keys", "_leeway",
                 "_max", "_options")

    def __init__(
        self, *, keys: Mapping[str | None, Any], algorithms: Iterable[str], audience: tuple[str, ...] = (),
        issuer: str = "", leeway_s: float = 10.0, require_exp: bool = True, claims: Iterable[str] = (),
        cache_size: int = CACHE_SIZE,
    ) -> None:
        import jwt

        self._jwt = jwt.PyJWT()
        self._keys = dict(keys)
        self._algorithms = list(algorithms)
        self._audience: list[str] | None = list(audience) or None
        self._issuer = issuer or None
        self._leeway = leeway_s
        self._options: Any = {"require": ["exp"] if require_exp else [],
                              "verify_iss": bool(issuer), "verify_aud": True}
        self._claims = tuple(dict.fromkeys(claims))
        self._max = cache_size
        # hash -> (claims read, valid until: exp + leeway); (None, inf) for a refused token
        self._cache: OrderedDict[bytes, tuple[dict[str, str] | None, float]] = OrderedDict()

    def claims(self, token: bytes, now: float | None = None) -> dict[str, str] | None:
        """The wanted claims of ``token`` (those it has, as ``claim_value`` gives them) when it
        verifies now; None when it does not."""
        now = time.time() if now is None else now
        digest = hashlib.blake2b(token, digest_size=16, person=b"gateway-jwt").digest()
        cache = self._cache
        hit = cache.get(digest)
        if hit is not None:
            claims, until = hit
            if now <= until:
                cache.move_to_end(digest)
                return claims
            cache[digest] = (None, math.inf)  # expired since it was verified: expired for good
            return None
        claims, until = self._verify(token)
        if not math.isnan(until):
            if len(cache) >= self._max:
                cache.popitem(last=False)
            cache[digest] = (claims, until)
        return claims

    def _verify(self, token: bytes) -> tuple[dict[str, str] | None, float]:
        """(the wanted claims, until when they hold), or (None, inf) for a token that never will
        verify, or (None, nan) for one refused for now only (``nbf``: not remembered)."""
        import jwt

        try:
            header = jwt.get_unverified_header(token)
            kid = header.get("kid")
            key = self._keys.get(kid) if isinstance(kid, str) else None
            if key is None:
                key = self._keys.get(None)
            if key is None:
                return None, math.inf  # no key of ours signed it
            payload = self._jwt.decode(
                token, key, algorithms=self._algorithms, options=self._options, audience=self._audience,
                issuer=self._issuer, leeway=self._leeway)
        except jwt.ImmatureSignatureError:
            return None, _NOT_CACHED  # valid later: ask again then
        except (jwt.PyJWTError, ValueError, TypeError, UnicodeDecodeError):
            return None, math.inf  # forged, expired, malformed: never an identity
        found = {}
        for name in self._claims:
            value = claim_value(payload.get(name))
            if value is not None:
                found[name] = value
        exp = payload.get("exp")
        if isinstance(exp, int | float) and not isinstance(exp, bool):
            return found, float(exp) + self._leeway
        return found, math.inf


def load_keys(algorithms: tuple[str, ...], *, key: bytes | None = None, jwks: str | None = None
              ) -> dict[str | None, Any]:
    """The verification keys, by ``kid`` (``None``: the key for a token that names none).

    ``key``: one PEM public key (or certificate), or an HMAC secret, for ``algorithms``' family;
    ``jwks``: a JWKS document (RFC 7517 §5). Raises ``ValueError`` with the reason, for the
    config error line."""
    import jwt
    from jwt.algorithms import get_default_algorithms

    family = ALGORITHM_FAMILIES[algorithms[0]]
    if key is not None:
        if family == "HMAC":
            shortest = max(int(a[2:]) for a in algorithms) // 8
            if len(key) < shortest:
                msg = (f"an HMAC secret for {', '.join(algorithms)} needs at least {shortest} bytes "
                       f"(RFC 7518 §3.2), got {len(key)}")
                raise ValueError(msg)
        try:
            prepared = get_default_algorithms()[algorithms[0]].prepare_key(key)
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            msg = f"not a {family} key for {algorithms[0]}: {exc}"
            raise ValueError(msg) from None
        return {None: prepared}
    assert jwks is not None
    try:
        keyset = jwt.PyJWKSet.from_json(jwks)
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        msg = f"not a usable JWKS document: {exc}"
        raise ValueError(msg) from None
    keys: dict[str | None, Any] = {}
    for jwk in keyset.keys:
        if ALGORITHM_FAMILIES.get(jwk.algorithm_name) != family:
            msg = (f"key {jwk.key_id or '(no kid)'} is for {jwk.algorithm_name}, not the {family} family "
                   "of algorithms")
            raise ValueError(msg)
        if jwk.key_id is None and len(keyset.keys) > 1:
            msg = "with several keys, each needs a kid (the token's kid picks its key)"
            raise ValueError(msg)
        keys[jwk.key_id] = jwk.key
    if len(keys) == 1:
        keys[None] = next(iter(keys.values()))
    return keys
