"""The idempotency layer's own answers, described as RFC 9457 problems (draft-ietf-httpapi-
idempotency-key-header §2.7 gives the statuses: 400 missing or bad key, 409 in flight, 422
reused) and written by the layer's renderer (``[errors] format``, ``gateway/problem.py``).

Refusals (400, 409, 413, 422, 503) are sent and never stored. Two problems describe an outcome
and are stored as the record's response, so every retry gets the same answer:

* ``outcome-unknown`` (502): the request may or may not have run (the app raised, the response
  broke off, the holder's claim was lost). It will not run again under this key.
* ``response-not-stored``: the request ran, but its response was over ``max_body_bytes``. The
  retry gets the original status and storable headers with this problem as the body, so it
  learns the outcome (e.g. 201) without the request running twice.
"""

from __future__ import annotations

from gateway._asgi import Headers, Send
from gateway.idempotency.capture import REPLAYED, encode_headers
from gateway.problem import STORE_UNAVAILABLE, Renderer, problem_type
from gateway.store import StoredResponse

__all__ = [
    "OUTCOME_UNKNOWN",
    "RESPONSE_NOT_STORED",
    "not_stored_record",
    "outcome_unknown_record",
    "send_bad_key",
    "send_body_too_large",
    "send_identity_missing",
    "send_in_flight",
    "send_mismatch",
    "send_missing_key",
    "send_not_sent",
    "send_outcome_unknown",
    "send_store_unavailable",
]

KEY_INVALID = problem_type("idempotency-key-invalid")
KEY_MISSING = problem_type("idempotency-key-missing")
BODY_TOO_LARGE = problem_type("idempotency-body-too-large")
KEY_IN_USE = problem_type("idempotency-key-in-use")
KEY_REUSED = problem_type("idempotency-key-reused")
OUTCOME_UNKNOWN = problem_type("outcome-unknown")
NOT_SENT = problem_type("upstream-not-reached")
IDENTITY_MISSING = problem_type("idempotency-identity-missing")
RESPONSE_NOT_STORED = problem_type("response-not-stored")
_RETRY_AFTER_1 = (b"retry-after", b"1")
_UNKNOWN_TITLE = "Outcome unknown"
_UNKNOWN_DETAIL = (
    "The request with this Idempotency-Key may or may not have been carried out, and it will not "
    "run again under this key. Check its effect before retrying with a new key."
)
# representation headers that described the body a too-large record does not keep
_BODY_HEADERS = (b"content-", b"etag", b"last-modified", b"digest", b"repr-digest")


async def send_bad_key(render: Renderer, send: Send, header: str) -> None:
    await render.send(
        send, status=400, type_=KEY_INVALID, title="Invalid Idempotency-Key",
        detail=f"{header} must be one value of 1-255 visible ASCII characters (0x21-0x7E), "
               'bare or as a quoted string ("...").',
    )


async def send_missing_key(render: Renderer, send: Send, header: str) -> None:
    await render.send(
        send, status=400, type_=KEY_MISSING, title="Idempotency-Key is missing",
        detail=f"This endpoint requires an {header} header: retries must be safe here.",
    )


async def send_body_too_large(render: Renderer, send: Send, limit: int) -> None:
    await render.send(
        send, status=413, type_=BODY_TOO_LARGE, title="Request body too large for an idempotent request",
        detail=f"A request with an Idempotency-Key may carry at most {limit} bytes of body.",
    )


async def send_in_flight(render: Renderer, send: Send) -> None:
    await render.send(
        send, status=409, type_=KEY_IN_USE, title="A request is outstanding for this Idempotency-Key",
        detail="The first request with this key is still running; retry shortly to get its response.",
        headers=[_RETRY_AFTER_1],
    )


async def send_mismatch(render: Renderer, send: Send) -> None:
    await render.send(
        send, status=422, type_=KEY_REUSED, title="Idempotency-Key is already used",
        detail="This key was used with a different request (method, path, query or body); "
               "use a new key for a new request.",
    )


async def send_store_unavailable(render: Renderer, send: Send) -> None:
    await render.send(
        send, status=503, type_=STORE_UNAVAILABLE, title="Idempotency store unavailable",
        detail="The request was not run: its Idempotency-Key could not be checked. Retry later.",
        headers=[_RETRY_AFTER_1],
    )


async def send_outcome_unknown(render: Renderer, send: Send, *, replayed: bool) -> None:
    """502 outcome unknown: to the request that broke off, or (``replayed``) to a retry of a
    lost claim."""
    await render.send(
        send, status=502, type_=OUTCOME_UNKNOWN, title=_UNKNOWN_TITLE, detail=_UNKNOWN_DETAIL,
        headers=[REPLAYED] if replayed else [],
    )


async def send_not_sent(render: Renderer, send: Send) -> None:
    """502 for a request that ended without an answer after the app said it never left."""
    await render.send(
        send, status=502, type_=NOT_SENT, title="Upstream not reached",
        detail="The request did not reach the upstream and was not carried out; "
               "retrying with the same Idempotency-Key runs it.",
    )


async def send_identity_missing(render: Renderer, send: Send, header: str) -> None:
    """400 for a keyed request from a client the identity sources cannot name."""
    await render.send(
        send, status=400, type_=IDENTITY_MISSING, title="No client identity for the Idempotency-Key",
        detail=f"An {header} is scoped to the client, and none of the configured identity sources "
               "named one for this request, so its response could not be kept apart from others'.",
    )


def outcome_unknown_record(render: Renderer) -> StoredResponse:
    """The stored outcome of a request that may or may not have run."""
    status, headers, body = render.record(status=502, type_=OUTCOME_UNKNOWN, title=_UNKNOWN_TITLE,
                                          detail=_UNKNOWN_DETAIL)
    return StoredResponse(status, encode_headers(headers), body)


def not_stored_record(render: Renderer, status: int, headers: Headers, limit: int) -> StoredResponse:
    """The stored outcome of a request whose response was too large to keep; ``headers`` are
    its storable headers (``Capture.headers``). It keeps the original status, whatever the
    format: the request was carried out."""
    _, own, body = render.record(
        status=status, type_=RESPONSE_NOT_STORED, title="Response too large to replay",
        detail=f"The request was carried out and answered {status}, but its response was over "
               f"{limit} bytes and was not stored. It will not run again under this key.",
        extensions={"original-status": status},
    )
    kept = [(n, v) for n, v in headers if not n.lower().startswith(_BODY_HEADERS)]
    blob = encode_headers([*own, *kept])
    if len(blob) + len(body) > limit:
        blob = encode_headers(own)
    return StoredResponse(status, blob, body)
