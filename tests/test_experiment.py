"""The A/B experiment changed at run time: the admin credential, its error shape, and two replicas
following one experiment file in front of one Triton; feedback joined on either replica."""

from __future__ import annotations

import hashlib
import json
import time

import pytest

from gateway.process import GatewayProcess
from kdcontract.digits import digit_png_bytes, digits_gray
from loadtest.clients.measure import metric_value

TOKEN = "test-admin-token"  # only its sha256 is configured
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
POLL_S = 0.3
PNG = digit_png_bytes(0)


def classify_as(gateway: GatewayProcess, key: str):
    headers = {"X-Client-Key": key, "Content-Type": "image/png"}
    return gateway.client.post("/v1/classify?model=auto", headers=headers, content=PNG)


def experiment(candidate_weight: float, **changes) -> dict:
    body = {
        "control": "teacher",
        "candidate": "student",
        "weights": {"student": candidate_weight, "teacher": round(1 - candidate_weight, 6)},
        "shadow_fraction": 0.0,
        "gates": {"latency": {"quantile": 0.99, "max_ratio": 1.5}, "min_agreement": 0.9, "max_top1_drop": 0.02},
        "rollout": {"steps": [0.05, 0.25, 0.5, 1.0], "min_samples": 50, "min_duration_s": 1},
    }
    return body | changes


@pytest.fixture(scope="module")
def replicas(tiny_repo, triton, tmp_path_factory):
    """Two gateways in front of the session's Triton, following one experiment file."""
    path = tmp_path_factory.mktemp("experiment") / "experiment.json"
    path.write_text(json.dumps(experiment(0.05)))
    env = {
        "KDSERVE_EXPERIMENT_FILE": str(path),
        "KDSERVE_EXPERIMENT_POLL_S": str(POLL_S),
        "KDSERVE_ADMIN_TOKEN_SHA256": hashlib.sha256(TOKEN.encode()).hexdigest(),
        "KDSERVE_ANSWERS_DIR": str(path.parent / "answers"),  # one answer store both replicas reach
    }
    first = GatewayProcess(tiny_repo, triton.http_url, env=env)
    second = GatewayProcess(tiny_repo, triton.http_url, env=env)
    yield first, second, path
    first.stop()
    second.stop()


def follow(gateway: GatewayProcess, weights: dict) -> None:
    deadline = time.monotonic() + 10 * POLL_S
    while current(gateway)["experiment"]["weights"] != weights:
        assert time.monotonic() < deadline, f"the replica did not follow the experiment file to {weights}"
        time.sleep(0.05)


@pytest.fixture(autouse=True)
def start_experiment(replicas):
    """Every test starts from the same experiment on both replicas, whatever ran before it."""
    first, second, _ = replicas
    assert first.client.put("/v1/experiment", json=experiment(0.05), headers=ADMIN).status_code == 200
    follow(second, {"student": 0.05, "teacher": 0.95})


def refusals(gateway: GatewayProcess) -> float:
    for line in gateway.client.get("/metrics").text.splitlines():
        if line.startswith('kdserve_errors_total{kind="experiment_refused"}'):
            return float(line.split()[-1])
    raise AssertionError("kdserve_errors_total{kind=experiment_refused} is not exported")


def current(gateway: GatewayProcess) -> dict:
    resp = gateway.client.get("/v1/experiment")
    assert resp.status_code == 200, resp.text
    return resp.json()


def refused(resp, status: int, kind: str, *fragments: str) -> None:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["error"]["kind"] == kind and body["request_id"], body
    for fragment in fragments:
        assert fragment in body["error"]["message"], body


def test_a_replica_starts_with_the_experiment_file_and_reports_it(replicas):
    first, second, path = replicas
    for gateway in (first, second):
        body = current(gateway)
        assert body["source"] == "file" and body["file"] == str(path)
        assert body["experiment"]["weights"] == {"student": 0.05, "teacher": 0.95}
        assert body["experiment"]["gates"]["latency"]["max_ratio"] == 1.5


def test_bad_credentials_and_bad_experiments_are_refused_in_the_error_shape_and_change_nothing(replicas):
    first, _, path = replicas
    before, file_before = current(first)["experiment"], path.read_text()
    put = first.client.put
    resp = put("/v1/experiment", json=experiment(0.5))
    refused(resp, 401, "unauthorized", "API key is required")
    assert resp.headers["www-authenticate"].startswith("Bearer")
    refused(put("/v1/experiment", json=experiment(0.5), headers={"Authorization": "Bearer wrong"}), 401, "unauthorized")
    refused(put("/v1/experiment", content=b"{not json", headers=ADMIN), 400, "bad_request", "not valid JSON")
    weights = experiment(0.5, weights={"student": 0.5, "teacher": 0.6})
    refused(put("/v1/experiment", json=weights, headers=ADMIN), 422, "invalid_experiment", "weights", "sum to 1")
    unknown = experiment(0.5, weights={"student": 0.5, "nonexistent": 0.5}, control="nonexistent")
    refused(put("/v1/experiment", json=unknown, headers=ADMIN), 422, "invalid_experiment", "nonexistent")
    field = experiment(0.5, shadow_fraction=1.5)
    refused(put("/v1/experiment", json=field, headers=ADMIN), 422, "invalid_experiment", "shadow_fraction")
    gates = experiment(0.5, gates={"latency": {"max_ms": 10, "max_ratio": 2}})
    refused(put("/v1/experiment", json=gates, headers=ADMIN), 422, "invalid_experiment", "gates.latency")
    steps = experiment(0.5, rollout={"steps": [0.5, 0.25]})
    refused(put("/v1/experiment", json=steps, headers=ADMIN), 422, "invalid_experiment", "rollout.steps")
    assert current(first)["experiment"] == before and path.read_text() == file_before


def test_a_change_on_one_replica_reaches_the_other_within_the_follow_interval_and_keys_stay_sticky(replicas):
    first, second, path = replicas
    resp = first.client.put("/v1/experiment", json=experiment(0.5), headers=ADMIN)
    assert resp.status_code == 200, resp.text
    assert resp.json()["experiment"]["weights"] == {"student": 0.5, "teacher": 0.5}
    assert json.loads(path.read_text())["weights"] == {"student": 0.5, "teacher": 0.5}
    follow(second, {"student": 0.5, "teacher": 0.5})
    # The same key lands on the same arm on both replicas, for every key.
    arms = {}
    for key in (f"client-{i}" for i in range(40)):
        answers = [classify_as(g, key) for g in (first, second)]
        assert all(a.status_code == 200 for a in answers), answers[0].text
        assert answers[0].json()["arm"] == answers[1].json()["arm"]
        arms[key] = answers[0].json()["arm"]
    assert set(arms.values()) == {"student", "teacher"}  # 40 keys at 50/50: both arms (p of one: 2e-12)
    # Raising the candidate's weight moves keys to it, never from it.
    assert second.client.put("/v1/experiment", json=experiment(1.0), headers=ADMIN).status_code == 200
    follow(first, {"student": 1.0, "teacher": 0.0})
    for key, arm in arms.items():
        assert classify_as(first, key).json()["arm"] == "student", (key, arm)


def test_a_broken_experiment_file_is_refused_by_every_replica_which_keep_running_theirs(replicas):
    first, second, path = replicas
    running, before = current(first)["experiment"], [refusals(g) for g in (first, second)]
    path.write_text('{"weights": {"student": 2}}')
    deadline = time.monotonic() + 60 * POLL_S  # a poll each: waited for, not timed (a slower machine polls later)
    while any(refusals(g) < count + 1 for g, count in zip((first, second), before, strict=True)):
        assert time.monotonic() < deadline, "a replica did not read the broken file"
        time.sleep(POLL_S)
    for gateway, count in zip((first, second), before, strict=True):
        assert current(gateway)["experiment"] == running
        assert refusals(gateway) == count + 1
        assert classify_as(gateway, "any").status_code == 200


def test_without_an_admin_credential_configured_the_experiment_cannot_be_changed(gateway):
    refused(
        gateway.client.put("/v1/experiment", json=experiment(0.5), headers=ADMIN), 403, "forbidden", "admin API is off"
    )
    assert current(gateway)["source"] == "settings"


def feedback_counts(gateway: GatewayProcess) -> dict[str, float]:
    text = gateway.client.get("/metrics").text
    return {
        outcome: metric_value(text, "kdserve_feedback_total", {"outcome": outcome})
        for outcome in ("accepted", "unknown", "expired", "duplicate", "invalid_label")
    }


def top1_counts(gateway: GatewayProcess) -> dict[str, float]:
    text = gateway.client.get("/metrics").text
    return {
        arm: sum(
            metric_value(text, "kdserve_feedback_top1_total", {"arm": arm, "correct": c}) for c in ("true", "false")
        )
        for arm in ("student", "teacher")
    }


def test_feedback_reaching_the_other_replica_is_joined_once_and_bad_feedback_is_refused_and_counted(replicas):
    first, second, _ = replicas
    assert (
        first.client.put("/v1/experiment", json=experiment(0.5, shadow_fraction=1.0), headers=ADMIN).status_code == 200
    )
    follow(second, {"student": 0.5, "teacher": 0.5})
    _, labels = digits_gray()
    answered = []  # (request id, true label, arm) of requests the first replica answered
    for i in range(1500, 1540):
        resp = first.client.post(
            "/v1/classify?model=auto", content=digit_png_bytes(i), headers={"Content-Type": "image/png"}
        )
        assert resp.status_code == 200, resp.text
        answered.append((resp.headers["x-request-id"], str(labels[i]), resp.json()["arm"]))
    before = [feedback_counts(g) for g in (first, second)]
    top1_before = [top1_counts(g) for g in (first, second)]
    time.sleep(0.5)  # answers are written off the request path

    # One item to the other replica: joined to what the first one answered.
    rid, label, arm = answered[0]
    resp = second.client.post("/v1/feedback", json={"request_id": rid, "label": label})
    assert resp.status_code == 200 and resp.json()["outcome"] == "accepted", resp.text
    assert arm in resp.json()["message"]
    # The same feedback again, on either replica: counted once only.
    refused(second.client.post("/v1/feedback", json={"request_id": rid, "label": label}), 409, "duplicate_feedback")
    refused(first.client.post("/v1/feedback", json={"request_id": rid, "label": label}), 409, "duplicate_feedback")
    # Unknown ids, a label outside the classes, malformed bodies: the one error shape.
    refused(
        second.client.post("/v1/feedback", json={"request_id": "never-issued", "label": "3"}), 404, "unknown_request"
    )
    old_id = f"{1_000_000_000_000:012x}" + "0" * 20  # issued by a gateway in 2001: past any retention
    refused(second.client.post("/v1/feedback", json={"request_id": old_id, "label": "3"}), 410, "expired_request")
    bad_label = {"request_id": answered[1][0], "label": "seven"}
    refused(second.client.post("/v1/feedback", json=bad_label), 422, "invalid_label", "'seven' is not a class")
    refused(second.client.post("/v1/feedback", content=b"{oops", headers={"Content-Type": "application/json"}),
            400, "bad_request", "not valid JSON")  # fmt: skip
    refused(second.client.post("/v1/feedback", json={"label": "3"}), 400, "bad_request", "request_id")
    refused(second.client.post("/v1/feedback", json={"request_id": rid, "label": "3", "extra": 1}), 400, "bad_request")

    # A list: one result per item, each with the status it would have had alone.
    items = [{"request_id": r, "label": lab} for r, lab, _ in answered[1:]] + [{"request_id": rid, "label": label}]
    resp = first.client.post("/v1/feedback", json=items)
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    assert [r["status"] for r in results] == [200] * 39 + [409]

    after = [feedback_counts(g) for g in (first, second)]
    change = {k: sum(a[k] - b[k] for a, b in zip(after, before, strict=True)) for k in after[0]}
    assert change == {"accepted": 40, "unknown": 1, "expired": 1, "duplicate": 3, "invalid_label": 1}
    # Per-arm top-1 series over both replicas: every accepted image counted once, on the arm that answered.
    labelled = {
        arm: sum(top1_counts(g)[arm] for g in (first, second)) - sum(c[arm] for c in top1_before)
        for arm in ("student", "teacher")
    }
    assert labelled == {arm: sum(1 for *_, a in answered if a == arm) for arm in ("student", "teacher")}
    body = current(first)["this_replica"]
    assert body["arms"]["student"]["requests"] + body["arms"]["teacher"]["requests"] >= 40
    assert body["step"]["status"] in ("pass", "pending", "fail") and body["step"]["gates"]
