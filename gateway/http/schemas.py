"""Request and response bodies of the HTTP API (they are also the OpenAPI documentation)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from gateway.experiments.spec import Experiment
from gateway.settings import MAX_IMAGES_PER_REQUEST
from gateway.v2 import tensors as v2_tensors
from kdcontract.manifest import DataSplit
from kdcontract.names import V2_IMAGE_INPUT, V2_OUTPUT, V2_PIXELS_INPUT

# The image files the gateway decodes (its default allow-list): a multipart part's, or a JSON string's, type.
IMAGE_MEDIA_TYPES = ["image/png", "image/jpeg", "image/gif", "image/bmp", "image/webp", "image/tiff"]
IMAGE_MEDIA_TYPE = "image/*"


def _json_integer(value: object) -> object:
    """JSON Schema's integer: 29 and 29.0 are integers; `true` and "29" are not (pydantic's lax mode takes
    both, and its strict mode refuses 29.0: neither is what the schema says)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("must be an integer")
    return value


# Constraints go before the validator (`JsonInt` then `Field(ge=...)` would document them as "ge"/"le").
JsonInt = Annotated[int, BeforeValidator(_json_integer)]
TopK = Annotated[int, Field(ge=1, le=100), BeforeValidator(_json_integer)]

# What the schema can say of an image sent as JSON: base64 (`byte`) of an image file, never empty.
Base64Image = Annotated[
    str, Field(min_length=1, json_schema_extra={"format": "byte", "contentMediaType": IMAGE_MEDIA_TYPE})
]


# A classify body is at most MAX_IMAGES_PER_REQUEST base64 strings (base64 has no comma) and two options, so
# it holds fewer commas than this bound; a body with more cannot be one and is refused before it is parsed.
# fail_fast stops validation at the first wrong item, not the JSON parse: 4.2 M zeros (8 MB) still held the
# event loop 94 ms in pydantic; counting the commas takes ~2 ms.
CLASSIFY_JSON_MAX_COMMAS = MAX_IMAGES_PER_REQUEST + 64


class ClassifyJSON(BaseModel):
    model_config = ConfigDict(strict=True)  # JSON as written: `"top_k": true` is not 1
    # fail_fast: a list of a million wrong items is refused at the first, instead of pydantic listing
    # every error (28 s and 4.7 GB on the event loop for 4.2 M zeros, review of 61e1da7).
    images: list[Base64Image] = Field(
        ...,
        min_length=1,
        max_length=MAX_IMAGES_PER_REQUEST,
        fail_fast=True,
        description="base64-encoded image files (PNG, JPEG, ...)",
    )
    model: str | None = Field(None, description="overrides the `model` query parameter when given")
    top_k: TopK | None = Field(None, description="overrides the `top_k` query parameter when given")


class Label(BaseModel):
    label: str
    index: int
    probability: float


class Prediction(BaseModel):
    top_k: list[Label]
    answered_by: str | None = Field(None, description="cascade only: the model that answered this image")


class Latency(BaseModel):
    decode_ms: float
    inference_ms: float
    fusion_ms: float
    total_ms: float


class ClassifyResponse(BaseModel):
    request_id: str
    model: str = Field(description="the model (or ensemble) that answered")
    version: int | None = Field(None, description="its version; null for a fused ensemble")
    arm: str | None = Field(None, description="the A/B arm, when the A/B policy chose the model")
    degraded: bool = Field(
        False,
        description="ensemble: a member was left out (timed out or failed); cascade: the teacher failed, "
        "the student's answers stand",
    )
    members: list[str] = Field(default_factory=list, description="ensemble members (cascade: models) that answered")
    predictions: list[Prediction]
    latency: Latency


class CandidateInfo(BaseModel):
    version: int
    ready: bool
    top1: float | None
    offline_gate: dict = Field(description="the paired comparison with the current version it passed before export")


class ModelInfo(BaseModel):
    name: str
    role: str
    arch: str
    version: int
    ready: bool
    precision: str
    top1: float | None
    temperature: float
    input_shape: list[int]
    candidate: CandidateInfo | None = Field(
        None, description="a newer version on trial beside the current one (call it as NAME@VERSION)"
    )


class ModelsResponse(BaseModel):
    aliases: dict[str, str]
    models: list[ModelInfo]
    class_names: list[str] = Field(description="the labels the models answer with (and feedback names)")
    split: DataSplit | None = Field(
        None, description="how the models' dataset was split: clients draw held-out images from it"
    )


class ErrorBody(BaseModel):
    kind: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody
    request_id: str | None = None


class ExperimentResponse(BaseModel):
    experiment: Experiment
    source: Literal["file", "settings"] = Field(
        description="file: read from (or written to) the experiment file; settings: the start-up settings'"
    )
    file: str | None = Field(None, description="the experiment file every replica follows, when configured")
    this_replica: dict = Field(
        description="this replica's own counts since it took up the current step, judged by the experiment's "
        "gates (`step`) and per arm with confidence sequences (`arms`); the rollout controller judges the sum "
        "over all replicas"
    )


def inline_schema(model: type[BaseModel]) -> dict:
    """A model's JSON schema with its `$defs` written in place, for a request body declared by hand in
    the OpenAPI document: there `#/$defs/...` would point at the document's root, where nothing is, and
    API fuzzers could generate no invalid body from it."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[1]])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


# The Open Inference Protocol's REST bodies (`http.v2`): what the gateway takes, bounded before it is read.
class V2Error(BaseModel):
    error: str


V2_ERRORS = {code: {"model": V2Error} for code in (400, 401, 403, 404, 413, 415, 429, 502, 503, 504)}
Parameter = str | int | float | bool


class InputTensor(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # JSON as written: no `true` taken for 1
    # The names and types the gateway takes, documented as enums (other values get a 400 that says so).
    name: str = Field(max_length=64, json_schema_extra={"enum": [V2_IMAGE_INPUT, V2_PIXELS_INPUT]})
    shape: list[JsonInt] = Field(max_length=8)
    datatype: str = Field(max_length=16, json_schema_extra={"enum": ["BYTES", "UINT8"]})
    parameters: dict[str, Parameter] | None = Field(None, max_length=v2_tensors.MAX_PARAMETERS)
    data: list[Any] | None = None


class OutputRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # JSON as written: no `true` taken for 1
    name: str = Field(max_length=64, json_schema_extra={"enum": [V2_OUTPUT]})
    parameters: dict[str, Parameter] | None = Field(None, max_length=v2_tensors.MAX_PARAMETERS)


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # JSON as written: no `true` taken for 1
    id: str | None = Field(None, max_length=128)
    parameters: dict[str, Parameter] | None = Field(None, max_length=v2_tensors.MAX_PARAMETERS)
    inputs: list[InputTensor] = Field(min_length=1, max_length=v2_tensors.MAX_TENSORS, fail_fast=True)
    outputs: list[OutputRequest] | None = Field(None, max_length=v2_tensors.MAX_TENSORS, fail_fast=True)
