"""Spans to an OTLP/HTTP collector in OTLP's JSON encoding (`POST <endpoint>/v1/traces`).

Why not `opentelemetry-exporter-otlp-proto-http`: it needs protobuf >= 5 and `tritonclient[grpc]`, which
the gateway's gRPC service is built from, needs protobuf < 5. OTLP/HTTP accepts JSON as well as
protobuf (the OpenTelemetry Collector, Jaeger and Tempo all read it); the mapping follows the OTLP
specification's JSON rules: trace and span ids as hex strings, 64-bit integers as decimal strings,
enums as numbers.
"""

from __future__ import annotations

import json
import logging
import urllib.request
from collections.abc import Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

log = logging.getLogger("kdserve.gateway")
SPAN_KINDS = {"INTERNAL": 1, "SERVER": 2, "CLIENT": 3, "PRODUCER": 4, "CONSUMER": 5}
STATUS_CODES = {"UNSET": 0, "OK": 1, "ERROR": 2}


def _value(value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    if isinstance(value, list | tuple):
        return {"arrayValue": {"values": [_value(v) for v in value]}}
    return {"stringValue": str(value)}


def _attributes(attributes) -> list[dict[str, Any]]:
    return [{"key": k, "value": _value(v)} for k, v in (attributes or {}).items()]


def _span(span: ReadableSpan) -> dict[str, Any]:
    context = span.get_span_context()
    encoded: dict[str, Any] = {
        "traceId": f"{context.trace_id:032x}",
        "spanId": f"{context.span_id:016x}",
        "name": span.name,
        "kind": SPAN_KINDS[span.kind.name],
        "startTimeUnixNano": str(span.start_time),
        "endTimeUnixNano": str(span.end_time),
        "attributes": _attributes(span.attributes),
        "status": {"code": STATUS_CODES[span.status.status_code.name]}
        | ({"message": span.status.description} if span.status.description else {}),
    }
    if span.parent is not None:
        encoded["parentSpanId"] = f"{span.parent.span_id:016x}"
    if span.events:
        encoded["events"] = [
            {"name": e.name, "timeUnixNano": str(e.timestamp), "attributes": _attributes(e.attributes)}
            for e in span.events
        ]
    return encoded


def encode(spans: Sequence[ReadableSpan]) -> dict[str, Any]:
    """An ExportTraceServiceRequest in JSON: spans grouped by resource and instrumentation scope."""
    groups: dict[tuple[int, int], tuple[ReadableSpan, list]] = {}
    for span in spans:
        key = (id(span.resource), id(span.instrumentation_scope))
        groups.setdefault(key, (span, []))[1].append(_span(span))
    return {
        "resourceSpans": [
            {
                "resource": {"attributes": _attributes(first.resource.attributes)},
                "scopeSpans": [
                    {
                        "scope": {"name": first.instrumentation_scope.name if first.instrumentation_scope else ""},
                        "spans": encoded,
                    }
                ],
            }
            for first, encoded in groups.values()
        ]
    }


class OTLPJsonExporter(SpanExporter):
    def __init__(self, endpoint: str, timeout_s: float = 5.0):
        self.url = endpoint.rstrip("/") + "/v1/traces"
        self.timeout_s = timeout_s

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        body = json.dumps(encode(spans), separators=(",", ":")).encode()
        request = urllib.request.Request(self.url, body, {"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                response.read()
        except OSError as exc:  # the collector is away: spans are dropped, requests are never held up
            log.warning("trace export to %s failed: %s", self.url, exc)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass
