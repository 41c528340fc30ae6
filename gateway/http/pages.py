"""The gateway's own pages, open to every caller: the web page (draw a digit, drop a photo) and
Prometheus' `/metrics`."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.auth.scopes import requires

router = APIRouter()
PAGE = (Path(__file__).parent / "static" / "index.html").read_bytes()


@router.get("/", include_in_schema=False)
@requires(None)
async def web_page() -> Response:
    """Draw a digit or drop a photo; the served models side by side (plain HTML/JS)."""
    return Response(PAGE, media_type="text/html; charset=utf-8")


@router.get("/metrics", include_in_schema=False)
@requires(None)
async def prometheus_metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
