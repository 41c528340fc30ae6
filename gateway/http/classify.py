"""`/v1/classify`, `/v1/models` and `/v1/ab/summary`: the v1 REST routes of the classify path. Handlers stay
thin: the request is read in `reading`, the work done by `serving`."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.background import BackgroundTask

from gateway.auth.scopes import requires
from gateway.http.reading import parse_classify_request, parse_top_k, trace_carrier
from gateway.http.schemas import (
    IMAGE_MEDIA_TYPES,
    CandidateInfo,
    ClassifyJSON,
    ClassifyResponse,
    ErrorResponse,
    ModelInfo,
    ModelsResponse,
)
from gateway.serving.inference import classify_request
from gateway.serving.service import Classifier
from gateway.telemetry import tracing
from kdcontract.manifest import ModelEntry
from kdcontract.names import AUTO

router = APIRouter()


ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 413, 415, 502, 503, 504)}


# Query parameters are read in the handler, not declared as FastAPI parameters: solving them cost 9% of
# the gateway's CPU per request under load (py-spy), for two values. Documented here for OpenAPI.
CLASSIFY_OPENAPI = {
    "parameters": [
        {
            "name": "model",
            "in": "query",
            "required": False,
            "description": "student | teacher | ensemble | ensemble_triton | cascade | a served model | auto (A/B)",
            "schema": {"type": "string", "default": AUTO},
        },
        {
            "name": "top_k",
            "in": "query",
            "required": False,
            "description": "labels to return per image",
            "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 3},
        },
    ],
    "requestBody": {
        "content": {
            "multipart/form-data": {
                # Each `images` part is an image file: its content type says which.
                "encoding": {"images": {"contentType": ", ".join(IMAGE_MEDIA_TYPES)}},
                "schema": {
                    "type": "object",
                    "properties": {
                        "images": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1},
                        "model": {"type": "string"},
                        "top_k": {"type": "integer", "minimum": 1, "maximum": 100},
                    },
                    "required": ["images"],  # a form without an image is a 400, so the schema says so
                    "additionalProperties": False,
                },
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": ClassifyJSON.model_json_schema()},
        },
        "required": True,
    },
}


@router.post(
    "/v1/classify",
    response_model=ClassifyResponse,
    responses=ERRORS,
    openapi_extra=CLASSIFY_OPENAPI,
    summary="Classify one or more images",
)
@requires("classify")
async def classify(request: Request) -> Response:
    start = time.perf_counter()
    state = request.app.state
    query = request.query_params
    with tracing.request_span("POST /v1/classify", trace_carrier(request)):
        state.classifier.check_share(query.get("model") or AUTO, request.state.key_id, state.experiment.weights)
        files, model, top_k = await parse_classify_request(
            request, query.get("model") or AUTO, parse_top_k(query["top_k"]) if "top_k" in query else 3
        )
        done = await classify_request(
            state,
            request.state,
            model,
            files=files,
            sticky_key=request.headers.get(state.experiment.sticky_header),
            started=start,
        )
    outcome, arm = done.outcome, done.arm
    total_ms = (time.perf_counter() - start) * 1000
    background = BackgroundTask(done.shadow) if done.shadow is not None else None
    body = ClassifyResponse(
        request_id=request.state.rid,
        model=outcome.model,
        version=outcome.version,
        arm=arm,
        degraded=outcome.degraded,
        members=outcome.members,
        predictions=[
            {"top_k": ranked, "answered_by": by}
            for ranked, by in zip(
                state.classifier.top_k(outcome.probabilities, top_k),
                outcome.answered_by or [None] * len(files),
                strict=True,
            )
        ],
        latency={
            "decode_ms": done.decode_s * 1000,
            "inference_ms": outcome.inference_ms,
            "fusion_ms": outcome.fusion_ms,
            "total_ms": total_ms,
        },
    )
    # Serialised once by pydantic's Rust core; returning the model instead makes FastAPI validate it again.
    return Response(body.model_dump_json(), media_type="application/json", background=background)


@router.get("/v1/models", response_model=ModelsResponse, summary="Served models and their readiness")
@requires("classify")
async def models(request: Request) -> ModelsResponse:
    classifier: Classifier = request.app.state.classifier
    manifest = classifier.manifest
    names = list(manifest.models)
    pinned = [(n, v) for n in names for v in manifest.models[n].loaded_versions()]
    ready = dict(
        zip(pinned, await asyncio.gather(*(classifier.triton.model_ready(n, v) for n, v in pinned)), strict=True)
    )

    def candidate(m: ModelEntry) -> CandidateInfo | None:
        c = m.candidate
        if c is None:
            return None
        return CandidateInfo(
            version=c.version, ready=ready[m.name, c.version], top1=c.metrics.get("top1"), offline_gate=c.offline_gate
        )

    return ModelsResponse(
        aliases=classifier.aliases,
        class_names=classifier.class_names,
        models=[
            ModelInfo(
                name=n,
                role=m.role,
                arch=m.arch,
                version=m.version,
                ready=ready[n, m.version],
                precision=m.precision,
                top1=m.metrics.get("top1"),
                temperature=m.temperature,
                input_shape=m.input.shape,
                candidate=candidate(m),
            )
            for n, m in manifest.models.items()
        ],
        split=manifest.split,
    )


@router.get("/v1/ab/summary", summary="Per A/B arm: count, latency percentiles, shadow agreement")
@requires("classify")
async def ab_summary(request: Request) -> dict:
    return {"weights": request.app.state.experiment.weights, "arms": request.app.state.ab_stats.summary()}
