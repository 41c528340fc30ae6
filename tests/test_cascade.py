"""The confidence cascade through the real gateway and Triton: who answers, what they answer, what is counted."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gateway.process import GatewayProcess
from kdcontract.digits import digit_png_bytes
from kdcontract.manifest import read_manifest
from loadtest.clients.measure import metric_value

HELD_OUT = list(range(1700, 1760))  # 60 digits, as 8x8 PNG files


def classify(gateway: GatewayProcess, model: str) -> dict:
    files = [("images", (f"{i}.png", digit_png_bytes(i), "image/png")) for i in HELD_OUT]
    resp = gateway.client.post(f"/v1/classify?model={model}&top_k=1", files=files)
    assert resp.status_code == 200, resp.text
    return resp.json()


def escalations(gateway: GatewayProcess) -> float:
    text = gateway.client.get("/metrics").text
    return metric_value(text, "kdserve_cascade_escalations_total", {"outcome": "answered"})


@pytest.fixture(scope="module")
def halfway_cascade(tiny_repo, triton, gateway, tmp_path_factory):
    """A gateway whose cascade threshold is the median student confidence on these digits, so about
    half of them escalate whatever the tiny run's fitted threshold is. It reads only the manifest;
    the models are the shared Triton's."""
    student = classify(gateway, "student_kd")
    confidence = [p["top_k"][0]["probability"] for p in student["predictions"]]
    manifest = read_manifest(tiny_repo)
    assert manifest.cascade is not None and manifest.cascade.student == "student_kd"
    manifest.cascade.threshold = float(np.median(confidence))
    repo = tmp_path_factory.mktemp("cascade_repo")
    (repo / "manifest.json").write_text(json.dumps(manifest.model_dump(mode="json")))
    gw = GatewayProcess(repo, triton.http_url)
    yield gw, manifest.cascade.threshold, student
    gw.stop()


def test_the_student_answers_when_sure_and_the_teacher_when_not(halfway_cascade, gateway):
    cascade_gw, threshold, student = halfway_cascade
    teacher = classify(gateway, "teacher")
    before = escalations(cascade_gw)
    body = classify(cascade_gw, "cascade")
    assert body["model"] == "cascade" and body["degraded"] is False
    unsure = [p["top_k"][0]["probability"] < threshold for p in student["predictions"]]
    assert 0 < sum(unsure) < len(unsure)
    for i, prediction in enumerate(body["predictions"]):
        expected_by, source = ("teacher", teacher) if unsure[i] else ("student_kd", student)
        assert prediction["answered_by"] == expected_by
        assert prediction["top_k"][0]["label"] == source["predictions"][i]["top_k"][0]["label"]
        assert prediction["top_k"][0]["probability"] == pytest.approx(
            source["predictions"][i]["top_k"][0]["probability"]
        )
    assert body["members"] == ["student_kd", "teacher"]
    assert escalations(cascade_gw) - before == sum(unsure)


def test_the_fitted_cascade_is_served_with_its_trained_metrics(gateway, tiny_repo, tiny_results):
    manifest = read_manifest(tiny_repo)
    trained = tiny_results["models"]["cascade"]
    assert manifest.cascade.threshold == pytest.approx(trained["threshold"])
    assert manifest.cascade.metrics["top1"] == pytest.approx(trained["top1"])
    body = classify(gateway, "cascade")
    assert all(p["answered_by"] in ("student_kd", "teacher") for p in body["predictions"])
    assert gateway.client.get("/v1/models").json()["aliases"]["cascade"] == "cascade"
    other = classify(gateway, "student")
    assert all(p["answered_by"] is None for p in other["predictions"])  # only the cascade says who answered
