"""The FastAPI application, built by `create_app(settings)`: the manifest checked, the key gate and the
middleware set, the routers of every protocol included, and the running parts (`components`) started in
the lifespan."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from gateway.app import components
from gateway.auth.gate import KeyDefaults, KeyGate
from gateway.auth.pacing import RefusalPacing
from gateway.errors import GatewayError
from gateway.experiments.sources import LocalStep, RegistryCounts
from gateway.http import classify, drift, experiment, feedback, health, pages, v2
from gateway.http.api_pages import add_api_pages
from gateway.http.errors import install_error_handlers
from gateway.http.key_middleware import KeyMiddleware
from gateway.http.observe import RequestObserver
from gateway.serving.experiment import start_experiment
from gateway.serving.manifest_follow import check_against_manifest
from gateway.serving.routing import ABStats
from gateway.settings import GatewaySettings
from gateway.single_flight import SingleFlight
from gateway.telemetry.metrics import GatewayMetrics
from gateway.v2.models import model_names
from kdcontract.manifest import Manifest, SchemaMismatch, read_manifest

ROUTERS = (pages, classify, health, experiment, feedback, drift, v2)  # every route the gateway serves, in order


def _served_manifest(settings: GatewaySettings) -> Manifest:
    manifest_path = Path(settings.repo) / "manifest.json"
    if not manifest_path.is_file():
        raise GatewayError(f"{manifest_path} not found: export a model repository first (make demo)")
    try:
        manifest = read_manifest(settings.repo)
    except SchemaMismatch as exc:
        raise GatewayError(str(exc)) from exc
    check_against_manifest(settings, manifest)
    return manifest


def _lifespan(settings: GatewaySettings, manifest: Manifest, span_exporter=None):
    """The app's lifespan: every component started in order on one exit stack, stopped in reverse (on
    shutdown, and when a later one fails to start)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as running:
            running.callback(app.state.figures.close)
            for component in (
                components.tracing_configured(settings, span_exporter),
                components.embedded_triton(settings),
                components.classifier(app, manifest),
                components.manifest_follower(app),
                components.drift_monitor(app),
                components.experiment_follower(app),
                components.answer_store(app),
                components.capture(app),
                components.decode_pool(app),
                components.grpc_server(app),
            ):
                await running.enter_async_context(component)
            # Everything allocated so far (FastAPI, pydantic, numpy, the manifest) lives as long as the
            # process: frozen out of the collector, a full collection no longer walks it (measured: a ~65 ms
            # stall about once per 600 requests before, see `make bench`'s max latency).
            gc.collect()
            gc.freeze()
            yield

    return lifespan


def create_app(settings: GatewaySettings | None = None, span_exporter=None) -> FastAPI:
    """The gateway. `span_exporter` (an OpenTelemetry SDK exporter) receives its spans as well, when
    tracing is on (tests read spans with the SDK's in-memory exporter)."""
    settings = settings or GatewaySettings()
    manifest = _served_manifest(settings)
    metrics = GatewayMetrics()
    key_gate = KeyGate(
        settings.api_keys,
        settings.api_keys_file,
        settings.admin_token_sha256,
        settings.allow_anonymous,
        metrics,
        host=settings.host,
        defaults=KeyDefaults(
            settings.default_key_max_in_flight, settings.default_key_bytes_per_s, settings.max_body_bytes
        ),
    )
    lifespan = _lifespan(settings, manifest, span_exporter)

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
    app.state.local_step = LocalStep(RegistryCounts(metrics.registry))
    app.state.figures = SingleFlight("figures")  # GET /v1/experiment's intervals, off the event loop
    start_experiment(app.state, settings, manifest)
    pacing = RefusalPacing()  # one per gateway: the key gate's refusals and the routes' pace together
    install_error_handlers(app, pacing, on_error=lambda kind: metrics.errors.labels(kind).inc())

    app.state.key_gate = key_gate
    # Added first, so it runs inside the observer: refusals are timed, counted and carry the request id.
    app.add_middleware(
        KeyMiddleware, gate=key_gate, pacing=pacing, on_error=lambda kind: metrics.errors.labels(kind).inc()
    )
    app.add_middleware(RequestObserver, metrics=metrics)
    add_api_pages(app)
    for module in ROUTERS:
        app.include_router(module.router)
    v2.document_served(app, model_names(manifest), next(iter(manifest.models.values())).class_names)
    return app
