"""HTTP routes. Handlers stay thin: parsing here, the work in `service.Classifier`."""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field, TypeAdapter, ValidationError
from starlette.background import BackgroundTask
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser, parse_options_header

from gateway import tracing
from gateway.errors import (
    BadRequest,
    Conflict,
    GatewayError,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
    echo,
)
from gateway.experiment import (
    Experiment,
    ExperimentRefused,
    apply_experiment,
    check_arms,
    parse_experiment,
    write_experiment,
)
from gateway.feedback import MAX_ITEMS, FeedbackBatch, FeedbackItem, FeedbackResult
from gateway.gates import arm_statistics, judge
from gateway.inference import classify_request
from gateway.keys import requires
from gateway.schemas import (
    CLASSIFY_JSON_MAX_COMMAS,
    IMAGE_MEDIA_TYPES,
    ClassifyJSON,
    ClassifyResponse,
    ErrorResponse,
    ExperimentResponse,
    ModelInfo,
    ModelsResponse,
    inline_schema,
)
from gateway.service import Classifier
from gateway.settings import MAX_IMAGES_PER_REQUEST
from kdcontract.names import AUTO

router = APIRouter()
T = TypeVar("T")
FEEDBACK_ITEM = TypeAdapter(FeedbackItem)
# fail_fast and the length bound: a list of 349k empty objects is refused at its first, not listed whole.
FEEDBACK_LIST = TypeAdapter(Annotated[list[FeedbackItem], Field(min_length=1, max_length=MAX_ITEMS, fail_fast=True)])


def validate_feedback(body: bytes) -> FeedbackItem | list[FeedbackItem]:
    """One item or a list of them; the first byte chooses, so an error names what was wrong with that form
    (a union would report the other form's error too)."""
    return (FEEDBACK_LIST if body.lstrip()[:1] == b"[" else FEEDBACK_ITEM).validate_json(body)


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
TOP_K = re.compile(r"[0-9]{1,3}")  # ASCII digits only: str.isdigit() also accepts '²', which int() refuses


async def _limited(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The body's chunks, refused as soon as they pass `limit` bytes (never buffered past it), or when the
    whole body has not arrived within the body deadline (a client trickling it holds the request)."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and len(declared) <= 12 and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the {limit}-byte limit")
    timeout_s = request.app.state.settings.body_timeout_s
    deadline = asyncio.get_running_loop().time() + timeout_s
    chunks = request.stream().__aiter__()
    size = 0
    while True:
        try:
            async with asyncio.timeout_at(deadline):  # around the one await: never across a yield
                chunk = await anext(chunks)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise RequestTimeout(f"the request body did not arrive within {timeout_s:g} s") from None
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the {limit}-byte limit")
        yield chunk


async def read_body_limited(request: Request, limit: int) -> bytes:
    return b"".join([chunk async for chunk in _limited(request, limit)])


def parse_json_body(validate: Callable[[bytes], T], body: bytes, invalid: type[GatewayError] = BadRequest) -> T:
    """`validate(body)` in one parse (pydantic reports broken JSON as `json_invalid`): broken JSON is a
    400, a body that does not validate an `invalid` error naming the first field at fault."""
    try:
        return validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            raise BadRequest(f"body is not valid JSON: {first['msg']}") from exc
        where = ".".join(map(str, first["loc"])) or "body"
        raise invalid(f"{where}: {first['msg']}") from exc


def parse_classify_json(body: bytes) -> ClassifyJSON:
    """A JSON classify body, refused before parsing when it has more values than one can hold."""
    if body.count(b",") > CLASSIFY_JSON_MAX_COMMAS:
        raise BadRequest(
            f"a classify body holds at most {MAX_IMAGES_PER_REQUEST} images and two options; "
            f"this one has more than {CLASSIFY_JSON_MAX_COMMAS} values"
        )
    return parse_json_body(ClassifyJSON.model_validate_json, body)


def trace_carrier(request: Request) -> dict[str, str]:
    """The headers a caller's trace context may arrive in (read only while tracing is on)."""
    if not tracing.enabled():
        return {}
    return {k: v for k, v in request.headers.items() if k in ("traceparent", "tracestate")}


def parse_top_k(text: str) -> int:
    if not TOP_K.fullmatch(text) or not 1 <= int(text) <= 100:
        raise BadRequest("top_k must be an integer between 1 and 100")
    return int(text)


class ImagePartsParser(MultiPartParser):
    """Starlette takes a part without a filename for a text field (decoded as text: lossy for an image's
    bytes, and counted against the field limit); an `images` part is a file whether or not its client
    named one, as RFC 7578 makes the filename optional."""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._current_part.content_disposition)
        if options.get(b"name") == b"images" and b"filename" not in options:
            self._current_part.content_disposition += b'; filename="image"'
        super().on_headers_finished()


async def _multipart(request: Request, limit: int, max_images: int) -> FormData:
    parser = ImagePartsParser(
        request.headers, _limited(request, limit), max_files=max_images, max_fields=10, max_part_size=limit
    )
    try:
        return await parser.parse()
    except MultiPartException as exc:
        raise BadRequest(f"multipart body: {exc.message}") from exc


FORM_FIELDS = ("model", "top_k")  # beside the `images` files: what the schema documents, once each


async def _form_parts(form: FormData) -> tuple[list[bytes], dict[str, str]]:
    """The `images` files and the fields of a classify form; any other part, or a field given twice (which
    one would count?), is refused as the schema says (`additionalProperties: false`)."""
    files, fields = [], {}
    for name, value in form.multi_items():
        if name == "images" and isinstance(value, UploadFile):
            files.append(await value.read())
        elif name not in FORM_FIELDS or not isinstance(value, str):
            raise BadRequest(f"form part {echo(name)} is not one of: images (files), {', '.join(FORM_FIELDS)}")
        elif name in fields:
            raise BadRequest(f"form field {echo(name)} given more than once")
        else:
            fields[name] = value
    return files, fields


async def parse_classify_request(request: Request, model: str, top_k: int) -> tuple[list[bytes], str, int]:
    """(image files, model, top_k). A model or top_k in the body overrides the query parameter."""
    settings = request.app.state.settings
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        form = await _multipart(request, settings.max_body_bytes, settings.max_images)
        try:
            files, fields = await _form_parts(form)
        finally:
            await form.close()
        model = fields.get("model") or model
        if "top_k" in fields:
            top_k = parse_top_k(fields["top_k"])
    elif content_type.startswith("image/"):
        files = [await read_body_limited(request, settings.max_body_bytes)]
    elif content_type == "application/json":
        body = await read_body_limited(request, settings.max_body_bytes)
        payload = parse_classify_json(body)
        try:
            files = [base64.b64decode(item, validate=True) for item in payload.images]
        except (binascii.Error, ValueError) as exc:
            raise BadRequest("images must be base64 strings") from exc
        model = payload.model or model
        top_k = payload.top_k or top_k
    else:
        raise UnsupportedMediaType(
            f"content type {content_type or 'missing'}; send multipart/form-data, image/*, or application/json"
        )
    if not files:
        raise BadRequest("no image in the request")
    if len(files) > settings.max_images:
        raise BadRequest(f"{len(files)} images; at most {settings.max_images} per request")
    return files, model, top_k


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
    ready = await asyncio.gather(*(classifier.triton.model_ready(n, manifest.models[n].version) for n in names))
    return ModelsResponse(
        aliases=classifier.aliases,
        class_names=classifier.class_names,
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
        split=manifest.split,
    )


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
    versions = {n: state.classifier.manifest.models[n].version for n in needed}
    return JSONResponse({"ready": True, "models": needed, "versions": versions})


async def not_ready(state) -> tuple[str | None, list[str]]:
    """Why this gateway cannot serve every route now (None when it can), and the models not READY:
    draining, Triton not ready, or a model some route needs not loaded (`/readyz`, `/v2/health/ready`)."""
    classifier: Classifier = state.classifier
    if getattr(state, "draining", False):
        return "draining: shutting down", []
    if not await classifier.triton.server_ready():
        return "triton not ready", []
    needed = classifier.routed_models(state.experiment.weights)
    versions = {n: classifier.manifest.models[n].version for n in needed}
    ready = await asyncio.gather(*(classifier.triton.model_ready(n, v) for n, v in versions.items()))
    missing = [n for n, r in zip(needed, ready, strict=True) if not r]
    return ("models not ready", missing) if missing else (None, [])


@router.get("/v1/ab/summary", summary="Per A/B arm: count, latency percentiles, shadow agreement")
@requires("classify")
async def ab_summary(request: Request) -> dict:
    return {"weights": request.app.state.experiment.weights, "arms": request.app.state.ab_stats.summary()}


EXPERIMENT_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 409, 422)}


@router.get("/v1/experiment", response_model=ExperimentResponse, summary="The A/B experiment this gateway runs")
@requires("classify")
async def get_experiment(request: Request) -> Response:
    return await _experiment_figures(request)


@router.put(
    "/v1/experiment",
    response_model=ExperimentResponse,
    responses=EXPERIMENT_ERRORS,
    openapi_extra={"requestBody": {"content": {"application/json": {"schema": inline_schema(Experiment)}}}},
    summary="Change the A/B experiment (admin): every replica following its file takes it up",
)
@requires("admin")
async def put_experiment(request: Request) -> Response:
    state = request.app.state
    body = await read_body_limited(request, 64 * 1024)
    experiment = parse_json_body(parse_experiment, body, ExperimentRefused)
    check_arms(state.classifier.manifest, experiment)
    path = state.settings.experiment_file
    if path is None:
        raise Conflict("no experiment file is configured (KDSERVE_EXPERIMENT_FILE): replicas would not follow")
    try:
        write_experiment(path, experiment)
    except OSError as exc:
        raise Conflict(f"the experiment file cannot be written ({exc.strerror}); change it where it is kept") from exc
    apply_experiment(request.app, experiment)
    if state.experiment_follower is not None:
        state.experiment_follower.mark_written()
    return await _experiment_figures(request)


async def _experiment_figures(request: Request) -> Response:
    """The experiment with this replica's figures, computed and serialised off the event loop: at a million
    samples per arm the intervals take ~3 ms of CPU (`make bench`: benchmarks/experiment_read.json), which
    would hold every other request. Readers arriving while it is computed share that computation. The
    answer is a ready `Response`: FastAPI would otherwise validate and encode the model again on the loop
    (`response_model` still documents it)."""
    body = await request.app.state.figures.read(lambda: _experiment_response(request).model_dump_json().encode())
    return Response(body, media_type="application/json")


def _experiment_response(request: Request) -> ExperimentResponse:
    state = request.app.state
    path = state.settings.experiment_file
    experiment, counts = state.experiment, state.local_step.counts()
    return ExperimentResponse(
        experiment=experiment,
        source="file" if path is not None and path.is_file() else "settings",
        file=str(path) if path is not None else None,
        this_replica={
            "since": state.local_step.started,
            "step": judge(experiment, counts, state.local_step.age_s()).as_dict(),
            "arms": arm_statistics(experiment, counts),
        },
    )


FEEDBACK_ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 409, 410, 413, 422)}
FEEDBACK_BODY = {
    "oneOf": [
        FeedbackItem.model_json_schema(),
        {"type": "array", "items": FeedbackItem.model_json_schema(), "minItems": 1, "maxItems": MAX_ITEMS},
    ]
}


@router.post(
    "/v1/feedback",
    response_model=FeedbackResult | FeedbackBatch,
    responses=FEEDBACK_ERRORS,
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": FEEDBACK_BODY}}}},
    summary="Ground truth for A/B requests: joined to what each arm (and the shadow) answered",
)
@requires("classify")
async def feedback(request: Request) -> Response:
    """One item: 200, or its error (404 unknown id, 410 expired, 409 already counted, 422 not a class).
    A list: 200 with one result per item, each with the status it would have had alone."""
    state = request.app.state
    if state.feedback is None:
        raise Conflict("no answer store is configured (KDSERVE_ANSWERS_DIR): feedback cannot be joined")
    body = await read_body_limited(request, 1024 * 1024)
    parsed = parse_json_body(validate_feedback, body)
    items = [parsed] if isinstance(parsed, FeedbackItem) else parsed
    joined = await state.feedback.accept_all(items)
    results = [
        FeedbackResult(request_id=item.request_id, status=r.status_code, outcome=r.kind, message=r.message)
        if isinstance(r, GatewayError)
        else r
        for item, r in zip(items, joined, strict=True)
    ]
    _capture_labels(state.capture, items, results)
    if isinstance(parsed, FeedbackItem):
        if isinstance(joined[0], GatewayError):
            raise joined[0]
        return Response(results[0].model_dump_json(), media_type="application/json")
    return Response(FeedbackBatch(results=results).model_dump_json(), media_type="application/json")


def _capture_labels(capture, items: list[FeedbackItem], results: list[FeedbackResult]) -> None:
    """Accepted labels join the captured images of their requests (in the capture's labels segments)."""
    if capture is None:
        return
    for item, result in zip(items, results, strict=True):
        if result.status == 200:
            capture.labels(item.request_id, [item.label] if isinstance(item.label, str) else item.label)
