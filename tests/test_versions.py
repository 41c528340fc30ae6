"""A candidate version is served beside the current one and earns nothing by being exported (issue 36).

Its own Triton (polling its repository) and gateway on a copy of the tiny run's student and teacher. The
candidate is the run's plain student exported as version 2 of `student_kd` by the export code's own
functions (`write_served_model`, `on_trial`), so its answers differ from version 1's where the two students
disagree, and every answer names the version that produced it.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
from prometheus_client import generate_latest

from gateway.experiments.controller import RolloutController
from gateway.experiments.file import read_experiment, write_experiment
from gateway.experiments.sources import RegistryCounts
from gateway.experiments.spec import Experiment
from gateway.process import GatewayProcess, free_port
from gateway.telemetry.metrics import GatewayMetrics
from gateway.triton.server import EmbeddedTriton, TritonPorts
from kdcontract.digits import digit_png_bytes
from kdcontract.manifest import read_manifest, write_manifest
from kdcontract.versions import load_only, loaded_by_config, on_trial, promote, reject
from loadtest.clients.measure import metric_value
from training.check_repo import check_repository
from training.checkpoint import load_model
from training.export import write_served_model
from training.triton_repo import ServingOptions, parse_config

PNGS = [digit_png_bytes(i) for i in range(1700, 1716)]
PNG_HEADERS = {"Content-Type": "image/png"}
POLL = ["--model-control-mode=poll", "--repository-poll-secs=1"]


@pytest.fixture
def repo(tiny_run, tiny_repo, tmp_path):
    repo = tmp_path / "repo"
    for name in ("student_kd", "teacher"):
        shutil.copytree(tiny_repo / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    manifest = read_manifest(tiny_repo)
    manifest.models = {n: manifest.models[n] for n in ("student_kd", "teacher")}
    manifest.cascade = None
    write_manifest(repo, manifest)
    return repo


def add_candidate(repo, tiny_run, tiny_repo) -> int:
    """The plain student as a candidate version of `student_kd`, written as `training redistill` writes one."""
    _, spec, _ = load_model(tiny_run / "student_plain" / "model.pt")
    manifest = read_manifest(repo)
    current = manifest.models["student_kd"]
    plain = read_manifest(tiny_repo).models["student_plain"]
    onnx = tiny_repo / "student_plain" / str(plain.version) / "model.onnx"
    new = write_served_model(
        repo, "student_kd", "student", spec, onnx, "cpu", ServingOptions(), "plain", also_loaded=(current.version,)
    )
    manifest.models["student_kd"] = on_trial(current, new, {"passed": True})
    write_manifest(repo, manifest)
    return new.version


def answers(gateway: GatewayProcess, model: str) -> tuple[list[float], set]:
    """Each image's top probability (another model's weights or calibration shows in them) and the versions."""
    tops, versions = [], set()
    for png in PNGS:
        resp = gateway.client.post(f"/v1/classify?model={model}", content=png, headers=PNG_HEADERS)
        assert resp.status_code == 200, resp.text
        tops.append(resp.json()["predictions"][0]["top_k"][0]["probability"])
        versions.add(resp.json()["version"])
    return tops, versions


@contextmanager
def watching(gateway: GatewayProcess) -> Iterator[list[tuple[str, int]]]:
    """Classify with `student_kd` and probe `/readyz` every 50 ms meanwhile: (what, status) of each."""
    seen: list[tuple[str, int]] = []
    stop = threading.Event()

    def watch() -> None:
        with httpx.Client(base_url=gateway.url, timeout=10) as client:
            while not stop.is_set():
                post = client.post("/v1/classify?model=student_kd", content=PNGS[0], headers=PNG_HEADERS)
                seen.append(("classify", post.status_code))
                seen.append(("readyz", client.get("/readyz").status_code))
                stop.wait(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join()


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_a_candidate_is_served_beside_the_current_version_until_promoted_or_rejected(
    repo, tiny_run, tiny_repo, tmp_path
):
    ports = TritonPorts(free_port(), free_port(), free_port())
    with EmbeddedTriton(repo, ports, log_file=tmp_path / "triton.log", extra_args=POLL) as triton:
        gateway = GatewayProcess(repo, triton.http_url, env={"KDSERVE_MANIFEST_POLL_S": "0.2"})
        try:
            current_tops, versions = answers(gateway, "student_kd")
            assert versions == {1}
            with watching(gateway) as seen:  # Triton reloads the model to load version 2 beside version 1
                candidate = add_candidate(repo, tiny_run, tiny_repo)
                wait_for(lambda: triton_ready(triton, "student_kd", 2))
                time.sleep(1.5)
            assert candidate == 2
            assert {status for _, status in seen} == {200} and len(seen) > 20
            config = parse_config((repo / "student_kd" / "config.pbtxt").read_text())
            assert loaded_by_config(config) == [1, 2]
            assert check_repository(repo) == []

            # Exported: the name keeps answering with version 1; the candidate answers as student_kd@2 only.
            wait_for(lambda: gateway.client.post("/v1/classify?model=student_kd@2", content=PNGS[0],
                                                 headers=PNG_HEADERS).status_code == 200)  # fmt: skip
            tops, versions = answers(gateway, "student_kd")
            assert versions == {1} and tops == pytest.approx(current_tops)
            candidate_tops, versions = answers(gateway, "student_kd@2")
            assert versions == {2} and not np.allclose(candidate_tops, current_tops)
            ready = gateway.client.get("/readyz").json()
            assert ready["versions"]["student_kd"] == 1 and ready["versions"]["student_kd@2"] == 2
            listed = {m["name"]: m for m in gateway.client.get("/v1/models").json()["models"]}
            assert listed["student_kd"]["version"] == 1
            assert listed["student_kd"]["candidate"]["version"] == 2 and listed["student_kd"]["candidate"]["ready"]
            assert gateway.client.get("/v2/models/student_kd@2").json()["versions"] == ["2"]

            # Rejected: the manifest drops it, Triton unloads it, the name answers as before throughout.
            with watching(gateway) as seen:
                assert reject(repo, "student_kd", 2) == ["student_kd version 2"]
                wait_for(lambda: not triton_ready(triton, "student_kd", 2))
                time.sleep(1.5)
            assert {status for _, status in seen} == {200} and len(seen) > 20
            assert loaded_by_config(parse_config((repo / "student_kd" / "config.pbtxt").read_text())) == [1]
            assert check_repository(repo) == []
            tops, versions = answers(gateway, "student_kd")
            assert versions == {1} and tops == pytest.approx(current_tops)
            gone = gateway.client.post("/v1/classify?model=student_kd@2", content=PNGS[0],
                                       headers=PNG_HEADERS)  # fmt: skip
            assert gone.status_code == 404 and "student_kd@2" in gone.json()["error"]["message"]
            ready = gateway.client.get("/readyz")
            assert ready.status_code == 200, ready.text

            # A new candidate (version 3), promoted: the name answers with it, calibrated as it.
            assert add_candidate(repo, tiny_run, tiny_repo) == 3
            wait_for(lambda: "student_kd@3" in gateway.client.get("/readyz").json().get("versions", {}))
            assert promote(repo, "student_kd", 3) == ["student_kd version 1 -> 3"]
            wait_for(lambda: answers(gateway, "student_kd")[1] == {3})
            assert answers(gateway, "student_kd")[0] == pytest.approx(candidate_tops)
            assert read_manifest(repo).models["student_kd"].candidate is None
            assert check_repository(repo) == []
        finally:
            gateway.stop()


def triton_ready(triton: EmbeddedTriton, model: str, version: int) -> bool:
    return httpx.get(f"http://{triton.http_url}/v2/models/{model}/versions/{version}/ready").status_code == 200


def test_a_candidate_cannot_be_ended_unless_it_is_on_trial_and_load_only_names_exact_versions(repo):
    from kdcontract.errors import UserError

    with pytest.raises(UserError, match="student_kd has no candidate"):
        promote(repo, "student_kd", 2)
    with pytest.raises(UserError, match="not on trial"):
        reject(repo, "teacher", 1)
    config = parse_config((repo / "student_kd" / "config.pbtxt").read_text())
    load_only(config, [3, 1, 3])
    assert loaded_by_config(config) == [1, 3]


def feed(metrics: GatewayMetrics, candidate: str, control: str, n: int, candidate_right: float, seed: int) -> None:
    """`n` requests to each arm, every one shadowed and labelled, as the routes count them."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        for arm in (candidate, control):
            metrics.request_seconds.labels("/v1/classify", arm, arm, "200").observe(0.002)
        right, control_right = bool(rng.random() < candidate_right), bool(rng.random() < 0.95)
        metrics.shadow.labels(control, str(right == control_right).lower()).inc()
        metrics.feedback_top1.labels(candidate, str(right).lower()).inc()
        metrics.feedback_pairs.labels(candidate, control, str(right).lower(), str(control_right).lower()).inc()


@pytest.mark.parametrize(
    ("candidate_right", "outcome"),
    [(0.97, "promoted"), (0.40, "rolled_back"), (0.95, "waiting")],  # 0.95: no better than the current version
)
def test_the_rollout_controller_promotes_or_rejects_the_candidate_version_its_gates_judged(
    repo, tiny_run, tiny_repo, tmp_path, candidate_right, outcome
):
    version = add_candidate(repo, tiny_run, tiny_repo)
    candidate = f"student_kd@{version}"
    path = tmp_path / "experiment.json"
    spec = {
        "control": "student_kd",
        "candidate": candidate,
        "weights": {candidate: 0.0, "student_kd": 1.0},
        "shadow_fraction": 1.0,
        # "at most 0 points worse" for the candidate no better than the current version (as make loop asks)
        "gates": {"max_top1_drop": 0.0 if outcome == "waiting" else 0.05},
        "rollout": {"enabled": True, "steps": [0.5, 1.0], "min_samples": 200, "min_duration_s": 0},
    }
    write_experiment(path, Experiment.model_validate(spec))
    metrics, clock = GatewayMetrics(), [0.0]
    controller = RolloutController(path, RegistryCounts(metrics.registry), clock=lambda: clock[0], repo=repo)
    assert controller.tick().outcome == "started"
    for seed in range(1, 10):
        feed(metrics, candidate, "student_kd", 300, candidate_right, seed)
        clock[0] += 10
        tick = controller.tick()
        if tick.outcome in ("promoted", "rolled_back"):
            break
    assert tick.outcome == outcome
    student = read_manifest(repo).models["student_kd"]
    if outcome == "waiting":  # 2,700 labelled pairs and not shown better: never promoted, still on trial
        assert student.version == 1 and student.candidate.version == version
        assert read_experiment(path).weights[candidate] == 0.5 and tick.verdict.status == "pending"
        return
    assert student.candidate is None  # the trial is over either way
    assert student.version == (version if outcome == "promoted" else 1)
    loaded = loaded_by_config(parse_config((repo / "student_kd" / "config.pbtxt").read_text()))
    assert loaded == ([1, version] if outcome == "promoted" else [1])  # promoted: the old one stays warm
    assert check_repository(repo) == []
    action = "promote" if outcome == "promoted" else "reject"
    text = generate_latest(controller.metrics.registry).decode()
    assert metric_value(text, "kdserve_rollout_version_changes_total", {"action": action, "outcome": "done"}) == 1
