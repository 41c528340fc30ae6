"""The Open Inference Protocol's REST binding on the gateway: `/v2`, health, model metadata, readiness,
configuration and `infer`, with JSON tensors and the binary tensor data extension (`gateway.v2` says
what the models take). Errors use the protocol's body, `{"error": "..."}`, with the same status codes
as `/v1/classify`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.background import BackgroundTask

from gateway.auth.scopes import requires
from gateway.errors import BadRequest, UnsupportedMediaType, echo
from gateway.http.reading import parse_json_body, read_body_limited, trace_carrier
from gateway.http.schemas import V2_ERRORS, InferRequest, inline_schema
from gateway.serving.health import not_ready
from gateway.serving.inference import classify_request, describe
from gateway.serving.service import Classifier
from gateway.settings import GatewaySettings
from gateway.telemetry import tracing
from gateway.v2 import models as v2_models
from gateway.v2 import tensors as v2_tensors
from kdcontract.names import V2_OUTPUT

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol v2"])
HEADER_LENGTH = "inference-header-content-length"


INFER_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": inline_schema(InferRequest)},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "the binary tensor data extension: the JSON header, then the tensors' bytes; "
                "the header's length in Inference-Header-Content-Length",
            },
        },
    }
}


def _classifier(request: Request) -> Classifier:
    return request.app.state.classifier


@router.get("", summary="Server metadata")
@requires(None)
async def server_metadata() -> dict:
    return {"name": v2_models.SERVER_NAME, "version": v2_models.SERVER_VERSION, "extensions": v2_models.EXTENSIONS}


NO_BODY = {"response_class": Response, "responses": {400: {"description": "false"}}}


@router.get("/health/live", summary="The gateway is live (200)", **NO_BODY)
@requires(None)
async def live() -> Response:
    return Response(status_code=200)


@router.get("/health/ready", summary="Ready (200) or not (400, as the protocol defines)", **NO_BODY)
@requires(None)
async def ready(request: Request) -> Response:
    reason, _ = await not_ready(request.app.state)
    return Response(status_code=200 if reason is None else 400)


def _model_routes(suffix: str):
    """`/models/{name}{suffix}` and `/models/{name}/versions/{version}{suffix}` for one handler.

    Handlers take only the request and read the path with `_model_name`: FastAPI's parameter solving
    cost the gateway CPU per request (as for `/v1/classify`), so the parameters are declared for the
    OpenAPI document by hand."""

    def register(handler):
        requires("classify")(handler)  # every model route: metadata, config, readiness and inference
        for versioned in (False, True):
            path = "/models/{name}" + ("/versions/{version}" if versioned else "") + suffix
            parameters = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
            if versioned:
                parameters.append({"name": "version", "in": "path", "required": True, "schema": {"type": "string"}})
            extra: dict = {"openapi_extra": {"parameters": parameters}}
            if suffix == "/infer":
                extra["openapi_extra"] |= INFER_OPENAPI
            if suffix == "/ready":
                extra["response_class"] = Response
            method = router.post if suffix == "/infer" else router.get
            method(path, responses=V2_ERRORS, summary=handler.__doc__.split("\n")[0], **extra)(handler)
        return handler

    return register


def _model_name(request: Request) -> tuple[str, str | None]:
    """The model and version (None: any) a model route names, the version checked against it."""
    name, version = request.path_params["name"], request.path_params.get("version")
    v2_models.check_version(request.app.state.classifier, name, version)
    return name, version


@_model_routes("")
async def model_metadata(request: Request) -> dict:
    """Model metadata: versions, the input and the output"""
    name, _ = _model_name(request)
    return v2_models.metadata(_classifier(request), name)


@_model_routes("/config")
async def model_config(request: Request) -> dict:
    """Model configuration in Triton's JSON form (the batch size perf_analyzer reads)"""
    name, _ = _model_name(request)
    return v2_models.config(_classifier(request), name, request.app.state.settings.max_images)


@_model_routes("/ready")
async def model_ready(request: Request) -> Response:
    """Ready (200) when every Triton model it calls is; else 400"""
    name, _ = _model_name(request)
    ready = await v2_models.model_ready(_classifier(request), name, request.app.state.experiment.weights)
    return Response(status_code=200 if ready else 400)


def _split_body(request: Request, body: bytes) -> tuple[bytes, bytes]:
    """(JSON header, binary tensor data) of a request body."""
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding != "identity":
        raise UnsupportedMediaType(f"content encoding {echo(encoding)} is not accepted; send the body uncompressed")
    declared = request.headers.get(HEADER_LENGTH)
    if declared is None:
        return body, b""
    # At most 12 digits before int(): Python refuses to parse more than 4,300 (a ValueError, once a 500).
    if not (declared.isascii() and declared.isdigit() and len(declared) <= 12) or not 0 < int(declared) <= len(body):
        raise BadRequest(
            f"Inference-Header-Content-Length {echo(declared)} is not a length within the {len(body)}-byte body"
        )
    return body[: int(declared)], body[int(declared) :]


def _tensors(parsed: InferRequest, binary: bytes) -> list[v2_tensors.Tensor]:
    """The request's inputs with their data: JSON lists, or slices of the binary section in order."""
    tensors, offset = [], 0
    for item in parsed.inputs:
        size = (item.parameters or {}).get("binary_data_size")
        if size is None:
            tensors.append(v2_tensors.Tensor(item.name, item.datatype, item.shape, item.data))
            continue
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
            raise BadRequest(f"input {item.name}: binary_data_size {echo(size)} runs past the {len(binary)} bytes sent")
        if item.data is not None:
            raise BadRequest(f"input {item.name}: both JSON data and binary_data_size")
        tensors.append(v2_tensors.Tensor(item.name, item.datatype, item.shape, binary[offset : offset + size]))
        offset += size
    if offset != len(binary):
        raise BadRequest(f"{len(binary) - offset} bytes of binary data belong to no input")
    return tensors


def _response(body: dict, outputs: list[v2_tensors.OutputTensor]) -> Response:
    """JSON, or the JSON header followed by the binary outputs (Inference-Header-Content-Length)."""
    described, blobs = [], []
    for tensor in outputs:
        item: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if tensor.binary:
            blob = v2_tensors.join_bytes(tensor.values) if tensor.datatype == "BYTES" else tensor.values.tobytes()
            item["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif tensor.datatype == "BYTES":
            item["data"] = [v.decode() for v in tensor.values]
        else:
            item["data"] = tensor.values.ravel().tolist()
        described.append(item)
    header = json.dumps(body | {"outputs": described}, separators=(",", ":")).encode()
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(
        header + b"".join(blobs),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(header))},
    )


PARSE_ON_LOOP_BYTES = 64 * 1024  # a JSON header up to this size is parsed where it arrives (< 1 ms)


def _read_request(
    header: bytes, binary: bytes, image_size: int, settings: GatewaySettings
) -> tuple[InferRequest, list[v2_tensors.RequestedOutput], v2_tensors.Inputs]:
    """The request's JSON header parsed, the outputs it asks for, and its inputs read (CPU only)."""
    parsed = parse_json_body(InferRequest.model_validate_json, header)
    binary_default = (parsed.parameters or {}).get("binary_data_output", False) is True
    requested = [v2_tensors.requested_output(o.name, o.parameters, binary_default) for o in parsed.outputs or []]
    if not requested and binary_default:
        requested = [v2_tensors.RequestedOutput(V2_OUTPUT, binary=True)]
    inputs = v2_tensors.read_inputs(_tensors(parsed, binary), image_size, settings.max_images)
    return parsed, requested, inputs


@_model_routes("/infer")
async def infer(request: Request) -> Response:
    """Classify: IMAGE (BYTES, encoded images) or PIXELS (UINT8, prepared) in, PROBABILITIES out"""
    start = time.perf_counter()
    state = request.app.state
    classifier = _classifier(request)
    with tracing.request_span("POST /v2/models/{name}/infer", trace_carrier(request)):
        name, _ = _model_name(request)
        classifier.check_share(name, request.state.key_id, state.experiment.weights)
        body = await read_body_limited(request, state.settings.max_body_bytes)
        header, binary = _split_body(request, body)
        read = functools.partial(_read_request, header, binary, classifier.preprocessing.image_size, state.settings)
        if len(header) > PARSE_ON_LOOP_BYTES:
            # A JSON tensor of 64 images is ~900 KB: parsed and converted in ~10 ms of CPU, in the decode
            # pool (as images are decoded) so the loop is held for one GIL switch at most, not for all of it.
            parsed, requested, inputs = await asyncio.get_running_loop().run_in_executor(state.decode_pool, read)
        else:
            parsed, requested, inputs = read()
        done = await classify_request(
            state,
            request.state,
            name,
            files=inputs.files,
            pixels=inputs.pixels,
            sticky_key=request.headers.get(state.experiment.sticky_header),
            started=start,
        )
    outcome = done.outcome
    answer = {
        "model_name": name,
        "model_version": v2_models.model_version(outcome.version),
        "parameters": describe(outcome, done.arm, request.state.rid),
    }
    if parsed.id is not None:
        answer["id"] = parsed.id
    response = _response(answer, v2_tensors.output_tensors(outcome.probabilities, classifier.class_names, requested))
    if done.shadow is not None:
        response.background = BackgroundTask(done.shadow)
    return response


# `infer` first: routes are matched in order, and py-spy showed matching through the router's earlier
# routes costing the v2 inference path ~5% of the gateway's samples under load (1% for /v1/classify).
router.routes.sort(key=lambda route: not getattr(route, "path", "").endswith("/infer"))


def document_served(app, names: list[str], class_names: list[str]) -> None:
    """What the manifest serves, in the OpenAPI document: the v2 model names (an enum on `{name}`) and the
    class names feedback labels must be (an enum on `label`), so clients see them and API fuzzers send
    real models and labels (and unknown ones as the invalid case)."""
    build = app.openapi
    label = {"type": "string", "enum": class_names}

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            for path, item in schema["paths"].items():
                if path.startswith("/v2/models/"):
                    for operation in item.values():
                        for parameter in operation.get("parameters", []):
                            if parameter["name"] == "name":
                                parameter["schema"] = {"type": "string", "enum": names}
            feedback = schema["paths"]["/v1/feedback"]["post"]["requestBody"]["content"]["application/json"]
            for item in (feedback["schema"]["oneOf"][0], feedback["schema"]["oneOf"][1]["items"]):
                item["properties"]["label"] = {
                    "anyOf": [label, {"type": "array", "items": label, "minItems": 1}],
                    "description": item["properties"]["label"].get("description", ""),
                }
        return app.openapi_schema

    app.openapi = openapi
