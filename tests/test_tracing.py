"""OpenTelemetry traces: a request's spans have the documented structure (read with the SDK's in-memory
exporter), a caller's `traceparent` is continued, and the trace id reaches Triton, whose own spans (in
its OpenTelemetry mode) join the gateway's trace at the Triton call."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import time
from typing import ClassVar

import numpy as np
import pytest
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.app.factory import create_app
from gateway.process import free_port
from gateway.settings import GatewaySettings
from gateway.telemetry import tracing
from gateway.triton.coalesce import Coalescer
from kdcontract.digits import digit_png_bytes
from kdcontract.manifest import read_manifest

TRACE_ID, CALLER_SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN}-01"


def _tree(spans) -> dict[str, list]:
    """span name -> the names of its children (by parent span id)."""
    by_id = {s.context.span_id: s for s in spans}
    children: dict[str, list] = {s.name: [] for s in spans}
    for span in spans:
        if span.parent is not None and span.parent.span_id in by_id:
            children[by_id[span.parent.span_id].name].append(span.name)
    return {name: sorted(kids) for name, kids in children.items()}


@pytest.fixture
def traced(tiny_repo, triton):
    exporter = InMemorySpanExporter()
    settings = GatewaySettings(
        repo=tiny_repo, triton_url=triton.http_url, grpc_port=0, trace_sample_ratio=1.0, manifest_poll_s=0
    )
    with TestClient(create_app(settings, span_exporter=exporter)) as client:
        yield client, exporter
    assert not tracing.enabled()  # the gateway's shutdown turned tracing off again


def classify(client, model: str, headers: dict | None = None):
    resp = client.post(
        f"/v1/classify?model={model}",
        content=digit_png_bytes(1500),
        headers={"Content-Type": "image/png"} | (headers or {}),
    )
    assert resp.status_code == 200, resp.text
    return resp


def test_a_requests_spans_have_the_documented_structure_and_continue_the_callers_trace(traced, tiny_repo):
    client, exporter = traced
    classify(client, "student", {"traceparent": TRACEPARENT})
    spans = exporter.get_finished_spans()
    root = next(s for s in spans if s.name == "POST /v1/classify")
    assert f"{root.context.trace_id:032x}" == TRACE_ID and f"{root.parent.span_id:016x}" == CALLER_SPAN
    assert root.kind.name == "SERVER" and {s.context.trace_id for s in spans} == {root.context.trace_id}
    assert _tree(spans)["POST /v1/classify"] == ["admission", "decode", "triton.infer"]
    call = next(s for s in spans if s.name == "triton.infer")
    assert call.kind.name == "CLIENT" and call.attributes["model"] == "student_kd"

    exporter.clear()
    classify(client, "ensemble")
    tree = _tree(exporter.get_finished_spans())
    variants = len(read_manifest(tiny_repo).by_role("variant"))
    assert variants >= 2
    assert tree["POST /v1/classify"] == ["admission", "decode", "fusion", *["triton.infer"] * variants]

    exporter.clear()
    classify(client, "cascade")
    tree = _tree(exporter.get_finished_spans())
    assert tree["POST /v1/classify"] == ["admission", "cascade", "decode"]
    assert set(tree["cascade"]) == {"triton.infer"}

    exporter.clear()
    resp = client.post(
        "/v2/models/teacher/infer",
        json={"inputs": [{"name": "PIXELS", "shape": [1, 8, 8, 3], "datatype": "UINT8", "data": [0] * 192}]},
    )
    assert resp.status_code == 200, resp.text
    assert _tree(exporter.get_finished_spans())["POST /v2/models/{name}/infer"] == ["admission", "triton.infer"]


def test_a_request_waiting_for_a_shared_call_has_a_wait_span():
    exporter = InMemorySpanExporter()
    tracing.configure(1.0, None, exporter=exporter)
    try:

        async def send(key, images):
            await asyncio.sleep(0.05)
            return images

        async def main():
            coalescer = Coalescer(send, 1, 64, 5.0, lambda key, n: None)
            with tracing.span("request"):
                await asyncio.gather(*(coalescer.run("m", np.zeros((1, 2))) for _ in range(3)))

        asyncio.run(main())
    finally:
        tracing.shutdown()
    names = [s.name for s in exporter.get_finished_spans()]
    assert names.count("coalesce.wait") == 2  # the first request sent the call; two waited and shared the next


def test_tracing_off_hands_out_one_shared_no_op():
    assert not tracing.enabled()
    assert tracing.span("decode") is tracing.span("fusion") and tracing.traceparent() is None


class _Collector(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[dict]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        assert self.headers["Content-Type"] == "application/json"
        self.received.append(json.loads(body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def _service(resource: dict) -> str:
    return next(a["value"]["stringValue"] for a in resource["attributes"] if a["key"] == "service.name")


def _spans(bodies: list[dict]) -> list[dict]:
    return [
        span | {"service": _service(r["resource"])}
        for body in bodies
        for r in body["resourceSpans"]
        for scope in r["scopeSpans"]
        for span in scope["spans"]
    ]


def test_the_trace_id_reaches_triton_whose_spans_join_the_gateways(tiny_repo, tmp_path):
    """An OTLP/HTTP collector receives the gateway's spans (OTLP JSON) and the embedded Triton's, traced
    in its OpenTelemetry mode: Triton's request span is a child of the gateway's `triton.infer`."""
    _Collector.received = []
    collector = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{collector.server_port}"
    settings = GatewaySettings(
        repo=tiny_repo,
        embedded_triton=True,
        triton_url=f"127.0.0.1:{free_port()}",
        triton_grpc_port=free_port(),
        triton_metrics_port=free_port(),
        triton_log=tmp_path / "triton.log",
        grpc_port=0,
        manifest_poll_s=0,
        trace_sample_ratio=1.0,
        otlp_endpoint=endpoint,
    )
    try:
        with TestClient(create_app(settings)) as client:
            classify(client, "student", {"traceparent": TRACEPARENT})
            deadline = time.monotonic() + 30
            while not any(s["service"] == "triton-inference-server" for s in _spans(_Collector.received)):
                assert time.monotonic() < deadline, "Triton exported no span"
                time.sleep(0.2)
    finally:
        collector.shutdown()
    spans = [s for s in _spans(_Collector.received) if s["traceId"] == TRACE_ID]
    gateway_call = next(s for s in spans if s["service"] == "kdserve-gateway" and s["name"] == "triton.infer")
    triton_spans = [s for s in spans if s["service"] == "triton-inference-server"]
    assert triton_spans, "no Triton span carries the request's trace id"
    assert gateway_call["spanId"] in {s.get("parentSpanId") for s in triton_spans}
    root = next(s for s in spans if s["name"] == "POST /v1/classify")
    assert root["parentSpanId"] == CALLER_SPAN and root["kind"] == 2
