"""Gates judged on counts and the rollout controller's transitions, on synthetic counters (fast): the
counters come out of real Prometheus registries and /metrics texts, as they do from live replicas."""

from __future__ import annotations

import math

import numpy as np
from prometheus_client import generate_latest

from gateway.experiments.controller import RolloutController
from gateway.experiments.counts import agreement_counts, arm_counts, minus, paired_counts
from gateway.experiments.file import read_experiment, write_experiment
from gateway.experiments.gates import judge
from gateway.experiments.sources import RegistryCounts, registry_counts, scraped_counts
from gateway.experiments.spec import Experiment
from gateway.telemetry.metrics import GatewayMetrics

ROUTE = ("/v1/classify",)


def experiment(**changes) -> Experiment:
    # Synthetic arms are right or wrong independently (real ones mostly err on the same images, which
    # makes the paired interval far narrower), hence a 10-point top-1 gate here.
    body = {
        "control": "teacher",
        "candidate": "student",
        "weights": {"student": 0.0, "teacher": 1.0},
        "shadow_fraction": 1.0,
        "gates": {"latency": {"quantile": 0.5, "max_ratio": 1.5}, "min_agreement": 0.9, "max_top1_drop": 0.1},
        "rollout": {"enabled": True, "steps": [0.1, 0.5, 1.0], "min_samples": 200, "min_duration_s": 10},
    }
    return Experiment.model_validate(body | changes)


class Replica:
    """One gateway's metrics, fed as the routes feed them."""

    def __init__(self, seed: int = 0) -> None:
        self.metrics = GatewayMetrics()
        self.rng = np.random.default_rng(seed)

    def traffic(self, n: int, candidate_ms: float, control_ms: float, agree: float, cand_top1: float, ctrl_top1: float):
        m = self.metrics
        for _ in range(n):
            for arm, ms in (("student", candidate_ms), ("teacher", control_ms)):
                m.request_seconds.labels(*ROUTE, arm, arm, "200").observe(ms / 1000 * self.rng.uniform(0.8, 1.2))
            m.shadow.labels("teacher", str(self.rng.random() < agree).lower()).inc()
            s_right, t_right = self.rng.random() < cand_top1, self.rng.random() < ctrl_top1
            m.feedback_top1.labels("student", str(s_right).lower()).inc()
            m.feedback_pairs.labels("student", "teacher", str(s_right).lower(), str(t_right).lower()).inc()


def test_counts_from_a_registry_and_from_scraped_replicas_agree_and_add_up():
    a, b = Replica(1), Replica(2)
    a.traffic(50, 2, 4, 0.95, 0.97, 0.98)
    b.traffic(70, 2, 4, 0.95, 0.97, 0.98)
    summed = scraped_counts(
        [generate_latest(a.metrics.registry).decode(), generate_latest(b.metrics.registry).decode()]
    )
    local = registry_counts(a.metrics.registry)
    assert arm_counts(local, "student").requests == 50 and arm_counts(summed, "student").requests == 120
    assert arm_counts(summed, "student").labelled == 120
    assert agreement_counts(summed, ("student", "teacher"))[1] == 120
    assert paired_counts(summed, "student", "teacher")[2] == 120
    # Other routes and failed requests are not A/B latency.
    a.metrics.request_seconds.labels("/v1/models", "", "", "200").observe(0.5)
    a.metrics.request_seconds.labels(*ROUTE, "student", "student", "503").observe(0.5)
    assert arm_counts(registry_counts(a.metrics.registry), "student").requests == 50
    assert minus(summed, summed) == {key: 0.0 for key in summed}


def test_a_good_candidate_passes_only_with_its_samples_and_time_and_a_bad_one_fails_at_once():
    good, bad = Replica(3), Replica(4)
    good.traffic(400, 2, 4, 0.97, 0.98, 0.98)
    bad.traffic(400, 20, 4, 0.60, 0.70, 0.98)  # 20 ms: buckets apart from 4 ms
    verdict = judge(experiment(), registry_counts(good.metrics.registry), age_s=30)
    assert verdict.status == "pass", verdict.as_dict()
    assert {v.gate for v in verdict.verdicts} == {"latency_p50_ratio", "agreement", "top1_difference"}
    assert judge(experiment(), registry_counts(good.metrics.registry), age_s=2).status == "pending"  # too soon
    few = judge(experiment(rollout={"enabled": True, "min_samples": 1000}), registry_counts(good.metrics.registry), 30)
    assert few.status == "pending" and "of 1000 samples" in few.reason
    failed = judge(experiment(), registry_counts(bad.metrics.registry), age_s=0.5)  # fails without waiting
    assert failed.status == "fail"
    assert {v.gate for v in failed.verdicts if v.status == "fail"} == {
        "latency_p50_ratio",
        "agreement",
        "top1_difference",
    }
    top1 = next(v for v in failed.verdicts if v.gate == "top1_difference")
    assert top1.interval[1] < -0.1 and math.isclose(top1.threshold, -0.1)


def test_the_controller_steps_up_promotes_and_a_restarted_one_carries_on(tmp_path):
    path = tmp_path / "experiment.json"
    write_experiment(path, experiment())
    replica, clock = Replica(5), [1000.0]

    def controller() -> RolloutController:
        return RolloutController(path, RegistryCounts(replica.metrics.registry), clock=lambda: clock[0])

    assert controller().tick().outcome == "started"
    assert read_experiment(path).weights == {"student": 0.1, "teacher": 0.9}
    replica.traffic(100, 2, 4, 0.99, 0.99, 0.99)
    clock[0] += 30
    assert controller().tick().outcome == "waiting"  # 100 of 200 samples since the step began
    replica.traffic(300, 2, 4, 0.99, 0.99, 0.99)
    assert controller().tick().outcome == "advanced"  # a new controller: all it needs is in the file
    state = read_experiment(path).state
    assert state.step == 1 and read_experiment(path).weights["student"] == 0.5
    assert controller().tick().outcome == "waiting"  # the new step's counts start from its baseline
    replica.traffic(400, 2, 4, 0.99, 0.99, 0.99)
    clock[0] += 30
    tick = controller().tick()
    assert tick.outcome == "promoted" and read_experiment(path).weights == {"student": 1.0, "teacher": 0.0}
    assert [e.event for e in read_experiment(path).state.history] == ["started", "advanced", "promoted"]
    assert controller().tick().outcome == "idle"
    events = (tmp_path / "experiment.events.jsonl").read_text().splitlines()
    assert len(events) == 3 and '"promoted"' in events[-1]


def test_a_failing_gate_rolls_back_to_the_control_and_says_why(tmp_path):
    path = tmp_path / "experiment.json"
    write_experiment(path, experiment())
    replica, clock = Replica(6), [0.0]
    controller = RolloutController(path, RegistryCounts(replica.metrics.registry), clock=lambda: clock[0])
    controller.tick()
    replica.traffic(300, 2, 4, 0.5, 0.5, 0.98)
    clock[0] += 1
    assert controller.tick().outcome == "rolled_back"
    rolled = read_experiment(path)
    assert rolled.weights == {"student": 0.0, "teacher": 1.0} and rolled.state.phase == "rolled_back"
    assert "agreement" in rolled.state.reason and "top1_difference" in rolled.state.reason
    assert controller.metrics.transitions.labels("rolled_back")._value.get() == 1
    assert controller.tick().outcome == "idle"  # stays rolled back until someone starts a new experiment
