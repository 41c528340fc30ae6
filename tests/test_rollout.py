"""Rollouts on the real stack: Triton (polling its repository), two gateway replicas following one
experiment file and sharing one answer store, `python -m gateway rollout` reading both replicas'
/metrics, clients sending held-out digits to either replica and their labels as feedback to the
*other* one (as a load balancer would).

A healthy student is stepped to 100%; a student broken mid-rollout (a version 2 whose classes are
shifted by one, exported into the repository while serving) is rolled back to the teacher, with no
request lost and no 5xx.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from gateway.process import GatewayProcess, free_port
from gateway.triton.server import EmbeddedTriton, TritonPorts
from kdcontract.digits import digit_png_bytes, digits_gray, held_out_indices
from kdcontract.manifest import read_manifest
from loadtest.clients.measure import metric_value
from loadtest.stacks.monitoring import PrometheusServer, dashboard_queries, local_config
from loadtest.stacks.rollout import export_broken_student, scratch_repository

TOKEN = "rollout-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
POLL_S = 0.3
TICK_S = 0.5
GATES = {"latency": {"quantile": 0.5, "max_ratio": 3.0}, "min_agreement": 0.85, "max_top1_drop": 0.1}


@dataclass
class Stack:
    repo: Path
    experiment_file: Path
    replicas: list[GatewayProcess]
    triton: EmbeddedTriton
    controller_port: int = 0

    def metrics_urls(self) -> list[str]:
        return [f"{gw.url}/metrics" for gw in self.replicas]


@pytest.fixture
def stack(tiny_repo, tmp_path):
    repo = scratch_repository(tiny_repo, tmp_path / "repo")
    experiment_file = tmp_path / "experiment.json"
    experiment_file.write_text(json.dumps(rollout_experiment([0.5, 1.0], 60)))  # replaced by each test's PUT
    env = {
        "KDSERVE_EXPERIMENT_FILE": str(experiment_file),
        "KDSERVE_EXPERIMENT_POLL_S": str(POLL_S),
        "KDSERVE_ADMIN_TOKEN_SHA256": hashlib.sha256(TOKEN.encode()).hexdigest(),
        "KDSERVE_ANSWERS_DIR": str(tmp_path / "answers"),
        "KDSERVE_MANIFEST_POLL_S": "0.2",
    }
    ports = TritonPorts(free_port(), free_port(), free_port())
    poll = ["--model-control-mode=poll", "--repository-poll-secs=1"]
    with EmbeddedTriton(repo, ports, log_file=tmp_path / "triton.log", extra_args=poll) as triton:
        replicas = [GatewayProcess(repo, triton.http_url, env=env) for _ in range(2)]
        try:
            yield Stack(repo, experiment_file, replicas, triton)
        finally:
            for gw in replicas:
                gw.stop()


def rollout_experiment(steps: list[float], min_duration_s: float, min_samples: int = 150) -> dict:
    return {
        "control": "teacher",
        "candidate": "student",
        "weights": {"student": 0.0, "teacher": 1.0},
        "shadow_fraction": 1.0,
        "gates": GATES,
        "rollout": {"enabled": True, "steps": steps, "min_samples": min_samples, "min_duration_s": min_duration_s},
    }


@dataclass
class Traffic:
    """Client threads sending held-out digits to the replicas in turn, each request's label sent as
    feedback to the other replica in batches. Every request is accounted for."""

    stack: Stack
    threads: int = 3
    sent: int = 0
    answers: list[tuple[float, int, str | None, int | None]] = field(default_factory=list)  # (t, status, arm, ver)
    failures: list[str] = field(default_factory=list)
    feedback: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        manifest = read_manifest(self.stack.repo)
        _, labels = digits_gray()
        self.items = [(digit_png_bytes(int(i)), str(labels[i])) for i in held_out_indices(manifest.split)]
        self.workers = [threading.Thread(target=self._client, args=(k,), daemon=True) for k in range(self.threads)]

    def __enter__(self) -> Traffic:
        for worker in self.workers:
            worker.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for worker in self.workers:
            worker.join(timeout=60)

    def _client(self, k: int) -> None:
        urls = [gw.url for gw in self.stack.replicas]
        clients = [httpx.Client(base_url=url, timeout=30) for url in urls]
        pending: list[list[dict]] = [[], []]
        for n in itertools.count():
            if self._stop.is_set():
                break
            png, label = self.items[(n * self.threads + k) % len(self.items)]
            to = n % 2
            headers = {"Content-Type": "image/png", "X-Client-Key": f"client-{k}-{n}"}
            with self._lock:
                self.sent += 1
            try:
                resp = clients[to].post("/v1/classify?model=auto&top_k=1", content=png, headers=headers)
            except httpx.HTTPError as exc:
                self._record_failure(f"{type(exc).__name__}: {exc}")
                continue
            body = resp.json() if resp.status_code == 200 else {}
            with self._lock:
                self.answers.append((time.monotonic(), resp.status_code, body.get("arm"), body.get("version")))
            if resp.status_code != 200:
                self._record_failure(f"{resp.status_code} {resp.text[:200]}")
                continue
            pending[1 - to].append({"request_id": resp.headers["x-request-id"], "label": label})
            if len(pending[1 - to]) >= 20:
                self._send_feedback(clients[1 - to], pending[1 - to])
                pending[1 - to] = []
        for client in clients:
            client.close()

    def _send_feedback(self, client: httpx.Client, items: list[dict]) -> None:
        time.sleep(0.05)  # the answering replica's writer keeps answers off the request path
        resp = client.post("/v1/feedback", json=items)
        if resp.status_code != 200:
            self._record_failure(f"feedback {resp.status_code} {resp.text[:200]}")
            return
        with self._lock:
            for result in resp.json()["results"]:
                self.feedback[result["outcome"]] = self.feedback.get(result["outcome"], 0) + 1

    def _record_failure(self, what: str) -> None:
        with self._lock:
            self.failures.append(what)


def put_experiment(stack: Stack, body: dict) -> None:
    resp = stack.replicas[0].client.put("/v1/experiment", json=body, headers=ADMIN)
    assert resp.status_code == 200, resp.text
    wait_for(lambda: all(current(gw)["experiment"] == resp.json()["experiment"] for gw in stack.replicas), 10 * POLL_S)


def current(gateway: GatewayProcess) -> dict:
    resp = gateway.client.get("/v1/experiment")
    assert resp.status_code == 200, resp.text
    return resp.json()


def wait_for(condition, timeout_s: float, what: str = "") -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"not within {timeout_s} s: {what}"
        time.sleep(0.05)
    return time.monotonic() - start


def controller(stack: Stack, tmp_path: Path, prometheus: str | None = None, port: int = 0) -> subprocess.Popen:
    """The controller reading the replicas' /metrics, or Prometheus when given (as when deployed); its own
    /metrics on `port` when given."""
    args = [sys.executable, "-m", "gateway", "rollout", "--experiment-file", str(stack.experiment_file)]
    if prometheus:
        args += ["--prometheus", prometheus, "--prometheus-selector", 'job="kdserve-gateway"', "--port", str(port)]
    for url in [] if prometheus else stack.metrics_urls():
        args += ["--metrics-url", url]
    args += ["--interval", str(TICK_S), "--until-done", "--events", str(tmp_path / "events.jsonl")]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def phase(stack: Stack) -> str:
    return json.loads(stack.experiment_file.read_text())["state"]["phase"]


@pytest.mark.slow
def test_a_healthy_student_is_stepped_to_100_percent_under_load(stack, tmp_path):
    put_experiment(stack, rollout_experiment([0.1, 0.5, 1.0], min_duration_s=1))
    ctl = controller(stack, tmp_path)
    with Traffic(stack) as traffic:
        try:
            out, _ = ctl.communicate(timeout=300)
        finally:
            ctl.kill()
        assert ctl.returncode == 0, out
        promoted_at = time.monotonic()
        wait_for(lambda: all(current(gw)["experiment"]["weights"]["student"] == 1.0 for gw in stack.replicas), 3)
        time.sleep(10 * POLL_S)
    final = json.loads(stack.experiment_file.read_text())
    state = final["state"]
    assert state["phase"] == "promoted" and final["weights"] == {"student": 1.0, "teacher": 0.0}, out
    assert [e["event"] for e in state["history"]] == ["started", "advanced", "promoted"]
    assert [e["weight"] for e in state["history"]] == [0.1, 0.5, 1.0]
    for event in state["history"][1:]:  # every step recorded with the figures that passed it
        assert {g["gate"] for g in event["verdicts"]} == {"latency_p50_ratio", "agreement", "top1_difference"}
        assert all(g["status"] == "pass" and g["samples"] >= 150 for g in event["verdicts"]), event
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["started", "advanced", "promoted"]

    # The served top-1 difference's interval holds the offline one (the same held-out digits, in-process).
    metrics = {n: m.metrics["top1"] for n, m in read_manifest(stack.repo).models.items()}
    offline = metrics["student_kd"] - metrics["teacher"]
    low, high = next(g for g in events[-1]["verdicts"] if g["gate"] == "top1_difference")["interval"]
    assert low <= offline <= high, (low, offline, high)

    assert traffic.failures == [], traffic.failures[:5]
    assert len(traffic.answers) == traffic.sent and {s for _, s, _, _ in traffic.answers} == {200}
    assert traffic.feedback.get("accepted", 0) > 300 and set(traffic.feedback) == {"accepted"}, traffic.feedback
    after = [arm for t, _, arm, _ in traffic.answers if t > promoted_at + 3]
    assert after and set(after) == {"student"}


@pytest.fixture
def prometheus(stack, tmp_path):
    """Prometheus scraping both replicas (one job, two pods), Triton and the controller (on the port it
    will take) with the project's rules, alerts at once."""
    stack.controller_port = free_port()
    targets = {
        "kdserve-gateway": [gw.url.removeprefix("http://") for gw in stack.replicas],
        "triton": f"127.0.0.1:{stack.triton.ports.metrics}",
        "kdserve-rollout": f"127.0.0.1:{stack.controller_port}",
    }
    server = PrometheusServer(local_config(tmp_path / "prometheus", targets, alerts_at_once=True))
    serving = ("kdserve-gateway", "triton")
    try:
        server.wait_for(lambda: all(server.targets_up().get(job) for job in serving), 30, "replicas and Triton scraped")
        yield server
    finally:
        server.stop()


def test_a_student_broken_mid_rollout_is_rolled_back_to_the_teacher_with_nothing_lost(stack, prometheus, tmp_path):
    # Steps that would take a minute: the rollout is still at 25% when the student breaks. The controller
    # reads Prometheus, as in Kubernetes.
    put_experiment(stack, rollout_experiment([0.25, 0.5, 1.0], min_duration_s=60))
    began = time.time()
    ctl = controller(stack, tmp_path, prometheus.url, stack.controller_port)
    with Traffic(stack) as traffic:
        try:
            wait_for(lambda: phase(stack) == "running", 30, "the controller starts the rollout")
            time.sleep(2)  # healthy traffic first: the step's counts hold good answers too
            export_broken_student(stack.repo)
            broken_from = wait_for(
                lambda: any(arm == "student" and v == 2 for _, _, arm, v in list(traffic.answers)),
                60,
                "the broken version is served",
            )
            out, _ = ctl.communicate(timeout=120)
        finally:
            ctl.kill()
        rolled_at = time.monotonic()
        follow_s = wait_for(
            lambda: all(current(gw)["experiment"]["weights"]["student"] == 0.0 for gw in stack.replicas), 10 * POLL_S
        )
        time.sleep(10 * POLL_S)
    assert ctl.returncode == 0, out
    final = json.loads(stack.experiment_file.read_text())
    assert final["state"]["phase"] == "rolled_back" and final["weights"] == {"student": 0.0, "teacher": 1.0}
    failed = {g["gate"] for g in final["state"]["history"][-1]["verdicts"] if g["status"] == "fail"}
    assert "agreement" in failed and "agreement" in final["state"]["reason"], final["state"]
    # Every request answered, none with a 5xx, through the re-export and the rollback.
    assert traffic.failures == [], traffic.failures[:5]
    assert len(traffic.answers) == traffic.sent and {s for _, s, _, _ in traffic.answers} == {200}
    after = [arm for t, _, arm, _ in traffic.answers if t > rolled_at + follow_s + POLL_S]
    assert after and set(after) == {"teacher"}
    # The gateways export the phase the alert reads.
    for gw in stack.replicas:
        text = gw.client.get("/metrics").text
        assert metric_value(text, "kdserve_rollout_phase", {"phase": "rolled_back"}) == 1.0
        assert metric_value(text, "kdserve_ab_weight", {"arm": "student"}) == 0.0
    prometheus.wait_for(lambda: ("KdserveRolloutRolledBack", "") in prometheus.firing(), 30, "the rollback alert")
    # The dashboard's rollout panels, the controller's included, had data during the rollout (the controller
    # exited with it: its series are stale now).
    rollout_panels = [
        q for q in dashboard_queries() if q.controller_only or "rollout" in q.expr or "feedback" in q.expr
    ]
    assert len(rollout_panels) >= 5
    now = time.time()
    assert not [q.expr for q in rollout_panels if not prometheus.query_range(q.expr, began, now, 1)]
    print(f"broken version served after {broken_from:.2f} s; replicas followed the rollback in {follow_s:.2f} s")
