"""HTTP routes. Handlers stay thin: parsing here, the work in `service.Classifier`."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time

import numpy as np
from fastapi import APIRouter, BackgroundTasks, Query, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from gateway.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from gateway.images import decode_image
from gateway.schemas import ClassifyJSON, ClassifyResponse, ErrorResponse, ModelInfo, ModelsResponse
from gateway.service import Classifier

router = APIRouter()

ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 413, 415, 503, 504)}
CLASSIFY_BODY = {
    "requestBody": {
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "model": {"type": "string"},
                        "top_k": {"type": "integer"},
                    },
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": ClassifyJSON.model_json_schema()},
        },
        "required": True,
    }
}


async def read_body_limited(request: Request, limit: int) -> bytes:
    """The body, refusing it as soon as it passes `limit` bytes (not after buffering all of it)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the {limit}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_classify_request(request: Request, model: str, top_k: int) -> tuple[list[bytes], str, int]:
    settings = request.app.state.settings
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await read_body_limited(request, settings.max_body_bytes)
    if content_type == "multipart/form-data":
        request._body = body  # let Starlette's form parser read the bounded body we already hold
        form = await request.form(max_files=settings.max_images, max_fields=10)
        files = [await item.read() for _, item in form.multi_items() if hasattr(item, "read")]
        model = str(form.get("model") or model)
        top_k = int(form.get("top_k") or top_k) if str(form.get("top_k") or top_k).isdigit() else -1
    elif content_type.startswith("image/"):
        files = [body]
    elif content_type == "application/json":
        try:
            payload = ClassifyJSON.model_validate(json.loads(body))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequest("body is not valid JSON") from exc
        except ValidationError as exc:
            first = exc.errors()[0]
            raise BadRequest(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from exc
        try:
            files = [base64.b64decode(item, validate=True) for item in payload.images]
        except (binascii.Error, ValueError) as exc:
            raise BadRequest("images must be base64 strings") from exc
        model, top_k = payload.model, payload.top_k
    else:
        raise UnsupportedMediaType(
            f"content type {content_type or 'missing'}; send multipart/form-data, image/*, or application/json"
        )
    if not files:
        raise BadRequest("no image in the request")
    if len(files) > settings.max_images:
        raise BadRequest(f"{len(files)} images; at most {settings.max_images} per request")
    if not 1 <= top_k <= 100:
        raise BadRequest("top_k must be an integer between 1 and 100")
    return files, model, top_k


async def _shadow(classifier: Classifier, request: Request, arm: str, images: np.ndarray, primary: np.ndarray):
    """Runs after the response is sent: the other arm on the same images, compared top-1 by top-1."""
    start = time.perf_counter()
    try:
        outcome = await classifier.classify(classifier.resolve(arm), images)
    except Exception:
        request.app.state.metrics.errors.labels("shadow").inc()
        return
    latency_ms = (time.perf_counter() - start) * 1000
    agreed = bool((outcome.probabilities.argmax(-1) == primary.argmax(-1)).all())
    request.app.state.ab_stats.record_shadow(arm, latency_ms, agreed)
    request.app.state.metrics.shadow.labels(arm, str(agreed).lower()).inc()


@router.post(
    "/v1/classify",
    response_model=ClassifyResponse,
    responses=ERRORS,
    openapi_extra=CLASSIFY_BODY,
    summary="Classify one or more images",
)
async def classify(
    request: Request,
    background: BackgroundTasks,
    model: str = Query("auto", description="student | teacher | ensemble | a served model | auto (A/B)"),
    top_k: int = Query(3, description="labels to return per image"),
) -> ClassifyResponse:
    start = time.perf_counter()
    state = request.app.state
    classifier: Classifier = state.classifier
    files, model, top_k = await parse_classify_request(request, model, top_k)

    arm = None
    if model == "auto":
        arm = state.ab_router.assign(request.headers.get(state.settings.ab_key_header))
        model = arm
    target = classifier.resolve(model)
    request.state.model, request.state.arm = target, arm or ""

    decode_start = time.perf_counter()
    size, settings = classifier.image_size, state.settings
    decoded = [decode_image(f, size, settings.allowed_formats, settings.max_image_pixels) for f in files]
    images = np.stack(decoded)
    decode_s = time.perf_counter() - decode_start
    state.metrics.decode_seconds.observe(decode_s)
    decode_ms = decode_s * 1000

    outcome = await classifier.classify(target, images)
    state.metrics.images.labels(target).inc(len(images))
    total_ms = (time.perf_counter() - start) * 1000
    if arm is not None:
        state.ab_stats.record(arm, total_ms)
        shadow_arm = state.ab_router.shadow_arm(arm)
        if shadow_arm is not None:
            background.add_task(_shadow, classifier, request, shadow_arm, images, outcome.probabilities)
    return ClassifyResponse(
        request_id=request.state.rid,
        model=outcome.model,
        version=outcome.version,
        arm=arm,
        degraded=outcome.degraded,
        members=outcome.members,
        predictions=[{"top_k": ranked} for ranked in classifier.top_k(outcome.probabilities, top_k)],
        latency={
            "decode_ms": decode_ms,
            "inference_ms": outcome.inference_ms,
            "fusion_ms": outcome.fusion_ms,
            "total_ms": total_ms,
        },
    )


@router.get("/v1/models", response_model=ModelsResponse, summary="Served models and their readiness")
async def models(request: Request) -> ModelsResponse:
    classifier: Classifier = request.app.state.classifier
    manifest = request.app.state.manifest
    names = list(manifest.models)
    ready = await asyncio.gather(*(classifier.triton.model_ready(n) for n in names))
    return ModelsResponse(
        aliases=classifier.aliases,
        models=[
            ModelInfo(
                name=n,
                role=m.role,
                arch=m.arch,
                version=m.version,
                ready=r,
                precision=m.precision,
                top1=m.metrics.get("top1"),
                temperature=m.temperature,
                input_shape=m.input.shape,
            )
            for (n, m), r in zip(manifest.models.items(), ready, strict=True)
        ],
    )


@router.get("/healthz", summary="The gateway process is alive")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Triton is ready and every model the routes need is READY",
    responses={503: {"description": "not ready; the body says what is missing"}},
)
async def readyz(request: Request) -> JSONResponse:
    classifier: Classifier = request.app.state.classifier
    if not await classifier.triton.server_ready():
        return JSONResponse(
            {"ready": False, "reason": "triton not ready"},
            status_code=503,
            headers={"Retry-After": str(request.app.state.settings.retry_after_s)},
        )
    needed = classifier.routed_models()
    ready = await asyncio.gather(*(classifier.triton.model_ready(n) for n in needed))
    missing = [n for n, r in zip(needed, ready, strict=True) if not r]
    if missing:
        return JSONResponse(
            {"ready": False, "reason": "models not ready", "models": missing},
            status_code=503,
            headers={"Retry-After": str(request.app.state.settings.retry_after_s)},
        )
    return JSONResponse({"ready": True, "models": needed})


@router.get("/v1/ab/summary", summary="Per A/B arm: count, latency percentiles, shadow agreement")
async def ab_summary(request: Request) -> dict:
    return {"weights": request.app.state.settings.ab_weights, "arms": request.app.state.ab_stats.summary()}
