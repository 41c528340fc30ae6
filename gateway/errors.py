"""Domain errors and the one place that maps them to HTTP status codes."""

from __future__ import annotations

import math

ECHO_CHARS = 64  # of a caller's value quoted back in an error message


def echo(value: object) -> str:
    """A caller's value as an error message quotes it: repr, cut to ECHO_CHARS (a 5,000-character
    `?model=` must not come back whole, nor fill the log)."""
    text = repr(value)
    return text if len(text) <= ECHO_CHARS else f"{text[:ECHO_CHARS]}... ({len(text)} characters)"


class GatewayError(Exception):
    status_code = 500
    kind = "internal"

    def __init__(self, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.headers = message, headers or {}


class BadRequest(GatewayError):
    status_code, kind = 400, "bad_request"


class BadImage(GatewayError):
    status_code, kind = 400, "bad_image"


class UnknownModel(GatewayError):
    status_code, kind = 404, "unknown_model"


class PayloadTooLarge(GatewayError):
    status_code, kind = 413, "payload_too_large"


class Conflict(GatewayError):
    """The request is valid but the gateway's state does not allow it (e.g. no writable experiment file)."""

    status_code, kind = 409, "conflict"


class UnknownRequest(GatewayError):
    """Feedback for a request id with no A/B answer on record (never issued, not an A/B request, or a
    client-chosen id past the retention)."""

    status_code, kind = 404, "unknown_request"


class ForeignRequest(GatewayError):
    """Feedback for a request another API key made: only the caller that made a request may label it."""

    status_code, kind = 403, "foreign_request"


class ExpiredRequest(GatewayError):
    """Feedback for a request this gateway answered longer ago than answers are kept."""

    status_code, kind = 410, "expired_request"


class DuplicateFeedback(GatewayError):
    status_code, kind = 409, "duplicate_feedback"


class InvalidLabel(GatewayError):
    status_code, kind = 422, "invalid_label"


class ClientDisconnected(GatewayError):
    """The client went away before its request was read whole: its doing, not the gateway's. Counted, never
    logged with a traceback, never sent (nginx's 499)."""

    status_code, kind = 499, "client_disconnected"


class RequestTimeout(GatewayError):
    """The body did not arrive within its deadline. The connection is closed: the rest of the body may
    still be on its way, and is not a next request."""

    status_code, kind = 408, "request_timeout"

    def __init__(self, message: str):
        super().__init__(message, headers={"Connection": "close"})


class UnsupportedMediaType(GatewayError):
    status_code, kind = 415, "unsupported_media_type"


class Unavailable(GatewayError):
    """Triton unreachable, not ready, or an ensemble below quorum: try again later."""

    status_code, kind = 503, "unavailable"


class Overloaded(GatewayError):
    """Admission control shed the request: a model is at its in-flight bound. Retry after a moment."""

    status_code, kind = 503, "overloaded"


class CallerRefused(GatewayError):
    """Refused for the caller's own doing: over its rate, its bytes, its bound in flight, its share of a model
    or its feedback budget. A 429 that names the caller (its key id) and when it may come back, `wait_s`
    (its Retry-After: whole seconds, at least 1), so that a caller back before then can be made to wait for
    it (`gateway.auth.pacing`)."""

    status_code = 429

    def __init__(self, message: str, caller: str, wait_s: float):
        super().__init__(message, {"Retry-After": str(max(1, math.ceil(wait_s)))})
        self.caller, self.wait_s = caller, wait_s


class OverShare(CallerRefused, Overloaded):
    """The model has room, but this caller holds its share of it (admission shares a model between
    callers): the caller's doing, so a 429, with Retry-After."""

    status_code, kind = 429, "over_share"


class UpstreamError(GatewayError):
    """Triton ran the model and it failed (INTERNAL): not retryable, and Triton's text stays in the log."""

    status_code, kind = 502, "upstream_error"


class UpstreamTimeout(GatewayError):
    status_code, kind = 504, "timeout"
