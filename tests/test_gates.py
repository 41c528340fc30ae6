"""Gates judged on counts and the rollout controller's transitions, on synthetic counters (fast): the
counters come out of real Prometheus registries and /metrics texts, as they do from live replicas."""

from __future__ import annotations

import math

import numpy as np
import pytest
from prometheus_client import generate_latest
from pydantic import ValidationError

from gateway.experiments.controller import RolloutController
from gateway.experiments.counts import agreement_counts, arm_counts, minus, paired_counts
from gateway.experiments.file import read_experiment, write_experiment
from gateway.experiments.gates import gate_alpha, judge
from gateway.experiments.sources import PrometheusCounts, RegistryCounts, registry_counts, scraped_counts
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


class Fleet:
    """Gateway replicas by name, read as the controller reads them: each replica's counts apart. A restart
    replaces a replica's metrics with fresh ones (its series back at 0, a new start time)."""

    def __init__(self, *names: str) -> None:
        self.replicas = {name: Replica(i) for i, name in enumerate(names)}

    def restart(self, name: str) -> None:
        self.replicas[name] = Replica(len(self.replicas))
        self.replicas[name].metrics.started_at.set(self.replicas[name].metrics.started_at._value.get() + 1)

    def read_by_instance(self):
        return {name: registry_counts(r.metrics.registry) for name, r in self.replicas.items()}


def _top1(counts, arm="student"):
    return int(counts.get(f"top1|{arm}|true", 0)), int(counts.get(f"top1|{arm}|false", 0))


def test_replicas_restarted_mid_step_are_counted_exactly_and_a_reset_is_never_a_pass(tmp_path):
    """Issue 36: a step's counts were `sum by` now minus a baseline, clamped per key. Baseline 100 right /
    900 wrong; the replicas restart (series back to 0); the next 1,000 labels are 600 right / 400 wrong:
    that was counted 500 / 0, "100% over 500 samples", and a regression passed."""
    path = tmp_path / "experiment.json"
    gates = {"max_top1_drop": 0.05}
    write_experiment(path, experiment(gates=gates, rollout={"enabled": True, "steps": [0.5, 1.0], "min_samples": 100}))
    fleet, clock = Fleet("a", "b"), [0.0]
    for replica in fleet.replicas.values():  # before the step: 100 right, 900 wrong over the fleet
        replica.metrics.feedback_top1.labels("student", "true").inc(50)
        replica.metrics.feedback_top1.labels("student", "false").inc(450)
        replica.metrics.feedback_top1.labels("teacher", "true").inc(450)
        replica.metrics.feedback_top1.labels("teacher", "false").inc(50)
    controller = RolloutController(path, fleet, clock=lambda: clock[0])
    assert controller.tick().outcome == "started"
    fleet.replicas["a"].metrics.feedback_top1.labels("student", "true").inc(30)  # counted before a restart
    assert controller.tick().outcome == "waiting"
    fleet.restart("a")
    fleet.restart("b")
    for name, (right, wrong) in {"a": (270, 200), "b": (300, 200)}.items():
        fleet.replicas[name].metrics.feedback_top1.labels("student", "true").inc(right)
        fleet.replicas[name].metrics.feedback_top1.labels("student", "false").inc(wrong)
        fleet.replicas[name].metrics.feedback_top1.labels("teacher", "true").inc(475)
        fleet.replicas[name].metrics.feedback_top1.labels("teacher", "false").inc(25)
    clock[0] += 60
    tick = controller.tick()
    counted = controller.step_counts()
    assert _top1(counted) == (600, 400), counted  # exactly what the step saw: 30 + 270 + 300 right, 400 wrong
    assert _top1(counted, "teacher") == (950, 50)
    # 60% against the teacher's 95%: rolled back (clamped at the baseline, it read 100% over 500 samples).
    assert tick.outcome == "rolled_back", tick.verdict.as_dict()
    assert "top1_difference" in read_experiment(path).state.reason


def test_a_restarted_controller_carries_on_from_the_counts_it_wrote_down(tmp_path):
    path = tmp_path / "experiment.json"
    write_experiment(path, experiment(gates={"max_top1_drop": 0.05}, rollout={"enabled": True, "min_samples": 10_000}))
    fleet, clock = Fleet("a", "b"), [0.0]
    assert RolloutController(path, fleet, clock=lambda: clock[0]).tick().outcome == "started"
    fleet.replicas["a"].metrics.feedback_top1.labels("student", "true").inc(40)
    assert RolloutController(path, fleet, clock=lambda: clock[0]).tick().outcome == "waiting"
    fleet.restart("a")
    fleet.replicas["a"].metrics.feedback_top1.labels("student", "true").inc(7)
    fleet.replicas["b"].metrics.feedback_top1.labels("student", "true").inc(10)
    again = RolloutController(path, fleet, clock=lambda: clock[0])
    assert again.tick().outcome == "waiting"
    assert _top1(again.step_counts()) == (57, 0)


def test_every_front_door_moves_the_latency_gate():
    """Issue 36: the latency gate read `route="/v1/classify"` only; v2 REST and gRPC inference were invisible."""
    replica = Replica(9)
    for route in ("/v1/classify", "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
        replica.metrics.request_seconds.labels(route, "student_kd", "student", "200").observe(0.004)
    replica.metrics.request_seconds.labels("grpc:ModelInfer", "student_kd", "student", "200").observe(0.004)
    replica.metrics.request_seconds.labels("/v2/models/{name}/ready", "student_kd", "student", "200").observe(0.1)
    assert arm_counts(registry_counts(replica.metrics.registry), "student").requests == 4


def test_prometheus_counts_need_a_selector_naming_the_gateways_to_judge():
    """Issue 36: the queries carried no job or namespace selector: a staging gateway scraped by the same
    Prometheus counted in production's gates."""
    with pytest.raises(ValueError, match="selector"):
        PrometheusCounts("http://prometheus:9090", selector="")
    source = PrometheusCounts("http://prometheus:9090", selector='job="kdserve-gateway",namespace="prod"')
    queries = source.queries()
    assert all('job="kdserve-gateway",namespace="prod"' in q for q in queries) and len(queries) >= 4


def test_a_rollout_needs_a_quality_gate():
    """Issue 36: `rollout.enabled` with no gate promoted on traffic alone (latency says nothing of answers)."""
    with pytest.raises(ValidationError, match="quality gate"):
        experiment(gates={"latency": {"quantile": 0.99, "max_ms": 50}})
    with pytest.raises(ValidationError, match="quality gate"):
        experiment(gates={})
    assert experiment(gates={"min_agreement": 0.9}).rollout.enabled  # one quality gate is enough
    assert not experiment(gates={}, rollout={"enabled": False}).rollout.enabled  # judged only: no gate needed


def test_alpha_is_split_across_the_gates_and_the_judged_steps():
    spec = experiment()  # three gates, steps 0.1 and 0.5 judged (1.0 is the promotion)
    assert math.isclose(gate_alpha(spec), spec.alpha / 6)
    assert math.isclose(gate_alpha(experiment(gates={"min_agreement": 0.9})), spec.alpha / 2)
    four_steps = experiment(rollout={"enabled": True, "steps": [0.05, 0.25, 0.5, 0.75]})  # 0.75 judged too
    assert math.isclose(gate_alpha(four_steps), spec.alpha / 12)


def _aa_rollout(rng: np.random.Generator, spec: Experiment, looks_per_step: int = 8, per_look: int = 60) -> str:
    """One rollout of two identical models, the controller looking `looks_per_step` times per step: every
    gate sees draws from the same distributions for both arms. The outcome: promoted or rolled_back."""
    edges = [0.002 * 1.25**i for i in range(24)]
    for _step in range(sum(1 for s in spec.rollout.steps if s < 1.0)):
        counts: dict[str, float] = {}
        for _look in range(looks_per_step):
            for arm in ("student", "teacher"):
                latency = rng.lognormal(np.log(0.004), 0.3, per_look)
                cumulative = np.searchsorted(np.sort(latency), edges, side="right")
                for edge, below in zip(edges, cumulative, strict=True):
                    key = f"latency|{arm}|{edge!r}"
                    counts[key] = counts.get(key, 0.0) + float(below)
                key = f"latency|{arm}|inf"
                counts[key] = counts.get(key, 0.0) + per_look
                right = int(rng.binomial(per_look, 0.97))
                counts[f"top1|{arm}|true"] = counts.get(f"top1|{arm}|true", 0.0) + right
                counts[f"top1|{arm}|false"] = counts.get(f"top1|{arm}|false", 0.0) + per_look - right
            both = rng.random((per_look, 2)) < 0.97  # the shadow's pairs: each answer right with 97%
            for s_right, t_right in both:
                key = f"pair|student|teacher|{str(s_right).lower()}|{str(t_right).lower()}"
                counts[key] = counts.get(key, 0.0) + 1
            agreed = int(rng.binomial(per_look, 0.96))
            counts["agree|teacher|true"] = counts.get("agree|teacher|true", 0.0) + agreed
            counts["agree|teacher|false"] = counts.get("agree|teacher|false", 0.0) + per_look - agreed
            if judge(spec, counts, age_s=3600).status == "fail":
                return "rolled_back"
    return "promoted"


def test_two_hundred_aa_rollouts_of_identical_models_roll_back_at_most_five_percent():
    """Issue 36: alpha was spent per gate and per step (3 gates x 3 steps at 0.05 each). Identical
    models, every gate, every step, eight looks per step: the whole rollout's false roll-backs <= alpha.
    Each threshold sits at the truth (ratio 1, the true agreement, no drop), where a gate errs most."""
    spec = experiment(
        gates={"latency": {"quantile": 0.9, "max_ratio": 1.0}, "min_agreement": 0.96, "max_top1_drop": 0.0},
        rollout={"enabled": True, "steps": [0.05, 0.25, 0.5, 1.0], "min_samples": 10**9, "min_duration_s": 0},
    )
    rng = np.random.default_rng(36)
    outcomes = [_aa_rollout(rng, spec) for _ in range(200)]
    rolled_back = outcomes.count("rolled_back")
    assert rolled_back <= 10, f"{rolled_back} of 200 A/A rollouts rolled back"


def test_an_unreadable_ledger_restarts_the_steps_counting_instead_of_stopping_the_controller(tmp_path):
    path = tmp_path / "experiment.json"
    write_experiment(path, experiment(gates={"max_top1_drop": 0.05}, rollout={"enabled": True, "min_samples": 10_000}))
    fleet, clock = Fleet("a"), [0.0]
    controller = RolloutController(path, fleet, clock=lambda: clock[0])
    assert controller.tick().outcome == "started"
    controller.ledger_file.write_text('{"step_started_at": 0.0, "seen"')  # cut short
    fleet.replicas["a"].metrics.feedback_top1.labels("student", "true").inc(5)
    assert controller.tick().outcome == "waiting"  # counted from now: fewer samples, never invented ones
    fleet.replicas["a"].metrics.feedback_top1.labels("student", "true").inc(3)
    controller.tick()
    assert _top1(controller.step_counts()) == (3, 0)
