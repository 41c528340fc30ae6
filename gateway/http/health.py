"""Liveness and readiness over HTTP (`/healthz`, `/readyz`), open to every caller."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from gateway.auth.scopes import requires
from gateway.serving.health import not_ready

router = APIRouter()


@router.get("/healthz", summary="The gateway process is alive")
@requires(None)
async def healthz() -> dict:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Triton is ready and every model the routes need is READY",
    responses={503: {"description": "not ready; the body says what is missing"}},
)
@requires(None)
async def readyz(request: Request) -> JSONResponse:
    state = request.app.state
    reason, missing = await not_ready(state)
    if reason is not None:
        body = {"ready": False, "reason": reason} | ({"models": missing} if missing else {})
        headers = {} if reason.startswith("draining") else {"Retry-After": str(state.settings.retry_after_s)}
        return JSONResponse(body, status_code=503, headers=headers)
    needed = state.classifier.routed_models(state.experiment.weights)
    versions = {n: state.classifier.pinned(n)[1] for n in needed}
    return JSONResponse({"ready": True, "models": needed, "versions": versions})
