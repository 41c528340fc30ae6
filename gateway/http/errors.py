"""Errors as HTTP answers: one JSON shape for every refusal, `Allow` on a 405, and each kind counted."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from gateway.auth.pacing import RefusalPacing
from gateway.errors import CallerRefused, ClientDisconnected, GatewayError
from gateway.http.route_table import served_routes

log = logging.getLogger("kdserve.gateway")


# Framework errors (routing, methods, validation) in the same shape, with kinds of their own.
HTTP_KINDS = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type"}


def error_kinds() -> list[str]:
    """Every `kind` an error response can carry (the label values of `kdserve_errors_total`)."""
    kinds, pending = {"internal", "bad_request", "shadow", "experiment_refused", "keys_file"}, [GatewayError]
    while pending:
        cls = pending.pop()
        kinds.add(cls.kind)
        pending.extend(cls.__subclasses__())
    return sorted(kinds | set(HTTP_KINDS.values()))


def error_response(
    request: Request, status: int, kind: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The one error body: `{"error": {"kind", "message"}, "request_id"}`; under `/v2`, the Open
    Inference Protocol's `{"error": "<message>"}` (the kind and id then travel in headers)."""
    rid = getattr(request.state, "rid", None)
    if request.url.path.startswith("/v2"):
        return JSONResponse({"error": message}, status_code=status, headers={"X-Error-Kind": kind} | (headers or {}))
    return JSONResponse(
        {"error": {"kind": kind, "message": message}, "request_id": rid}, status_code=status, headers=headers
    )


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at the request's path (a path with GET and PUT routes: both)."""
    methods: set[str] = set()
    for route in served_routes(request.app.router.routes):
        regex = getattr(route, "path_regex", None)
        if regex is not None and regex.match(request.url.path) and getattr(route, "methods", None):
            methods |= set(route.methods)
    return sorted(methods)


def install_error_handlers(app: FastAPI, pacing: RefusalPacing, on_error=None) -> None:
    def count(kind: str) -> None:
        if on_error:
            on_error(kind)

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        count(exc.kind)
        if isinstance(exc, CallerRefused):
            await pacing.answer_when_due(exc)
        return error_response(request, exc.status_code, exc.kind, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()))
        count("bad_request")
        return error_response(request, 400, "bad_request", f"{where}: {first['msg']}" if where else first["msg"])

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = HTTP_KINDS.get(exc.status_code, "bad_request" if exc.status_code < 500 else "internal")
        count(kind)
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # the router names the first route's methods only: every route's of the path
            headers["Allow"] = ", ".join(allowed_methods(request))
        return error_response(request, exc.status_code, kind, str(exc.detail), headers)

    @app.exception_handler(ClientDisconnect)
    async def _client_disconnected(request: Request, exc: ClientDisconnect) -> JSONResponse:
        count(ClientDisconnected.kind)
        return error_response(request, ClientDisconnected.status_code, ClientDisconnected.kind, "client disconnected")

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
        # The traceback goes to the log; the client gets the shape and the id to quote, never internals.
        log.exception("unhandled error in request %s", getattr(request.state, "rid", "?"))
        count("internal")
        # Sent from outside the request observer (which adds the id header to every other response).
        rid = getattr(request.state, "rid", None)
        return error_response(
            request,
            500,
            "internal",
            "internal error; quote the request id when reporting it",
            {"X-Request-ID": rid} if rid else None,
        )
