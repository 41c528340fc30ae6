"""Domain errors and the one place that maps them to HTTP status codes."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

log = logging.getLogger("kdserve.gateway")


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


class UnsupportedMediaType(GatewayError):
    status_code, kind = 415, "unsupported_media_type"


class Unavailable(GatewayError):
    """Triton unreachable, not ready, or an ensemble below quorum: try again later."""

    status_code, kind = 503, "unavailable"


class Overloaded(GatewayError):
    """Admission control shed the request: a model is at its in-flight bound. Retry after a moment."""

    status_code, kind = 503, "overloaded"


class UpstreamError(GatewayError):
    """Triton ran the model and it failed (INTERNAL): not retryable, and Triton's text stays in the log."""

    status_code, kind = 502, "upstream_error"


class UpstreamTimeout(GatewayError):
    status_code, kind = 504, "timeout"


def install_error_handlers(app: FastAPI, on_error=None) -> None:
    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        if on_error:
            on_error(exc.kind)
        return JSONResponse(
            {"error": {"kind": exc.kind, "message": exc.message}, "request_id": getattr(request.state, "rid", None)},
            status_code=exc.status_code,
            headers=exc.headers,
        )
