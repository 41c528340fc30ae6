"""`POST /v1/feedback`: ground truth for answered requests, one item or a batch, joined by `feedback.join`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import Field, TypeAdapter

from gateway.auth.scopes import requires
from gateway.errors import Conflict, GatewayError
from gateway.feedback.join import MAX_ITEMS, FeedbackBatch, FeedbackItem, FeedbackResult
from gateway.http.reading import parse_json_body, read_body_limited
from gateway.http.schemas import ErrorResponse

router = APIRouter()


FEEDBACK_ITEM = TypeAdapter(FeedbackItem)


# fail_fast and the length bound: a list of 349k empty objects is refused at its first, not listed whole.
FEEDBACK_LIST = TypeAdapter(Annotated[list[FeedbackItem], Field(min_length=1, max_length=MAX_ITEMS, fail_fast=True)])


def validate_feedback(body: bytes) -> FeedbackItem | list[FeedbackItem]:
    """One item or a list of them; the first byte chooses, so an error names what was wrong with that form
    (a union would report the other form's error too)."""
    return (FEEDBACK_LIST if body.lstrip()[:1] == b"[" else FEEDBACK_ITEM).validate_json(body)


FEEDBACK_ERRORS = {code: {"model": ErrorResponse} for code in (400, 403, 404, 409, 410, 413, 422, 429)}


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
    """One item: 200, or its error (404 unknown id, 410 expired, 409 already counted, 422 not a class, 403
    a request another API key made: only its caller may label it). 429 with Retry-After when the API key
    is past its feedback items per second (KDSERVE_FEEDBACK_ITEMS_PER_S, each item of a batch counts).
    A list: 200 with one result per item, each with the status it would have had alone."""
    state = request.app.state
    if state.feedback is None:
        raise Conflict("no answer store is configured (KDSERVE_ANSWERS_DIR): feedback cannot be joined")
    state.feedback.check_budget(request.state.key_id)
    body = await read_body_limited(request, 1024 * 1024)
    parsed = parse_json_body(validate_feedback, body)
    items = [parsed] if isinstance(parsed, FeedbackItem) else parsed
    joined = await state.feedback.accept_all(items, request.state.key_id)
    results = [
        FeedbackResult(request_id=item.request_id, status=r.status_code, outcome=r.kind, message=r.message)
        if isinstance(r, GatewayError)
        else r
        for item, r in zip(items, joined, strict=True)
    ]
    _capture_labels(state.capture, items, results, request.state.key_id)
    if isinstance(parsed, FeedbackItem):
        if isinstance(joined[0], GatewayError):
            raise joined[0]
        return Response(results[0].model_dump_json(), media_type="application/json")
    return Response(FeedbackBatch(results=results).model_dump_json(), media_type="application/json")


def _capture_labels(capture, items: list[FeedbackItem], results: list[FeedbackResult], key: str) -> None:
    """Accepted labels join the captured images of their requests (in the capture's labels segments), with
    the key that sent them."""
    if capture is None:
        return
    for item, result in zip(items, results, strict=True):
        if result.status == 200:
            capture.labels(item.request_id, [item.label] if isinstance(item.label, str) else item.label, key)
