"""Keys and tokens for the JWT tests: an RSA and an EC key pair made once per process, an HMAC
secret, and ``token()`` to sign claims with any of them (or forge one)."""

from __future__ import annotations

import functools
import json
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

#: An HMAC secret long enough for HS256 (RFC 7518 §3.2: at least 32 bytes).
SECRET = "s" * 40


@functools.cache
def rsa_key(which: int = 0) -> rsa.RSAPrivateKey:
    """An RSA private key (``which`` tells two apart: one signs, the other forges)."""
    del which
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@functools.cache
def ec_key(which: int = 0) -> ec.EllipticCurvePrivateKey:
    del which
    return ec.generate_private_key(ec.SECP256R1())


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def jwks(*pairs: tuple[str, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey]) -> str:
    """A JWKS document of the public halves, each under its ``kid``."""
    keys = []
    for kid, key in pairs:
        public = key.public_key()
        as_jwk = jwt.algorithms.RSAAlgorithm.to_jwk if isinstance(key, rsa.RSAPrivateKey) \
            else jwt.algorithms.ECAlgorithm.to_jwk
        jwk: dict[str, Any] = json.loads(as_jwk(public))  # type: ignore[arg-type]
        jwk["kid"] = kid
        keys.append(jwk)
    return json.dumps({"keys": keys})


def token(claims: dict[str, Any] | None = None, *, key: Any = None, algorithm: str = "RS256",
          kid: str | None = None, ttl_s: float = 300.0, **more: Any) -> str:
    """A signed JWT: ``sub`` "user-1" and an ``exp`` ``ttl_s`` from now unless given."""
    body: dict[str, Any] = {"sub": "user-1", "exp": int(time.time() + ttl_s)}
    body.update(claims or {})
    body.update(more)
    body = {k: v for k, v in body.items() if v is not None}
    signing = key if key is not None else (rsa_key() if algorithm.startswith(("RS", "PS")) else
                                           ec_key() if algorithm.startswith("ES") else SECRET)
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(body, signing, algorithm=algorithm, headers=headers)


def unsigned(claims: dict[str, Any] | None = None) -> str:
    """An ``alg: none`` token: what a forger sends when a verifier takes the token's word."""
    body = {"sub": "user-1", "exp": int(time.time() + 300), **(claims or {})}
    return jwt.encode(body, None, algorithm="none")


def bearer(value: str) -> tuple[bytes, bytes]:
    return (b"authorization", b"Bearer " + value.encode())
