"""A real Prometheus (Debian's package) with the project's scrape jobs and rules, scraping a real gateway
and embedded Triton while mixed traffic flows: every recording rule, dashboard panel and HPA metric
returns data, every metric name they read is exported, and alerts fire when their condition is made."""

from __future__ import annotations

import asyncio
import math
import time

import httpx
import pytest

from gateway.process import GatewayProcess, free_port
from gateway.triton.server import EmbeddedTriton, TritonPorts
from kdcontract.digits import digit_png_bytes, digits_gray
from loadtest.benchmarks.soak import mixed_traffic, traffic_models
from loadtest.stacks.monitoring import (
    ADAPTER_CONFIG,
    CONTROLLER_METRICS,
    DASHBOARD,
    GPU_ONLY_METRICS,
    POD_OF_JOB,
    RULES,
    PrometheusServer,
    adapter_queries,
    dashboard_queries,
    local_config,
    recording_rules,
    referenced_metrics,
)
from tests.conftest import GATEWAY_ENV


@pytest.fixture(scope="module")
def observed(tiny_repo, tmp_path_factory):
    """Triton (explicit model control, so the test can take a model away), a gateway with an A/B split and
    full shadowing, and Prometheus scraping both every second; 12 s of mixed traffic already sent."""
    work = tmp_path_factory.mktemp("monitoring")
    ports = TritonPorts(free_port(), free_port(), free_port())
    triton = EmbeddedTriton(
        tiny_repo, ports, log_file=work / "triton.log", extra_args=["--model-control-mode=explicit", "--load-model=*"]
    )
    triton.start(timeout=180)
    gateway = prometheus = None
    try:
        gateway = GatewayProcess(
            tiny_repo,
            triton.http_url,
            env={**GATEWAY_ENV, "KDSERVE_MANIFEST_POLL_S": "0", "KDSERVE_ANSWERS_DIR": str(work / "answers")},
            ready_path="/readyz",
        )
        targets = {"kdserve-gateway": f"127.0.0.1:{gateway.port}", "triton": f"127.0.0.1:{ports.metrics}"}
        prometheus = PrometheusServer(local_config(work / "prometheus", targets, alerts_at_once=True))
        prometheus.wait_for(lambda: all(prometheus.targets_up().values()), 30, "both targets up")
        log: list = []
        asyncio.run(mixed_traffic(gateway.url, traffic_models(tiny_repo), time.monotonic() + 12, 4, log))
        # Every request must have had the status it expects before its metrics are worth checking.
        assert all(status == expected for _, _, status, expected in log), {s for _, _, s, _ in log}
        send_feedback(gateway)
        accepted = 'kdserve_feedback_total{outcome="accepted"}'
        prometheus.wait_for(lambda: prometheus.query(f"{accepted} > 0"), 30, "the feedback scraped")
        yield triton, gateway, prometheus
    finally:
        for process in (prometheus, gateway, triton):
            if process is not None:
                process.stop()


def send_feedback(gateway: GatewayProcess, requests: int = 30) -> None:
    """A/B requests and their true labels as feedback, for the ground-truth series."""
    _, labels = digits_gray()
    items = []
    for index in range(1700, 1700 + requests):
        resp = gateway.client.post(
            "/v1/classify?model=auto", content=digit_png_bytes(index), headers={"Content-Type": "image/png"}
        )
        assert resp.status_code == 200, resp.text
        items.append({"request_id": resp.headers["x-request-id"], "label": str(labels[index])})
    resp = gateway.client.post("/v1/feedback", json=items)
    assert resp.status_code == 200 and {r["status"] for r in resp.json()["results"]} == {200}, resp.text


def _still_empty(prometheus: PrometheusServer, exprs: list[str], timeout: float = 30.0) -> list[str]:
    """The expressions that return no sample even after `timeout` s (rules need a few evaluations)."""
    deadline = time.monotonic() + timeout
    while True:
        empty = [expr for expr in exprs if not prometheus.query(expr)]
        if not empty or time.monotonic() > deadline:
            return empty
        time.sleep(1)


def test_every_recording_rule_returns_data(observed):
    _, _, prometheus = observed
    rules = recording_rules()
    assert len(rules) >= 14
    assert not _still_empty(prometheus, rules)


def test_every_dashboard_panel_returns_data_except_gpu_only_ones(observed):
    """(The rollout controller's panel is checked where a controller runs: tests/test_rollout.py.)"""
    _, _, prometheus = observed
    queries = dashboard_queries()
    assert len({q.panel for q in queries}) >= 15
    gpu_only = [q for q in queries if q.gpu_only]
    assert {q.panel for q in gpu_only} == {"GPU utilisation (GPU Triton only)", "GPU memory used (GPU Triton only)"}
    empty = _still_empty(prometheus, [q.expr for q in queries if not q.gpu_only and not q.controller_only])
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
    # The exception is honest: a Triton without a GPU exports no GPU series at all.
    assert not any(prometheus.query(name) for name in GPU_ONLY_METRICS)


def test_hpa_metrics_reach_the_adapter_queries_per_pod(observed):
    _, _, prometheus = observed
    pod_of_metric = {
        "triton_queue_compute_ratio": POD_OF_JOB["triton"],
        "kdserve_in_flight_requests": POD_OF_JOB["kdserve-gateway"],
    }
    for metric, query in adapter_queries(pod_of_metric).items():
        result = prometheus.query(query)
        assert [sample["metric"] for sample in result] == [{"pod": pod_of_metric[metric]}], (metric, query, result)
        value = float(result[0]["value"][1])
        assert math.isfinite(value) and value >= 0, (metric, value)  # idle models left out, never NaN


def test_every_metric_name_read_by_rules_dashboard_and_adapter_is_exported(observed):
    _, _, prometheus = observed
    exported = prometheus.metric_names()
    for path in (RULES, DASHBOARD, ADAPTER_CONFIG):
        read = referenced_metrics(path.read_text()) - set(GPU_ONLY_METRICS) - set(CONTROLLER_METRICS)
        assert read, path
        assert read <= exported, f"{path.name} reads metrics nobody exports: {sorted(read - exported)}"


def test_alerts_fire_when_a_model_is_made_unavailable(observed):
    triton, gateway, prometheus = observed
    assert not {alert for alert, _ in prometheus.firing()} & {"KdserveModelUnavailable", "KdserveEnsembleDegraded"}
    control = httpx.Client(base_url=f"http://{triton.http_url}", timeout=30)
    digit = digit_png_bytes(1700)
    try:
        for model in ("teacher", "variant_0"):
            assert control.post(f"/v2/repository/models/{model}/unload").status_code == 200
        prometheus.wait_for(lambda: control.get("/v2/models/teacher/ready").status_code != 200, 30, "teacher unloaded")
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            files = {"images": ("d.png", digit, "image/png")}
            assert gateway.client.post("/v1/classify?model=teacher", files=files).status_code == 503
            ensemble = gateway.client.post("/v1/classify?model=ensemble", files=files)
            assert ensemble.status_code == 200 and ensemble.json()["degraded"] is True
            if {("KdserveModelUnavailable", "teacher"), ("KdserveEnsembleDegraded", "")} <= prometheus.firing():
                break
            time.sleep(0.5)
        firing = prometheus.firing()
        assert ("KdserveModelUnavailable", "teacher") in firing, firing
        assert ("KdserveEnsembleDegraded", "") in firing, firing
        assert ("KdserveModelUnavailable", "student_kd") not in firing
    finally:
        for model in ("teacher", "variant_0"):
            control.post(f"/v2/repository/models/{model}/load")
        control.close()
