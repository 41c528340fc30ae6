"""One classification as every front door runs it: `/v1/classify`, the v2 REST `infer` and the v2 gRPC
`ModelInfer` all call `classify_request`, so admission control, decoding, manifest following, A/B
assignment, capture, answers for feedback and shadow traffic are the same whichever protocol a caller
speaks.

A request's bookkeeping lives in `call`: any object with `rid`, `model` and `arm` attributes (the
Starlette request's `state` for HTTP, a namespace for gRPC). The routes read `model` and `arm` back as
metric labels.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from gateway.errors import BadRequest, Overloaded, PayloadTooLarge, Unavailable
from gateway.feedback.answers import Answer, ShadowAnswer
from gateway.serving.images import open_image, prepare_images
from gateway.serving.service import Classifier, Outcome, ReplicaState
from gateway.telemetry import tracing
from kdcontract.manifest import Preprocessing
from kdcontract.names import AUTO, served_entry

# Below this many pixels in a request, decoding costs less than handing it to a thread (measured
# ~0.1 ms for 8x8 to 64x64 PNGs); above it, it runs in the decode threads so the loop stays free.
INLINE_DECODE_PIXELS = 128 * 128


class CallState(Protocol):
    rid: str
    model: str
    arm: str
    key_id: str  # the caller's API key id (`anonymous` without one): admission shares a model between them


@dataclass
class Classified:
    outcome: Outcome
    arm: str | None  # the A/B arm, when the caller asked for `auto`
    decode_s: float
    shadow: Callable[[], Awaitable[None]] | None  # an async function to run after the response is sent


async def decode_files(state: ReplicaState, files: list[bytes], spec: Preprocessing) -> np.ndarray:
    """Headers checked here, pixels decoded here when tiny, else in the decode threads."""
    settings = state.settings
    opened = [open_image(f, settings.allowed_formats, settings.max_image_pixels) for f in files]
    pixels = sum(image.width * image.height for image in opened)
    if pixels > settings.max_request_pixels:
        raise PayloadTooLarge(
            f"{pixels} pixels in one request ({len(opened)} images); the limit is {settings.max_request_pixels}"
        )
    if pixels <= INLINE_DECODE_PIXELS:
        return prepare_images(opened, spec)
    return await asyncio.get_running_loop().run_in_executor(state.decode_pool, prepare_images, opened, spec)


def check_pixels(pixels: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """Prepared images sent as a tensor: uint8 [N, size, size, 3], exactly what decoding would make."""
    size = spec.image_size
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[1:] != (size, size, 3):
        got = f"{pixels.dtype} {list(pixels.shape)}"
        raise BadRequest(f"prepared images must be UINT8 [N, {size}, {size}, 3], got {got}")
    return np.ascontiguousarray(pixels)


async def classify_following(
    state: ReplicaState, call: CallState, classifier: Classifier, name: str, images: np.ndarray
):
    """`classifier.classify`, once more with the re-exported manifest when Triton has just dropped the
    version this request was pinned to: Triton unloads an old version as soon as the new one is loaded,
    which can be before this replica's next manifest poll. The manifest is checked at once and, if the
    gateway switched, the request runs on the new versions (weights and calibration still together)."""
    try:
        return await classifier.classify(classifier.resolve(name), images, call.key_id)
    except Unavailable:
        follower = state.manifest_follower
        if follower is None:
            raise
        await follower.check()
        current: Classifier = state.classifier
        if current is classifier:
            raise
        call.model = current.resolve(name)
        return await current.classify(current.resolve(name), images, call.key_id)


def _observe_drift(state: ReplicaState, classifier: Classifier, outcome: Outcome) -> None:
    """A single model's answers counted for its version's drift test (compositions have no reference)."""
    drift = getattr(state, "drift", None)
    if drift is None or outcome.version is None:
        return
    for serving in (classifier, state.classifier):  # the request's manifest, or the one it switched to
        entry = served_entry(serving.manifest, outcome.model)
        if entry is not None and entry.version == outcome.version:
            drift.observe(entry, outcome.probabilities)
            return


def _remember(state: ReplicaState, rid: str, answer: Answer | ShadowAnswer | None) -> None:
    """Keep an A/B answer for its feedback (when an answer store is configured); never waits."""
    if answer is not None and state.answers is not None and not state.answers.remember(rid, answer):
        state.metrics.answers_dropped.inc()


async def _shadow(
    state: ReplicaState,
    call: CallState,
    classifier: Classifier,
    arm: str,
    images: np.ndarray,
    primary: np.ndarray,
    answer: Answer | None,
) -> None:
    """Runs after the response is sent: the other arm on the same images, compared top-1 by top-1.

    Shadows pass admission control like any request, and are skipped (not queued) when the other arm
    is at its bound, so mirroring can never push real traffic into 503s. The shadow's answer is kept
    beside the request's (`answer`) for feedback.
    """
    metrics = state.metrics
    target = classifier.resolve(arm)
    start = time.perf_counter()
    metrics.in_flight.inc()  # shadow work is in flight too, after its request's own count ended
    try:
        with classifier.admit(target, len(images), call.key_id):
            outcome = await classify_following(state, call, classifier, arm, images)
    except Overloaded:
        metrics.shadow.labels(arm, "shed").inc()
        return
    except Exception:
        metrics.errors.labels("shadow").inc()
        return
    finally:
        metrics.in_flight.dec()
    latency_ms = (time.perf_counter() - start) * 1000
    _observe_drift(state, classifier, outcome)
    shadow_top1 = outcome.probabilities.argmax(-1)
    agreed = bool((shadow_top1 == primary.argmax(-1)).all())
    state.ab_stats.record_shadow(arm, latency_ms, agreed)
    metrics.shadow.labels(arm, str(agreed).lower()).inc()
    if answer is not None:
        _remember(state, call.rid, ShadowAnswer(shadow_top1.tolist(), answer.at))


async def classify_request(
    state: ReplicaState,
    call: CallState,
    model: str,
    *,
    files: list[bytes] | None = None,
    pixels: np.ndarray | None = None,
    sticky_key: str | None = None,
    started: float,
) -> Classified:
    """Classify encoded images (`files`) or prepared ones (`pixels`) with `model` (a name `/v1/classify`
    takes, `auto` for the A/B experiment's arm). `started` is the request's perf_counter start."""
    classifier: Classifier = state.classifier
    count = len(files) if files is not None else len(pixels)
    arm = None
    if model == AUTO:
        arm = state.ab_router.assign(sticky_key)
        model = arm
    target = classifier.resolve(model)
    call.model, call.arm = target, arm or ""

    with ExitStack() as admitted:
        # Admitted before decoding: a shed request costs no decoding at all. Held until Triton answered.
        with tracing.span("admission"):
            admitted.enter_context(classifier.admit(target, count, call.key_id))
        decode_start = time.perf_counter()
        if files is not None:
            with tracing.span("decode", images=count):
                images = await decode_files(state, files, classifier.preprocessing)
        else:
            images = check_pixels(pixels, classifier.preprocessing)
        decode_s = time.perf_counter() - decode_start
        state.metrics.decode_seconds.observe(decode_s)
        outcome = await classify_following(state, call, classifier, model, images)
    state.metrics.child(state.metrics.images, target).inc(len(images))
    _observe_drift(state, classifier, outcome)
    if state.capture is not None and state.capture.sample():
        # Prepared pixels have no original bytes: the capture keeps an empty original for each.
        originals = files if files is not None else [b""] * len(images)
        state.capture.images(call.rid, images, originals, outcome, call.key_id)
    shadow = None
    if arm is not None:
        state.ab_stats.record(arm, (time.perf_counter() - started) * 1000)
        shadow_arm = state.ab_router.shadow_arm(arm)
        answer = None  # kept for feedback when there is an answer store
        if state.answers is not None:
            answer = Answer(
                arm=arm,
                model=outcome.model,
                version=outcome.version,
                top1=outcome.probabilities.argmax(-1).tolist(),
                at=time.time(),
                shadow_arm=shadow_arm,
                key=call.key_id,
            )
            _remember(state, call.rid, answer)
        if shadow_arm is not None:

            async def shadow() -> None:
                await _shadow(state, call, classifier, shadow_arm, images, outcome.probabilities, answer)

    return Classified(outcome, arm, decode_s, shadow)


def describe(outcome: Outcome, arm: str | None, rid: str) -> dict[str, Any]:
    """What a response says besides the probabilities (v2 `parameters`: strings, numbers, booleans only)."""
    parameters: dict[str, Any] = {"request_id": rid, "served_model": outcome.model, "degraded": outcome.degraded}
    if outcome.version is not None:
        parameters["served_version"] = outcome.version
    if arm is not None:
        parameters["arm"] = arm
    if outcome.members:
        parameters["members"] = ",".join(outcome.members)
    if outcome.answered_by is not None:
        parameters["answered_by"] = ",".join(outcome.answered_by)
    return parameters
