"""The FastAPI application, built by `create_app(settings)`."""

from __future__ import annotations

import asyncio
import gc
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway import tracing
from gateway.ab import ABStats
from gateway.admission import AdmissionControl
from gateway.answers import AnswerStore
from gateway.api_pages import add_api_pages
from gateway.capture import Capture, LocalSink, ObjectStoreSink
from gateway.errors import GatewayError, error_kinds, install_error_handlers
from gateway.experiment import start_experiment
from gateway.feedback import FeedbackJoin
from gateway.figures import LocalStep
from gateway.keys import KeyGate, KeyMiddleware, requires
from gateway.manifest_follow import ManifestFollower, check_against_manifest
from gateway.metrics import GatewayMetrics
from gateway.observe import RequestObserver
from gateway.oip import model_names
from gateway.routes import router
from gateway.service import Classifier
from gateway.settings import GatewaySettings
from gateway.single_flight import SingleFlight
from gateway.triton_client import TritonClient
from gateway.triton_server import EmbeddedTriton, TritonPorts
from gateway.v2_grpc import start_grpc
from gateway.v2_rest import document_served
from gateway.v2_rest import router as v2_router
from kdcontract.manifest import SchemaMismatch, read_manifest


def _embedded_triton(settings: GatewaySettings) -> EmbeddedTriton:
    host, _, port = settings.triton_url.rpartition(":")
    return EmbeddedTriton(
        settings.repo,
        TritonPorts(int(port), settings.triton_grpc_port, settings.triton_metrics_port),
        host=host or "127.0.0.1",
        log_file=settings.triton_log or Path(settings.repo).resolve().parent / "triton.log",
        extra_args=tracing.triton_trace_args(settings.trace_sample_ratio, settings.otlp_endpoint),
    )


def create_app(settings: GatewaySettings | None = None, span_exporter=None) -> FastAPI:
    """The gateway. `span_exporter` (an OpenTelemetry SDK exporter) receives its spans as well, when
    tracing is on (tests read spans with the SDK's in-memory exporter)."""
    settings = settings or GatewaySettings()
    manifest_path = Path(settings.repo) / "manifest.json"
    if not manifest_path.is_file():
        raise GatewayError(f"{manifest_path} not found: export a model repository first (make demo)")
    try:
        manifest = read_manifest(settings.repo)
    except SchemaMismatch as exc:
        raise GatewayError(str(exc)) from exc
    check_against_manifest(settings, manifest)
    metrics = GatewayMetrics()
    key_gate = KeyGate(
        settings.api_keys,
        settings.api_keys_file,
        settings.admin_token_sha256,
        settings.allow_anonymous,
        metrics,
        host=settings.host,
        default_max_in_flight=settings.default_key_max_in_flight,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server = None
        if settings.embedded_triton:
            server = _embedded_triton(settings)
            await asyncio.to_thread(server.start)
        triton = TritonClient(
            settings.triton_url,
            settings.triton_timeout_s,
            settings.triton_connections,
            settings.retry_after_s,
            metrics,
            settings.triton_calls_in_flight,
            settings.max_images,
        )
        admission = AdmissionControl(settings.admission_max_images, settings.retry_after_s, metrics)
        app.state.classifier = Classifier(manifest, triton, settings, metrics, admission)
        metrics.start_at_zero(
            app.state.experiment.weights,
            app.state.classifier.routed_models(),
            error_kinds(),
            manifest.cascade is not None,
        )
        follower = None
        app.state.manifest_follower = ManifestFollower(app, settings) if settings.manifest_poll_s > 0 else None
        if app.state.manifest_follower is not None:
            follower = asyncio.create_task(app.state.manifest_follower.run())
        experiment_task = None
        if app.state.experiment_follower is not None:
            experiment_task = asyncio.create_task(app.state.experiment_follower.run())
        app.state.answers = app.state.feedback = None
        answers_task = None
        if settings.answers_dir is not None:
            app.state.answers = AnswerStore(
                settings.answers_dir, settings.answers_ttl_s, settings.answers_max_records, settings.answers_queue
            )
            app.state.answers.on_dropped = metrics.answers_dropped.inc
            app.state.feedback = FeedbackJoin(app.state.answers, app.state.classifier.class_names, metrics)
            answers_task = asyncio.create_task(app.state.answers.run())
        app.state.capture, capture_task = None, None
        if settings.capture_fraction > 0:
            app.state.capture = Capture(
                ObjectStoreSink(settings.capture_url, settings.capture_retention_s, settings.capture_max_bytes)
                if settings.capture_url
                else LocalSink(settings.capture_dir, settings.capture_retention_s, settings.capture_max_bytes),
                settings.capture_fraction,
                app.state.classifier.class_names,
                metrics,
                settings.capture_queue,
                settings.capture_segment_images,
                settings.capture_segment_s,
                settings.capture_originals,
            )
            capture_task = asyncio.create_task(app.state.capture.run())
        app.state.decode_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
        # Everything allocated so far (FastAPI, pydantic, numpy, the manifest) lives as long as the process:
        # frozen out of the collector, a full collection no longer walks it (measured: a ~65 ms stall
        # about once per 600 requests before, see `make bench`'s max latency).
        tracing.configure(settings.trace_sample_ratio, settings.otlp_endpoint, exporter=span_exporter)
        grpc_server = None
        if settings.grpc_port:
            grpc_server = await start_grpc(
                app, settings.host, settings.grpc_port, settings.max_body_bytes, settings.header_timeout_s
            )
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop(settings.shutdown_grace_s)
            if app.state.answers is not None:
                app.state.feedback.close()
                await app.state.answers.flush()  # answers already given stay joinable after a restart
            for task in (follower, experiment_task, answers_task, capture_task):
                if task is not None:
                    task.cancel()
            if app.state.capture is not None:
                await app.state.capture.flush()  # the open segment, written whole before the process ends
            app.state.decode_pool.shutdown(wait=True)
            app.state.figures.close()
            await triton.close()
            if server is not None:
                await asyncio.to_thread(server.stop)
            tracing.shutdown()

    app = FastAPI(
        title="kdserve gateway",
        version="0.1.0",
        description="Classify images with a distilled student, its teacher or an ensemble served by Triton; "
        "A/B and shadow traffic between teacher and student; Prometheus metrics.",
        lifespan=lifespan,
        # The API's description and pages are routes of ours (below): each declares its access, and the
        # pages load their scripts from the gateway, not a CDN (an air-gapped cluster gets a working page).
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.settings, app.state.metrics = settings, metrics  # the manifest lives in app.state.classifier
    app.state.ab_stats = ABStats([], settings.ab_window)
    app.state.local_step = LocalStep(metrics.registry)
    app.state.figures = SingleFlight("figures")  # GET /v1/experiment's intervals, off the event loop
    start_experiment(app, settings, manifest)
    install_error_handlers(app, on_error=lambda kind: metrics.errors.labels(kind).inc())

    app.state.key_gate = key_gate
    # Added first, so it runs inside the observer: refusals are timed, counted and carry the request id.
    app.add_middleware(KeyMiddleware, gate=key_gate, on_error=lambda kind: metrics.errors.labels(kind).inc())
    app.add_middleware(RequestObserver, metrics=metrics)

    page = (Path(__file__).parent / "static" / "index.html").read_bytes()

    @app.get("/", include_in_schema=False)
    @requires(None)
    async def web_page() -> Response:
        """Draw a digit or drop a photo; the served models side by side (plain HTML/JS)."""
        return Response(page, media_type="text/html; charset=utf-8")

    @app.get("/metrics", include_in_schema=False)
    @requires(None)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    add_api_pages(app)

    app.include_router(router)
    app.include_router(v2_router)
    document_served(app, model_names(manifest), next(iter(manifest.models.values())).class_names)
    return app
