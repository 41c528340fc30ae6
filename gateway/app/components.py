"""The parts of a gateway that run from start-up to shutdown, each an async context manager: entering it
starts the part (and puts what requests use on `app.state`), leaving it stops the part. The lifespan
enters them in order on an `AsyncExitStack`, so they stop in reverse order, on shutdown and when a later
one fails to start alike."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from gateway.capture.recorder import Capture
from gateway.capture.sinks import LocalSink, ObjectStoreSink
from gateway.feedback.answers import AnswerStore
from gateway.feedback.join import FeedbackJoin
from gateway.grpc.server import start_grpc
from gateway.http.errors import error_kinds
from gateway.serving.admission import AdmissionControl
from gateway.serving.drift import DriftMonitor
from gateway.serving.manifest_follow import ManifestFollower
from gateway.serving.service import Classifier
from gateway.settings import GatewaySettings
from gateway.telemetry import tracing
from gateway.triton.client import TritonClient
from gateway.triton.server import EmbeddedTriton, TritonPorts
from kdcontract.manifest import Manifest


@asynccontextmanager
async def running(work: Coroutine) -> AsyncIterator[asyncio.Task]:
    """`work` as a task of the event loop while the block runs; cancelled when it ends, and waited for, so
    a part that has stopped has no task left running."""
    task = asyncio.create_task(work)
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.wait([task])  # not `await task`: that would raise the task's cancellation here


@asynccontextmanager
async def tracing_configured(settings: GatewaySettings, span_exporter=None) -> AsyncIterator[None]:
    """Spans exported while the gateway runs (when tracing is on); the last ones flushed at the end."""
    tracing.configure(settings.trace_sample_ratio, settings.otlp_endpoint, exporter=span_exporter)
    try:
        yield
    finally:
        tracing.shutdown()


@asynccontextmanager
async def embedded_triton(settings: GatewaySettings) -> AsyncIterator[EmbeddedTriton | None]:
    """Triton started by the gateway itself (`KDSERVE_EMBEDDED_TRITON`), or None with a Triton of its own."""
    if not settings.embedded_triton:
        yield None
        return
    host, _, port = settings.triton_url.rpartition(":")
    server = EmbeddedTriton(
        settings.repo,
        TritonPorts(int(port), settings.triton_grpc_port, settings.triton_metrics_port),
        host=host or "127.0.0.1",
        log_file=settings.triton_log or Path(settings.repo).resolve().parent / "triton.log",
        extra_args=tracing.triton_trace_args(settings.trace_sample_ratio, settings.otlp_endpoint),
    )
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)


@asynccontextmanager
async def classifier(app: FastAPI, manifest: Manifest) -> AsyncIterator[Classifier]:
    """The classify path (`app.state.classifier`): Triton's client and the admission bounds."""
    settings, metrics = app.state.settings, app.state.metrics
    triton = TritonClient(
        settings.triton_url,
        settings.triton_timeout_s,
        settings.triton_connections,
        settings.retry_after_s,
        metrics,
        settings.triton_calls_in_flight,
        settings.max_images,
    )
    admission = AdmissionControl(
        settings.admission_max_images, settings.retry_after_s, metrics, settings.triton_slice_images
    )
    app.state.classifier = Classifier(manifest, triton, settings, metrics, admission)
    metrics.start_at_zero(
        app.state.experiment.weights,
        app.state.classifier.routed_models(),
        error_kinds(),
        manifest.cascade is not None,
    )
    try:
        yield app.state.classifier
    finally:
        await triton.close()


@asynccontextmanager
async def running_if(runner) -> AsyncIterator[None]:
    """`runner.run()` as a task while the block runs, when there is a runner (a part that is configured
    off is None)."""
    if runner is None:
        yield
        return
    async with running(runner.run()):
        yield


@asynccontextmanager
async def manifest_follower(app: FastAPI) -> AsyncIterator[None]:
    """The repository's manifest followed (`KDSERVE_MANIFEST_POLL_S` > 0): new versions served as Triton
    loads them."""
    settings = app.state.settings
    app.state.manifest_follower = ManifestFollower(app.state, settings) if settings.manifest_poll_s > 0 else None
    async with running_if(app.state.manifest_follower):
        yield


@asynccontextmanager
async def drift_monitor(app: FastAPI) -> AsyncIterator[None]:
    """Each served version's answers judged against its validation reference every `drift_interval_s`."""
    settings = app.state.settings
    app.state.drift = DriftMonitor(
        app.state.metrics,
        settings.drift_tolerance,
        settings.drift_alpha,
        settings.drift_interval_s,
        settings.drift_min_images,
    )
    async with running(app.state.drift.run()):
        yield


def experiment_follower(app: FastAPI) -> AbstractAsyncContextManager[None]:
    """The experiment file followed, when there is one (`serving.experiment.start_experiment` made it)."""
    return running_if(app.state.experiment_follower)


@asynccontextmanager
async def answer_store(app: FastAPI) -> AsyncIterator[None]:
    """What each request was answered, kept for feedback (`KDSERVE_ANSWERS_DIR`); at the end, the answers
    already given are written, so they stay joinable after a restart."""
    settings, metrics = app.state.settings, app.state.metrics
    app.state.answers = app.state.feedback = None
    if settings.answers_dir is None:
        yield
        return
    answers = AnswerStore(
        settings.answers_dir, settings.answers_ttl_s, settings.answers_max_records, settings.answers_queue
    )
    answers.on_dropped = metrics.answers_dropped.inc
    app.state.answers = answers
    app.state.feedback = FeedbackJoin(
        answers,
        app.state.classifier.class_names,
        metrics,
        gate_keys=lambda: app.state.experiment.gates.label_keys,  # the experiment the replica runs now
        items_per_s=settings.feedback_items_per_s,
    )
    async with running(answers.run()):
        try:
            yield
        finally:
            app.state.feedback.close()
            await answers.flush()


@asynccontextmanager
async def capture(app: FastAPI) -> AsyncIterator[None]:
    """A share of the served images kept as distillation data (`KDSERVE_CAPTURE_FRACTION` > 0); the open
    segment is written whole before the process ends."""
    settings, metrics = app.state.settings, app.state.metrics
    app.state.capture = None
    if settings.capture_fraction <= 0:
        yield
        return
    sink = (
        ObjectStoreSink(settings.capture_url, settings.capture_retention_s, settings.capture_max_bytes)
        if settings.capture_url
        else LocalSink(settings.capture_dir, settings.capture_retention_s, settings.capture_max_bytes)
    )
    app.state.capture = Capture(
        sink,
        settings.capture_fraction,
        app.state.classifier.class_names,
        metrics,
        settings.capture_queue,
        settings.capture_segment_images,
        settings.capture_segment_s,
        settings.capture_originals,
    )
    try:
        async with running(app.state.capture.run()):
            yield
    finally:
        await app.state.capture.flush()


@asynccontextmanager
async def decode_pool(app: FastAPI) -> AsyncIterator[ThreadPoolExecutor]:
    """The threads images are decoded in (and large JSON tensors parsed in), off the event loop."""
    app.state.decode_pool = ThreadPoolExecutor(app.state.settings.decode_threads, thread_name_prefix="decode")
    try:
        yield app.state.decode_pool
    finally:
        app.state.decode_pool.shutdown(wait=True)


@asynccontextmanager
async def grpc_server(app: FastAPI) -> AsyncIterator[None]:
    """The Open Inference Protocol over gRPC (`KDSERVE_GRPC_PORT`, 0: none), beside uvicorn."""
    settings = app.state.settings
    if not settings.grpc_port:
        yield
        return
    server = await start_grpc(
        app, settings.host, settings.grpc_port, settings.max_body_bytes, settings.header_timeout_s
    )
    try:
        yield
    finally:
        await server.stop(settings.shutdown_grace_s)
