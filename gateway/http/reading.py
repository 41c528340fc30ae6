"""Reading an HTTP request: its body within a size and a time limit, JSON parsed into a model with the first
fault named, a classify request's images from multipart, raw or JSON bodies, and the trace headers."""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from fastapi import Request
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser, parse_options_header

from gateway.errors import BadRequest, GatewayError, PayloadTooLarge, RequestTimeout, UnsupportedMediaType, echo
from gateway.http.schemas import CLASSIFY_JSON_MAX_COMMAS, ClassifyJSON
from gateway.settings import MAX_IMAGES_PER_REQUEST
from gateway.telemetry import tracing

T = TypeVar("T")


TOP_K = re.compile(r"[0-9]{1,3}")  # ASCII digits only: str.isdigit() also accepts '²', which int() refuses


def declared_length(value: str | None) -> int | None:
    """A Content-Length header as a number; None when absent or not plain ASCII digits (12 at most: a
    5,000-digit one is no length Python can parse)."""
    if value and value.isascii() and value.isdigit() and len(value) <= 12:
        return int(value)
    return None


async def _limited(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The body's chunks, refused as soon as they pass `limit` bytes (never buffered past it), or when the
    whole body has not arrived within the body deadline (a client trickling it holds the request)."""
    declared = declared_length(request.headers.get("content-length"))
    if declared is not None and declared > limit:
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


def _too_many_values(commas: int) -> None:
    if commas > CLASSIFY_JSON_MAX_COMMAS:
        raise BadRequest(
            f"a classify body holds at most {MAX_IMAGES_PER_REQUEST} images and two options; "
            f"this one has more than {CLASSIFY_JSON_MAX_COMMAS} values"
        )


async def read_classify_json(request: Request, limit: int) -> bytes:
    """A JSON classify body, refused at the chunk that takes it past the values one can hold: a body of 8 MB
    of zeros is refused after its first chunk instead of being read whole (two clients sending it moved
    ~700 MB/s through the event loop, `make faults`)."""
    chunks, commas = [], 0
    async for chunk in _limited(request, limit):
        commas += chunk.count(b",")
        _too_many_values(commas)
        chunks.append(chunk)
    return b"".join(chunks)


def parse_classify_json(body: bytes) -> ClassifyJSON:
    """A JSON classify body, refused before parsing when it has more values than one can hold."""
    _too_many_values(body.count(b","))
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
        payload = parse_classify_json(await read_classify_json(request, settings.max_body_bytes))
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
