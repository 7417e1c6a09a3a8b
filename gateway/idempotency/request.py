"""The keyed request: its Idempotency-Key, its buffered body, its fingerprint and record name.

A key is 1-255 visible ASCII characters (0x21-0x7E), sent bare (Stripe's form) or as a
Structured Field string (``"abc"``, RFC 9651 §3.3.3, the IETF draft's form); both spell the
same key. The fingerprint covers method, path, query and the body, so the same key on another
request is a mismatch (draft-ietf-httpapi-idempotency-key-header §2.4). The record name hashes
the client's identity tag with the key: the same key from two clients names two records, and no
client-chosen bytes reach a store key.
"""

from __future__ import annotations

import hashlib
import re

from gateway._asgi import Message, Receive, Scope

__all__ = ["BodyTooLarge", "ClientGone", "fingerprint", "is_json_media_type", "parse_key", "read_body",
           "record_name", "replaying"]

_BARE_KEY = re.compile(rb"[\x21-\x7e]{1,255}")
# RFC 9651 sf-string: printable ASCII, with only \" and \\ as escapes
_SF_STRING = re.compile(rb'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)"')
_SF_ESCAPE = re.compile(rb'\\(["\\])')
# application/json, and any structured +json type (RFC 6839 §3.1), parameters ignored
_TYPE_TOKEN = rb"[!#$%&'*+.^_`|~0-9a-z-]+"
_JSON_MEDIA = re.compile(rb"\s*(?:application/json|%b/%b\+json)\s*(?:;.*)?" % (_TYPE_TOKEN, _TYPE_TOKEN),
                         re.IGNORECASE | re.DOTALL)


class BodyTooLarge(Exception):
    """The request body is over ``max_body_bytes``."""


class ClientGone(Exception):
    """The client disconnected before its request body was complete (nothing ran)."""


def parse_key(raw: bytes) -> bytes | None:
    """The key a header value names, or None when it is not a valid key (a 400)."""
    if raw.startswith(b'"'):
        match = _SF_STRING.fullmatch(raw)
        if match is None:
            return None
        raw = _SF_ESCAPE.sub(rb"\1", match.group(1))
    return raw if _BARE_KEY.fullmatch(raw) else None


async def read_body(receive: Receive, limit: int) -> bytes:
    """The whole request body, at most ``limit`` bytes (chunked bodies included).

    Raises:
        BodyTooLarge: more than ``limit`` bytes arrived; the rest is not read.
        ClientGone: the client disconnected first.
    """
    chunks: list[bytes] = []
    size = 0
    while True:  # bounded: each message adds bytes until the limit, or ends the body
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge
            chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def replaying(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives the app the buffered body, then the real one (disconnects)."""
    delivered = False

    async def receive_replayed() -> Message:
        nonlocal delivered
        if delivered:
            return await receive()
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive_replayed


def is_json_media_type(content_type: bytes) -> bool:
    """Whether a Content-Type names JSON (``application/json``, ``application/merchant+json``)."""
    return _JSON_MEDIA.fullmatch(content_type) is not None


def fingerprint(scope: Scope, body: bytes) -> bytes:
    """SHA-256 (hex) of method, path, query and body, each framed by its length.

    ``body`` is the raw body, or its canonical JSON form (``canonical.canonical_json``) under
    ``fingerprint = "json"``. A canonical form is itself JSON in canonical form, so it equals
    another request's raw bytes only when those say the very same thing."""
    method = scope["method"].encode()
    path: bytes = scope.get("raw_path") or scope["path"].encode()
    query: bytes = scope.get("query_string", b"")
    digest = hashlib.sha256(b"%d:%b%d:%b%d:%b" % (len(method), method, len(path), path, len(query), query))
    digest.update(body)
    return digest.hexdigest().encode()


def record_name(identity_tag: str, key: bytes) -> str:
    """The record's name: a keyed-by-nothing hash of (identity tag, key), 128-bit hex."""
    # the tag is fixed-length hex, so the concatenation is unambiguous
    material = identity_tag.encode() + b"\n" + key
    return hashlib.blake2b(material, digest_size=16, person=b"gateway-idem").hexdigest()
