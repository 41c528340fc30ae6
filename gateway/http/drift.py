"""`GET /v1/drift`: each served version's drift test as last judged (gateway/serving/drift.py)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from gateway.auth.scopes import requires

router = APIRouter()


@router.get("/v1/drift", summary="Each served version's answers against its validation reference, as last judged")
@requires("classify")
async def drift(request: Request) -> dict:
    monitor = request.app.state.drift
    return {
        "tolerance": monitor.tolerance,
        "alpha": monitor.alpha,
        "interval_s": monitor.interval_s,
        "min_images": monitor.min_images,
        "versions": monitor.verdicts,
    }
