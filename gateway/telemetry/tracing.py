"""OpenTelemetry traces of the gateway's requests, off unless a sampling ratio above 0 is configured.

One span per request (named after its route), with children for the admission decision, decoding, the
wait for a shared Triton call, the Triton call itself (which carries the W3C `traceparent` header, so a
Triton traced in OpenTelemetry mode joins the trace) and fusion or the cascade. A caller's own
`traceparent` makes the request's span a child of the caller's.

Off (the default), `span()` hands out one shared no-op context manager: no tracer, no context lookups,
nothing allocated per request (`make bench` measures the gateway with tracing off and on in one run).
Spans go to an OTLP/HTTP collector (`KDSERVE_OTLP_ENDPOINT`) in OTLP's JSON encoding
(`gateway.telemetry.otlp_json`), or to any SDK exporter a test passes to `configure`.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

# The API only (fastapi depends on it); the SDK is imported when tracing is turned on.
from opentelemetry.propagate import extract, inject
from opentelemetry.trace import SpanKind

_NOOP = nullcontext()
_tracer = None  # an SDK tracer while tracing is on
_provider = None


def configure(sample_ratio: float, endpoint: str | None, service: str = "kdserve-gateway", exporter=None) -> None:
    """Turn tracing on for this process (ratio > 0), exporting to `endpoint` or `exporter`; else off."""
    global _tracer, _provider
    shutdown()
    if sample_ratio <= 0:
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    _provider = TracerProvider(
        resource=Resource.create({"service.name": service}), sampler=ParentBased(TraceIdRatioBased(sample_ratio))
    )
    if exporter is not None:
        _provider.add_span_processor(SimpleSpanProcessor(exporter))
    if endpoint:
        from gateway.telemetry.otlp_json import OTLPJsonExporter

        # Batched off the request path: spans leave in a background thread, several per POST.
        _provider.add_span_processor(BatchSpanProcessor(OTLPJsonExporter(endpoint)))
    _tracer = _provider.get_tracer("kdserve.gateway")


def shutdown() -> None:
    """Flush and stop the exporters (the gateway's shutdown); tracing is off afterwards."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None


def enabled() -> bool:
    return _tracer is not None


def span(name: str, **attributes: Any) -> AbstractContextManager:
    """A child of the current span (the shared no-op while tracing is off)."""
    if _tracer is None:
        return _NOOP
    return _tracer.start_as_current_span(name, attributes=attributes or None)


def request_span(name: str, carrier: Mapping[str, str], **attributes: Any) -> AbstractContextManager:
    """The server span of one request, continuing the caller's trace when `carrier` (HTTP headers or
    gRPC metadata, lower-case keys) has a `traceparent` (the shared no-op while tracing is off)."""
    if _tracer is None:
        return _NOOP
    parent = extract(carrier) if "traceparent" in carrier else None
    return _tracer.start_as_current_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes or None)


def traceparent() -> str | None:
    """The W3C `traceparent` of the current span, for the Triton call (None while off)."""
    if _tracer is None:
        return None
    carrier: dict[str, str] = {}
    inject(carrier)
    return carrier.get("traceparent")


def client_span(name: str, **attributes: Any) -> AbstractContextManager:
    """A span for a call leaving the gateway (the Triton call)."""
    if _tracer is None:
        return _NOOP
    return _tracer.start_as_current_span(name, kind=SpanKind.CLIENT, attributes=attributes or None)


def triton_trace_args(sample_ratio: float, endpoint: str | None) -> list[str]:
    """tritonserver flags that make Triton trace in OpenTelemetry mode to the same collector: it reads
    the gateway's `traceparent`, so its spans (queue, compute) join the request's trace. Triton samples
    by count (every Nth request), the nearest it has to the ratio."""
    if sample_ratio <= 0 or not endpoint:
        return []
    return [
        "--trace-config=mode=opentelemetry",
        f"--trace-config=rate={max(1, round(1 / sample_ratio))}",
        "--trace-config=level=TIMESTAMPS",
        f"--trace-config=opentelemetry,url={endpoint.rstrip('/')}/v1/traces",
    ]
