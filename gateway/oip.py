"""The Open Inference Protocol (KServe v2) as the gateway speaks it, independent of REST or gRPC.

Every name `/v1/classify` takes is a v2 model (`student`, `teacher`, `ensemble`, `cascade`, `auto`, and
each served model), with one declared input and one output:

- `IMAGE`, BYTES `[-1, 1]` (or `[-1]`): each element one encoded image (PNG, JPEG, ...), decoded and
  prepared by the gateway exactly as for `/v1/classify`. Over REST's JSON, an element is the image's
  base64 text; over the binary tensor extension and gRPC, its raw bytes.
- or `PIXELS`, UINT8 `[-1, size, size, 3]`: images already prepared (what decoding would make). Not in
  the metadata, which lists one input so generic clients (`perf_analyzer`) send one.
- `PROBABILITIES`, FP32 `[-1, classes]`: calibrated class probabilities (fused for the ensemble). The
  classification extension (`classification: k` on the output) returns BYTES `[-1, k]` strings
  `"probability:index:label"`, best first, as Triton does.

Shapes are checked against the limits before anything is allocated: a declared shape must match the
data sent, at most `max_images` images, and every BYTES element's length prefix must fit the buffer.
"""

from __future__ import annotations

import asyncio
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gateway.errors import BadRequest, UnknownModel, echo
from gateway.service import Classifier
from kdcontract.manifest import Manifest
from kdcontract.names import AUTO, CASCADE, ENSEMBLE, V2_IMAGE_INPUT, V2_OUTPUT, V2_PIXELS_INPUT, callable_names

SERVER_NAME = "kdserve"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration"]
PLATFORM = "kdserve_gateway"
COMPOSED_VERSION = "1"  # the one version of what the gateway composes (ensemble, cascade, auto)
MAX_CLASSIFICATION = 100
# Per request, over REST and gRPC alike: a request carries one input; these bound what a caller can make the
# gateway parse before it refuses (gRPC once built a 33 MB reply for 480k requested outputs).
MAX_TENSORS = 8  # inputs, outputs
MAX_PARAMETERS = 16  # parameters of the request, of an input or of an output


@dataclass
class Tensor:
    """One input tensor as a request declares it; `data` is raw bytes (binary extension, gRPC) or the
    JSON `data` list."""

    name: str
    datatype: str
    shape: list[int]
    data: bytes | list | None


@dataclass
class RequestedOutput:
    name: str
    binary: bool = False
    classes: int = 0  # the classification extension's k; 0: the probabilities themselves


@dataclass
class Inputs:
    files: list[bytes] | None = None
    pixels: np.ndarray | None = None


@dataclass
class OutputTensor:
    name: str
    datatype: str
    shape: list[int]
    values: np.ndarray | list[bytes]
    binary: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)


def model_names(manifest: Manifest) -> list[str]:
    """Every v2 model: the names `/v1/classify` takes, `auto` included."""
    return [*callable_names(manifest), AUTO]


def versions(classifier: Classifier, name: str) -> list[str]:
    """The versions a v2 model has: its served model's manifest version, or one for what is composed."""
    if name == AUTO:
        return [COMPOSED_VERSION]
    target = classifier.resolve(name)  # UnknownModel for anything else
    if target in (ENSEMBLE, CASCADE):
        return [COMPOSED_VERSION]
    return [str(classifier.manifest.models[target].version)]


async def model_ready(classifier: Classifier, name: str, arms: list[str]) -> bool:
    """Every Triton model `name` may call is READY (for `auto`: every model the experiment's `arms` need)."""
    targets = classifier.routed_models(arms) if name == AUTO else classifier.triton_models(classifier.resolve(name))
    states = await asyncio.gather(
        *(classifier.triton.model_ready(t, classifier.manifest.models[t].version) for t in targets)
    )
    return all(states)


def check_version(classifier: Classifier, name: str, version: str | None) -> None:
    known = versions(classifier, name)
    if version is not None and version not in known:
        raise UnknownModel(f"model {echo(name)} has no version {echo(version)}; it serves version {', '.join(known)}")


def metadata(classifier: Classifier, name: str) -> dict[str, Any]:
    classes = len(classifier.class_names)
    return {
        "name": name,
        "versions": versions(classifier, name),
        "platform": PLATFORM,
        "inputs": [{"name": V2_IMAGE_INPUT, "datatype": "BYTES", "shape": [-1, 1]}],
        "outputs": [{"name": V2_OUTPUT, "datatype": "FP32", "shape": [-1, classes]}],
    }


def config(classifier: Classifier, name: str, max_images: int) -> dict[str, Any]:
    """Triton's model configuration (its JSON form), which `perf_analyzer` reads for the batch size."""
    return {
        "name": name,
        "platform": PLATFORM,
        "max_batch_size": max_images,
        "input": [{"name": V2_IMAGE_INPUT, "data_type": "TYPE_STRING", "dims": [1]}],
        "output": [{"name": V2_OUTPUT, "data_type": "TYPE_FP32", "dims": [len(classifier.class_names)]}],
    }


def _count(shape: list[int], max_elements: int) -> int:
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise BadRequest(f"shape {shape}: dimensions must be non-negative integers")
    count = math.prod(shape)  # Python integers: a huge declared shape cannot overflow
    if count > max_elements:
        raise BadRequest(f"shape {shape} declares {count} elements; at most {max_elements} are accepted")
    return count


def _flat(data: list, limit: int) -> list:
    """A JSON `data` list flattened row-major (Triton accepts nested lists too), refused past `limit`."""
    flat: list = []
    pending = [iter(data)]
    while pending:
        for item in pending[-1]:
            if isinstance(item, list):
                pending.append(iter(item))
                break
            flat.append(item)
            if len(flat) > limit:
                raise BadRequest(f"more data elements than the shape declares ({limit})")
        else:
            pending.pop()
    return flat


def split_bytes(buffer: bytes, count: int) -> list[bytes]:
    """BYTES elements from the binary form: each a 4-byte little-endian length, then that many bytes."""
    items, offset = [], 0
    for _ in range(count):
        if offset + 4 > len(buffer):
            raise BadRequest("BYTES tensor: data ends inside an element's length prefix")
        (size,) = struct.unpack_from("<I", buffer, offset)
        offset += 4
        if offset + size > len(buffer):
            raise BadRequest(f"BYTES tensor: an element declares {size} bytes past the end of the data")
        items.append(bytes(buffer[offset : offset + size]))
        offset += size
    if offset != len(buffer):
        raise BadRequest(f"BYTES tensor: {len(buffer) - offset} bytes left after the {count} declared elements")
    return items


def join_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def _image_files(tensor: Tensor, max_images: int) -> list[bytes]:
    if tensor.datatype != "BYTES":
        raise BadRequest(f"input {V2_IMAGE_INPUT} must be BYTES (encoded images), got {tensor.datatype}")
    if len(tensor.shape) not in (1, 2) or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
        raise BadRequest(f"input {V2_IMAGE_INPUT} has shape [N] or [N, 1], got {tensor.shape}")
    count = _count(tensor.shape, max_images)
    if isinstance(tensor.data, bytes | bytearray | memoryview):
        return split_bytes(bytes(tensor.data), count)
    if tensor.data is None:
        raise BadRequest(f"input {V2_IMAGE_INPUT} has no data")
    if isinstance(tensor.data, list) and tensor.data and isinstance(tensor.data[0], bytes):
        files = tensor.data  # gRPC's bytes_contents
    else:
        import base64
        import binascii

        texts = _flat(tensor.data, count)
        if not all(isinstance(t, str) for t in texts):
            raise BadRequest(f"input {V2_IMAGE_INPUT} in JSON: each element is an image's base64 text")
        try:
            files = [base64.b64decode(t, validate=True) for t in texts]
        except (binascii.Error, ValueError) as exc:
            raise BadRequest(f"input {V2_IMAGE_INPUT} in JSON: elements must be base64 text") from exc
    if len(files) != count:
        raise BadRequest(
            f"input {V2_IMAGE_INPUT}: shape {tensor.shape} declares {count} elements, data has {len(files)}"
        )
    return files


def _pixels(tensor: Tensor, image_size: int, max_images: int) -> np.ndarray:
    if tensor.datatype != "UINT8":
        raise BadRequest(f"input {V2_PIXELS_INPUT} must be UINT8, got {tensor.datatype}")
    expected = [image_size, image_size, 3]
    if len(tensor.shape) != 4 or tensor.shape[1:] != expected:
        raise BadRequest(f"input {V2_PIXELS_INPUT} has shape [N, {image_size}, {image_size}, 3], got {tensor.shape}")
    count = _count(tensor.shape, max_images * math.prod(expected))
    if isinstance(tensor.data, bytes | bytearray | memoryview):
        if len(tensor.data) != count:
            raise BadRequest(
                f"input {V2_PIXELS_INPUT}: shape {tensor.shape} needs {count} bytes, got {len(tensor.data)}"
            )
        values = np.frombuffer(tensor.data, np.uint8)
    else:
        if tensor.data is None:
            raise BadRequest(f"input {V2_PIXELS_INPUT} has no data")
        values = _json_uint8(tensor.data, tensor.shape, count)
    return values.reshape(tensor.shape)


def _json_uint8(data: list, shape: list[int], count: int) -> np.ndarray:
    """A JSON `data` list (flat, or nested as Triton accepts) as uint8, converted and range-checked by
    numpy in C: flattening and checking element by element in Python cost ~140 ms of event loop for one
    64-image body on two busy cores (review of 61e1da7)."""
    try:
        values = np.array(data)
    except (ValueError, OverflowError) as exc:  # ragged nesting; an integer past int64
        raise BadRequest(f"input {V2_PIXELS_INPUT}: data is not a regular array of integers") from exc
    if values.dtype.kind not in "iu":  # booleans, floats, strings and mixtures are refused
        raise BadRequest(f"input {V2_PIXELS_INPUT}: elements must be integers 0-255")
    if values.size != count:
        raise BadRequest(f"input {V2_PIXELS_INPUT}: shape {shape} declares {count} elements, got {values.size}")
    if values.size and (values.min() < 0 or values.max() > 255):
        raise BadRequest(f"input {V2_PIXELS_INPUT}: elements must be integers 0-255")
    return values.astype(np.uint8).ravel()


# ModelInferRequest's repeated fields (Triton's grpc_service.proto): parameters 4, inputs 5, outputs 6,
# raw_input_contents 7, each bounded; fields 1-3 are single. Anything else is unknown to the protocol.
WIRE_LIMITS = {4: MAX_PARAMETERS, 5: MAX_TENSORS, 6: MAX_TENSORS, 7: MAX_TENSORS}
WIRE_NAMES = {4: "parameters", 5: "inputs", 6: "outputs", 7: "raw_input_contents"}
MAX_WIRE_FIELDS = 64  # top-level fields of any kind: the single ones and the bounded repeated ones fit


def wire_refusal(message: bytes) -> str | None:
    """Why a serialised ModelInferRequest carries more than the protocol takes (None: it may be parsed).

    Reads only the top-level field tags and skips each value, and stops at the first field past its bound:
    parsing first built 800k input messages for one 7 MB call (3 GB of gateway memory, `make faults`)."""
    counts: dict[int, int] = {}
    offset, fields = 0, 0
    try:
        while offset < len(message):
            tag, offset = _varint(message, offset)
            number, wire_type = tag >> 3, tag & 7
            fields += 1
            counts[number] = counts.get(number, 0) + 1
            limit = WIRE_LIMITS.get(number, 1)
            if counts[number] > limit or fields > MAX_WIRE_FIELDS:
                what = WIRE_NAMES.get(number, f"field {number}")
                return f"more than {limit} {what}: at most {limit} {what} per request"
            if wire_type == 0:
                _, offset = _varint(message, offset)
            elif wire_type == 2:
                length, offset = _varint(message, offset)
                offset += length
            elif wire_type in (1, 5):
                offset += 8 if wire_type == 1 else 4
            else:
                return "not a ModelInferRequest"
    except IndexError:
        return "not a ModelInferRequest"
    return None if offset == len(message) else "not a ModelInferRequest"


def _varint(data: bytes, offset: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80 or shift > 63:
            return value, offset
        shift += 7


def read_inputs(tensors: list[Tensor], image_size: int, max_images: int) -> Inputs:
    """The one input a request may carry, checked: encoded images or prepared pixels."""
    if len(tensors) != 1:
        raise BadRequest(f"send exactly one input ({V2_IMAGE_INPUT} or {V2_PIXELS_INPUT}), got {len(tensors)}")
    tensor = tensors[0]
    if tensor.name == V2_IMAGE_INPUT:
        inputs = Inputs(files=_image_files(tensor, max_images))
        count = len(inputs.files)
    elif tensor.name == V2_PIXELS_INPUT:
        inputs = Inputs(pixels=_pixels(tensor, image_size, max_images))
        count = len(inputs.pixels)
    else:
        raise BadRequest(
            f"unknown input {echo(tensor.name)}; send {V2_IMAGE_INPUT} (BYTES) or {V2_PIXELS_INPUT} (UINT8)"
        )
    if count == 0:
        raise BadRequest("no image in the request")
    return inputs


def requested_output(name: str, parameters: dict[str, Any] | None, binary_default: bool) -> RequestedOutput:
    parameters = parameters or {}
    if name != V2_OUTPUT:
        raise BadRequest(f"unknown output {echo(name)}; the model's output is {V2_OUTPUT}")
    classes = parameters.get("classification", 0)
    if not isinstance(classes, int) or isinstance(classes, bool) or not 0 <= classes <= MAX_CLASSIFICATION:
        raise BadRequest(f"classification must be an integer from 0 to {MAX_CLASSIFICATION}")
    binary = parameters.get("binary_data", binary_default)
    if not isinstance(binary, bool):
        raise BadRequest("binary_data must be true or false")
    return RequestedOutput(name, binary, classes)


def output_tensors(
    probabilities: np.ndarray, class_names: list[str], requested: list[RequestedOutput]
) -> list[OutputTensor]:
    tensors = []
    for output in requested or [RequestedOutput(V2_OUTPUT)]:
        if output.classes:
            k = min(output.classes, probabilities.shape[-1])
            order = np.argsort(-probabilities, axis=-1)[:, :k]
            texts = [
                f"{row[i]:.6f}:{i}:{class_names[i]}".encode()
                for row, ranked in zip(probabilities, order, strict=True)
                for i in ranked
            ]
            tensors.append(OutputTensor(output.name, "BYTES", [len(probabilities), k], texts, output.binary))
        else:
            values = probabilities.astype(np.float32)
            tensors.append(OutputTensor(output.name, "FP32", list(values.shape), values, output.binary))
    return tensors


def model_version(outcome_version: int | None) -> str:
    return COMPOSED_VERSION if outcome_version is None else str(outcome_version)
