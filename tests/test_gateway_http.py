"""The gateway under uvicorn in front of the real Triton: real images in, real predictions out."""

import base64
import io
import re
import time
from collections import Counter

import numpy as np
import pytest
import tritonclient.http as httpclient
from PIL import Image

from gateway.process import GatewayProcess, free_port
from kdcontract.digits import digit_png_bytes
from kdcontract.manifest import read_manifest
from kdcontract.ort_session import open_session
from loadtest.clients.measure import metric_value
from tests.conftest import triton_inference_stats
from training.data import load_digits_images
from training.onnx_tools import run_logits

HELD_OUT = [1500, 1600, 1700, 1750]  # indices into sklearn's digits


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def local_probabilities(repo, model: str, indices: list[int]) -> np.ndarray:
    manifest = read_manifest(repo)
    images = load_digits_images(8)[0].numpy()[indices]
    entry = manifest.models[model]
    outputs = run_logits(open_session(repo / model / str(entry.version) / "model.onnx"), images)
    if entry.role == "ensemble":  # a Triton-side ensemble's graph outputs calibrated probabilities
        return outputs
    z = outputs / entry.temperature
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def test_predictions_through_http_equal_in_process_onnx_runtime(gateway, tiny_repo):
    files = [("images", (f"{i}.png", digit_png_bytes(i), "image/png")) for i in HELD_OUT]
    for alias, model in (("student", "student_kd"), ("teacher", "teacher"), ("ensemble_fused_int8",) * 2):
        resp = gateway.client.post("/v1/classify", params={"model": alias, "top_k": 10}, files=files)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["model"] == model and body["version"] == 1 and body["arm"] is None
        expected = local_probabilities(tiny_repo, model, HELD_OUT)
        for prediction, probs in zip(body["predictions"], expected, strict=True):
            served = np.zeros(10)
            for label in prediction["top_k"]:
                served[label["index"]] = label["probability"]
            np.testing.assert_allclose(served, probs, atol=1e-5)
            assert prediction["top_k"][0]["label"] == str(int(probs.argmax()))
        assert body["latency"]["inference_ms"] > 0 and body["latency"]["total_ms"] >= body["latency"]["decode_ms"]


def test_raw_body_and_base64_json_give_the_same_answer(gateway):
    png = digit_png_bytes(HELD_OUT[0])
    raw = gateway.client.post("/v1/classify?model=student", content=png, headers={"Content-Type": "image/png"})
    js = gateway.client.post("/v1/classify", json={"images": [base64.b64encode(png).decode()], "model": "student"})
    assert raw.status_code == js.status_code == 200
    assert raw.json()["predictions"] == js.json()["predictions"]


def triton_successes(triton, model: str, at_least: int = 0) -> int:
    return int(triton_inference_stats(triton.http_url, model, successes_at_least=at_least)["success"]["count"])


def test_each_ensemble_runs_where_its_name_says(gateway, triton, tiny_repo):
    """`ensemble` fuses the variants in the gateway; `ensemble_triton` is answered by Triton's ensemble model."""
    files = [("images", ("d.png", digit_png_bytes(i), "image/png")) for i in HELD_OUT]
    expected = (
        local_probabilities(tiny_repo, "variant_0", HELD_OUT) + local_probabilities(tiny_repo, "variant_1", HELD_OUT)
    ) / 2
    watched = ["variant_0", "variant_1", "ensemble_fused", "ensemble_scheduler"]

    def call(model: str, expected: dict[str, int]) -> tuple[dict, dict[str, int]]:
        before = {m: triton_successes(triton, m) for m in watched}
        resp = gateway.client.post("/v1/classify", params={"model": model, "top_k": 10}, files=files)
        assert resp.status_code == 200, resp.text
        return resp.json(), {m: triton_successes(triton, m, before[m] + expected[m]) - before[m] for m in watched}

    def served_probabilities(body: dict) -> np.ndarray:
        served = np.zeros((len(HELD_OUT), 10))
        for row, prediction in zip(served, body["predictions"], strict=True):
            for label in prediction["top_k"]:
                row[label["index"]] = label["probability"]
        return served

    wanted = {"variant_0": 1, "variant_1": 1, "ensemble_fused": 0, "ensemble_scheduler": 0}
    fused, calls = call("ensemble", wanted)
    assert fused["model"] == "ensemble" and fused["degraded"] is False
    assert fused["members"] == ["variant_0", "variant_1"]
    assert calls == wanted
    np.testing.assert_allclose(served_probabilities(fused), expected, atol=1e-5)

    wanted = {"variant_0": 0, "variant_1": 0, "ensemble_fused": 1, "ensemble_scheduler": 0}
    server_side, calls = call("ensemble_triton", wanted)
    assert server_side["model"] == "ensemble_fused" and server_side["members"] == ["variant_0", "variant_1"]
    assert calls == wanted
    np.testing.assert_allclose(served_probabilities(server_side), expected, atol=1e-5)

    wanted = {"variant_0": 1, "variant_1": 1, "ensemble_fused": 0, "ensemble_scheduler": 1}
    scheduled, calls = call("ensemble_scheduler", wanted)
    assert scheduled["model"] == "ensemble_scheduler"
    assert calls == wanted
    np.testing.assert_allclose(served_probabilities(scheduled), expected, atol=1e-5)

    multihead = gateway.client.post("/v1/classify", params={"model": "multihead"}, files=files)
    assert multihead.status_code == 200 and len(multihead.json()["predictions"]) == len(HELD_OUT)


def test_a_member_down_degrades_the_ensemble_then_quorum_fails(gateway, triton, tiny_repo):
    admin = httpclient.InferenceServerClient(triton.http_url)
    files = [("images", ("d.png", digit_png_bytes(HELD_OUT[0]), "image/png"))]
    degraded_before = metric_value(gateway.client.get("/metrics").text, "kdserve_ensemble_degraded_total")
    admin.unload_model("variant_1")
    try:
        degraded = gateway.client.post("/v1/classify?model=ensemble", files=files)
        assert degraded.status_code == 200 and degraded.json()["degraded"] is True
        assert degraded.json()["members"] == ["variant_0"]
        strict = GatewayProcess(tiny_repo, triton.http_url, env={"KDSERVE_ENSEMBLE_QUORUM": "2"})
        try:
            below = strict.client.post("/v1/classify?model=ensemble", files=files)
            assert below.status_code == 503 and "quorum" in below.json()["error"]["message"]
            assert below.headers["Retry-After"]
        finally:
            strict.stop()
    finally:
        admin.load_model("variant_1")
    degraded_after = metric_value(gateway.client.get("/metrics").text, "kdserve_ensemble_degraded_total")
    assert degraded_after - degraded_before == 1  # the one degraded answer; the refused one is not counted


def test_ab_assignment_is_sticky_and_shadow_agreement_is_recorded(gateway):
    png = digit_png_bytes(HELD_OUT[1])
    arms = {}
    for key in ("alice", "bob", "carol", "dave", "erin", "frank"):
        for _ in range(2):
            resp = gateway.client.post(
                "/v1/classify", content=png, headers={"Content-Type": "image/png", "X-Client-Key": key}
            )
            assert resp.status_code == 200
            arms.setdefault(key, set()).add(resp.json()["arm"])
    assert all(len(a) == 1 for a in arms.values())
    override = gateway.client.post(
        "/v1/classify?model=teacher", content=png, headers={"Content-Type": "image/png", "X-Client-Key": "alice"}
    )
    assert override.json()["arm"] is None and override.json()["model"] == "teacher"
    time.sleep(0.5)  # shadow calls run after the responses were sent
    summary = gateway.client.get("/v1/ab/summary").json()
    counted = sum(arm["count"] for arm in summary["arms"].values())
    shadows = sum(arm["shadow"]["count"] for arm in summary["arms"].values())
    assert counted >= 12 and shadows >= 12  # shadow_fraction is 1.0 in this gateway
    rates = [a["shadow"]["agreement_rate"] for a in summary["arms"].values() if a["shadow"]["count"]]
    assert all(0.0 <= r <= 1.0 for r in rates)
    assert summary["arms"]["student"]["latency_ms"]["p99"] >= summary["arms"]["student"]["latency_ms"]["p50"]


def test_every_metric_is_exported_with_its_labels(gateway):
    # Its own traffic of every kind, so the test holds when run alone: a pinned student, an
    # ensemble, an A/B request (which also shadows) and one undecodable body.
    png = digit_png_bytes(3)
    headers = {"Content-Type": "image/png"}
    traced = gateway.client.post(
        "/v1/classify?model=student", content=png, headers={**headers, "X-Request-ID": "trace-42"}
    )
    assert traced.status_code == 200
    assert traced.headers["X-Request-ID"] == traced.json()["request_id"] == "trace-42"
    fused = gateway.client.post("/v1/classify?model=ensemble", content=png, headers=headers)
    assert fused.status_code == 200 and re.fullmatch(r"[0-9a-f]{32}", fused.headers["X-Request-ID"])
    shadow = re.compile(r'kdserve_shadow_requests_total\{agreed="(?:true|false)",arm="(\w+)"\} ([0-9.]+)')

    def shadows_by_arm() -> Counter:
        counts: Counter = Counter()
        for found in shadow.finditer(gateway.client.get("/metrics").text):
            counts[found.group(1)] += float(found.group(2))
        return counts

    before = shadows_by_arm()  # other tests may have shadowed already: count this test's own
    ab = gateway.client.post("/v1/classify", content=png, headers={**headers, "X-Client-Key": "metrics"})
    assert ab.status_code == 200
    arm = ab.json()["arm"]
    assert gateway.client.post("/v1/classify", content=b"junk", headers=headers).status_code == 415
    needles = [
        'kdserve_request_duration_seconds_bucket{arm="",le="0.001",model="student_kd",route="/v1/classify",status="200"}',
        f'kdserve_requests_total{{arm="{arm}",model="{ab.json()["model"]}",route="/v1/classify",status="200"}}',
        'kdserve_triton_call_duration_seconds_count{model="student_kd",outcome="ok"}',
        'kdserve_triton_call_images_count{model="student_kd"}',
        "kdserve_decode_duration_seconds_count",
        'kdserve_fusion_duration_seconds_count{method="mean_prob"}',
        'kdserve_requests_total{arm="",model="student_kd",route="/v1/classify",status="200"}',
        'kdserve_requests_total{arm="",model="ensemble",route="/v1/classify",status="200"}',
        'kdserve_errors_total{kind="unsupported_media_type"}',
        "kdserve_ensemble_degraded_total",
        "kdserve_in_flight_requests",
        'kdserve_images_total{model="student_kd"}',
    ]
    # The shadow call goes to the other arm and runs after the primary response was sent.
    other = next(a for a in ("student", "teacher") if a != arm)
    deadline = time.monotonic() + 5.0
    while shadows_by_arm()[other] <= before[other] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert shadows_by_arm()[other] >= before[other] + 1, "no shadow request to the other arm counted"
    text = gateway.client.get("/metrics").text
    for needle in needles:
        assert needle in text, needle


def test_models_health_readiness_and_docs(gateway):
    models = gateway.client.get("/v1/models").json()
    by_name = {m["name"]: m for m in models["models"]}
    assert by_name["student_kd"]["ready"] and by_name["teacher"]["role"] == "teacher"
    assert models["aliases"]["student"] == "student_kd"
    assert gateway.client.get("/healthz").json() == {"status": "ok"}
    ready = gateway.client.get("/readyz")
    assert ready.status_code == 200 and "student_kd" in ready.json()["models"]
    spec = gateway.client.get("/openapi.json").json()
    body = spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/*", "application/json"} <= set(body)
    assert {"400", "413", "415", "503", "504"} <= set(spec["paths"]["/v1/classify"]["post"]["responses"])


MALFORMED = [
    (b"", "image/png", 400),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "image/png", 415),
    (png_bytes(Image.new("RGB", (64, 64), (1, 2, 3)))[:80], "image/png", 400),
    (b"GIF89a" + b"\xff" * 30, "image/gif", 415),
    (b"hello, this is text", "text/plain", 415),
    (b"{not json", "application/json", 400),
    (b'{"images": ["%%%not-base64%%%"]}', "application/json", 400),
    (b'{"images": []}', "application/json", 400),
    (b'{"images": ["aGVsbG8="], "top_k": 0}', "application/json", 400),
    (png_bytes(Image.new("1", (5000, 5000))), "image/png", 413),
]


@pytest.mark.parametrize(("payload", "content_type", "status"), MALFORMED)
def test_malformed_input_gets_a_clear_4xx_never_a_500(gateway, payload, content_type, status):
    resp = gateway.client.post("/v1/classify?model=student", content=payload, headers={"Content-Type": content_type})
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["message"]


@pytest.mark.parametrize(
    ("method", "path", "status", "kind"),
    [
        ("GET", "/v1/nowhere", 404, "not_found"),
        ("GET", "/v1/classify", 405, "method_not_allowed"),
        ("DELETE", "/v1/models", 405, "method_not_allowed"),
    ],
)
def test_framework_errors_use_the_documented_shape_with_the_request_id(gateway, method, path, status, kind):
    resp = gateway.client.request(method, path, headers={"X-Request-ID": "shape-check"})
    assert resp.status_code == status
    assert resp.json() == {
        "error": {"kind": kind, "message": resp.json()["error"]["message"]},
        "request_id": "shape-check",
    }
    assert resp.headers["X-Request-ID"] == "shape-check"
    assert f'kdserve_errors_total{{kind="{kind}"}}' in gateway.client.get("/metrics").text


def test_a_hostile_request_id_is_replaced_not_echoed(gateway):
    for sent in ("x" * 300, "bad id with spaces", "\u00e9t\u00e9"):
        resp = gateway.client.get("/v1/nowhere", headers={"X-Request-ID": sent.encode("utf-8")})
        assert re.fullmatch(r"[0-9a-f]{32}", resp.headers["X-Request-ID"]) and resp.json()["request_id"] != sent


def test_an_unhandled_exception_is_a_500_in_the_shape_counted_and_traceable():
    """The handler the gateway installs, on an app whose route fails with a bug-like exception."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from gateway.auth.pacing import RefusalPacing
    from gateway.http.errors import install_error_handlers
    from gateway.http.observe import RequestObserver
    from gateway.telemetry.metrics import GatewayMetrics

    metrics = GatewayMetrics()
    app = FastAPI()
    install_error_handlers(app, RefusalPacing(), on_error=lambda kind: metrics.errors.labels(kind).inc())
    app.add_middleware(RequestObserver, metrics=metrics)

    @app.get("/boom")
    async def boom() -> None:
        int("²")  # the kind of bug the review found: str.isdigit() accepts it, int() does not

    with TestClient(app, raise_server_exceptions=False) as client:
        resp = client.get("/boom", headers={"X-Request-ID": "bug-1"})
    assert resp.status_code == 500 and resp.headers["X-Request-ID"] == "bug-1"
    assert resp.json() == {
        "error": {"kind": "internal", "message": "internal error; quote the request id when reporting it"},
        "request_id": "bug-1",
    }
    assert metrics.errors.labels("internal")._value.get() == 1
    assert metrics.requests.labels("/boom", "", "", "500")._value.get() == 1


def test_oversized_body_unknown_model_and_too_many_images(gateway):
    big = gateway.client.post("/v1/classify", content=b"\0" * (9 * 1024 * 1024), headers={"Content-Type": "image/png"})
    assert big.status_code == 413
    unknown = gateway.client.post(
        "/v1/classify?model=resnet9000", content=digit_png_bytes(1), headers={"Content-Type": "image/png"}
    )
    assert unknown.status_code == 404 and "student" in unknown.json()["error"]["message"]
    many = [("images", ("d.png", digit_png_bytes(1), "image/png"))] * 65
    too_many = gateway.client.post("/v1/classify", files=many)
    assert too_many.status_code == 400 and "too many files" in too_many.json()["error"]["message"].lower(), (
        too_many.text
    )


def test_triton_down_is_503_with_retry_after_and_a_deadline_is_504(tiny_repo, triton):
    dead = GatewayProcess(tiny_repo, f"127.0.0.1:{free_port()}")
    try:
        resp = dead.client.post(
            "/v1/classify?model=student",
            content=digit_png_bytes(1),
            headers={"Content-Type": "image/png"},
        )
        assert resp.status_code == 503 and resp.headers["Retry-After"] == "2"
        assert "127.0.0.1" not in resp.text  # Triton's own error text stays in the log
        assert dead.client.get("/readyz").status_code == 503
    finally:
        dead.stop()
    hurried = GatewayProcess(tiny_repo, triton.http_url, env={"KDSERVE_TRITON_TIMEOUT_S": "0.0001"})
    try:
        files = [("images", ("d.png", digit_png_bytes(1), "image/png"))] * 32
        resp = hurried.client.post("/v1/classify?model=teacher", files=files)
        assert resp.status_code == 504, resp.text
    finally:
        hurried.stop()


def test_bad_settings_stop_the_gateway_at_start(tiny_repo):
    with pytest.raises(RuntimeError, match="ab_weights"):
        GatewayProcess(tiny_repo, "127.0.0.1:1", env={"KDSERVE_AB_WEIGHTS": '{"student": 1, "canary": 1}'})


def test_serve_with_embedded_triton_starts_supervises_and_stops_it(tiny_repo):
    http_port = free_port()
    env = {
        "KDSERVE_EMBEDDED_TRITON": "true",
        "KDSERVE_TRITON_GRPC_PORT": str(free_port()),
        "KDSERVE_TRITON_METRICS_PORT": str(free_port()),
    }
    with GatewayProcess(tiny_repo, f"127.0.0.1:{http_port}", env=env, ready_path="/readyz", timeout=180) as gw:
        resp = gw.client.post(
            "/v1/classify?model=student",
            content=digit_png_bytes(7),
            headers={"Content-Type": "image/png"},
        )
        assert resp.status_code == 200 and resp.json()["model"] == "student_kd"
        assert httpclient.InferenceServerClient(f"127.0.0.1:{http_port}").is_server_ready()
    # Stopping the gateway stopped its Triton too.
    time.sleep(1)
    with pytest.raises(Exception):  # noqa: B017 - any connection error will do
        httpclient.InferenceServerClient(f"127.0.0.1:{http_port}").is_server_ready()
