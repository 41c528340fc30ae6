"""The experiment's gates judged on a step's counts: pass, fail or pending, with the numbers behind each.

Every interval is a confidence sequence (kdcontract/sequential.py), so a verdict may be read after every
request: a gate fails as soon as its interval lies wholly on the wrong side of the threshold, and
passes once it lies wholly on the right side, the step has lasted `min_duration_s` and the gate has
`min_samples` samples. `alpha` is the error rate of the whole rollout: each gate at each judged step
spends `alpha / (gates x steps)` (a union bound: identical models are rolled back at most `alpha` of the
time, however often the controller looks), and a gate judging two things at once (a ratio of two arms'
quantiles, a difference of two top-1 rates) spends half of its share on each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from gateway.experiments.counts import Counts, agreement_counts, arm_counts, paired_counts
from gateway.experiments.spec import ExperimentSpec
from kdcontract.sequential import (
    Status,
    Verdict,
    at_least,
    at_most,
    difference_cs,
    paired_difference_cs,
    proportion_cs,
    quantile_cs,
)


@dataclass(frozen=True)
class StepVerdict:
    status: Status
    verdicts: list[Verdict]
    age_s: float

    @property
    def reason(self) -> str:
        failed = [v for v in self.verdicts if v.status == "fail"]
        if failed:
            return "; ".join(f"{v.gate}: {v.reason}" for v in failed)
        if self.status == "pass":
            return "every gate passed"
        return "; ".join(f"{v.gate}: {v.reason}" for v in self.verdicts if v.status == "pending") or "waiting"

    def as_dict(self) -> dict:
        return {
            "status": self.status,
            "age_s": round(self.age_s, 3),
            "reason": self.reason,
            "gates": [v.as_dict() for v in self.verdicts],
        }


def judge(experiment: ExperimentSpec, counts: Counts, age_s: float) -> StepVerdict:
    """The step's verdict: fail if any gate fails, pass if every gate passes (a step without gates
    passes on traffic and time alone), else pending."""
    rollout = experiment.rollout
    verdicts = [v for v in (gate(experiment, counts) for gate in _GATES) if v is not None]
    verdicts = [_held(v, rollout.min_samples, age_s >= rollout.min_duration_s) for v in verdicts]
    if not verdicts:
        traffic = arm_counts(counts, experiment.candidate).requests
        status: Status = "pending" if traffic < rollout.min_samples or age_s < rollout.min_duration_s else "pass"
        verdicts = [
            Verdict(
                "traffic",
                status,
                float(traffic),
                (traffic, traffic),
                rollout.min_samples,
                traffic,
                f"{traffic} candidate requests",
            )
        ]
    statuses = {v.status for v in verdicts}
    overall: Status = "fail" if "fail" in statuses else "pending" if "pending" in statuses else "pass"
    return StepVerdict(overall, verdicts, age_s)


def _held(verdict: Verdict, min_samples: int, long_enough: bool) -> Verdict:
    """A pass waits for the step's samples and duration; a fail never waits."""
    if verdict.status != "pass":
        return verdict
    if verdict.samples < min_samples:
        return replace(
            verdict, status="pending", reason=f"{verdict.reason}; {verdict.samples} of {min_samples} samples"
        )
    if not long_enough:
        return replace(
            verdict, status="pending", reason=f"{verdict.reason}; the step's minimum duration has not passed"
        )
    return verdict


def gate_alpha(experiment: ExperimentSpec) -> float:
    """One gate's share of the rollout's `alpha` at one step: split over the configured gates and the steps
    judged (every step below 100%; the step that reaches 100% is the promotion)."""
    gates = experiment.gates
    count = sum(g is not None for g in (gates.latency, gates.min_agreement, gates.max_top1_drop))
    steps = sum(1 for s in experiment.rollout.steps if s < 1.0) if experiment.rollout.enabled else 1
    return experiment.alpha / max(count, 1) / max(steps, 1)


def latency_gate(experiment: ExperimentSpec, counts: Counts) -> Verdict | None:
    gate = experiment.gates.latency
    if gate is None:
        return None
    q, alpha = gate.quantile, gate_alpha(experiment)
    name = f"latency_p{q * 100:g}"
    candidate = arm_counts(counts, experiment.candidate)
    if gate.max_ms is not None:
        low, high = quantile_cs(candidate.latency_edges, candidate.latency_counts, q, alpha)
        interval = (low * 1000, high * 1000)
        status = at_most(interval, gate.max_ms)
        return Verdict(
            name,
            status,
            _point(candidate, q) * 1000,
            interval,
            gate.max_ms,
            candidate.requests,
            f"{experiment.candidate} p{q * 100:g} in [{_ms(interval[0])}, {_ms(interval[1])}] ms, "
            f"gate <= {gate.max_ms:g} ms",
        )
    control = arm_counts(counts, experiment.control)
    c_low, c_high = quantile_cs(candidate.latency_edges, candidate.latency_counts, q, alpha / 2)
    t_low, t_high = quantile_cs(control.latency_edges, control.latency_counts, q, alpha / 2)
    interval = (c_low / t_high if t_high > 0 else 0.0, c_high / t_low if t_low > 0 else math.inf)
    control_point = _point(control, q)
    estimate = _point(candidate, q) / control_point if control_point > 0 else None
    return Verdict(
        name + "_ratio",
        at_most(interval, gate.max_ratio),
        estimate,
        interval,
        gate.max_ratio,
        min(candidate.requests, control.requests),
        f"{experiment.candidate}/{experiment.control} p{q * 100:g} ratio in "
        f"[{interval[0]:.3g}, {interval[1]:.3g}], gate <= {gate.max_ratio:g}",
    )


def agreement_gate(experiment: ExperimentSpec, counts: Counts) -> Verdict | None:
    threshold = experiment.gates.min_agreement
    if threshold is None:
        return None
    agreed, shadowed = agreement_counts(counts, (experiment.candidate, experiment.control))
    low, high = (float(x) for x in proportion_cs(agreed, shadowed, gate_alpha(experiment)))
    return Verdict(
        "agreement",
        at_least((low, high), threshold),
        agreed / shadowed if shadowed else None,
        (low, high),
        threshold,
        shadowed,
        f"top-1 agreement {_pct(low)}-{_pct(high)} over {shadowed} shadowed requests, gate >= {_pct(threshold)}",
    )


def top1_gate(experiment: ExperimentSpec, counts: Counts) -> Verdict | None:
    """candidate top-1 - control top-1 >= -max_top1_drop, on feedback labels. Two intervals at alpha / 2
    each, intersected: the arms' own labelled answers (independent samples) and, where the shadow
    answered too, the paired comparison (far narrower: only discordant images carry information)."""
    drop = experiment.gates.max_top1_drop
    if drop is None:
        return None
    candidate, control = arm_counts(counts, experiment.candidate), arm_counts(counts, experiment.control)
    wins, losses, pairs = paired_counts(counts, experiment.candidate, experiment.control)
    half = gate_alpha(experiment) / 2
    low, high = difference_cs(candidate.correct, candidate.labelled, control.correct, control.labelled, half)
    if pairs:
        p_low, p_high = paired_difference_cs(wins, losses, pairs, half)
        low, high = max(low, p_low), min(high, p_high)
    estimate = (
        (wins - losses) / pairs
        if pairs
        else (
            candidate.correct / candidate.labelled - control.correct / control.labelled
            if candidate.labelled and control.labelled
            else None
        )
    )
    samples = pairs + min(candidate.labelled, control.labelled)
    return Verdict(
        "top1_difference",
        at_least((low, high), -drop),
        estimate,
        (low, high),
        -drop,
        samples,
        f"top-1 {experiment.candidate} - {experiment.control} in [{_pts(low)}, {_pts(high)}] points "
        f"({candidate.labelled} + {control.labelled} labelled, {pairs} paired), gate >= "
        f"{_pts(-drop)}",
    )


_GATES = (latency_gate, agreement_gate, top1_gate)


def arm_statistics(experiment: ExperimentSpec, counts: Counts) -> dict:
    """Per arm: requests, p50/p99 latency and top-1 on feedback, each with its confidence sequence."""
    alpha = experiment.alpha
    out = {}
    for arm in experiment.weights:
        c = arm_counts(counts, arm)
        latency = {}
        for q in (0.5, 0.99):
            low, high = quantile_cs(c.latency_edges, c.latency_counts, q, alpha)
            latency[f"p{q * 100:g}"] = {
                "estimate": _point(c, q) * 1000 if c.requests else None,
                "interval": [low * 1000, None if math.isinf(high) else high * 1000],
            }
        low, high = (float(x) for x in proportion_cs(c.correct, c.labelled, alpha))
        out[arm] = {
            "requests": c.requests,
            "latency_ms": latency,
            "latency_histogram": {
                "le_ms": [e * 1000 if math.isfinite(e) else None for e in c.latency_edges],
                "counts": c.latency_counts,
            },
            "top1": {
                "labelled": c.labelled,
                "estimate": c.correct / c.labelled if c.labelled else None,
                "interval": [low, high],
            },
        }
    return out


def _point(arm, q: float) -> float:
    """The histogram's estimate of a quantile: the upper edge of the bucket holding it (0 if empty)."""
    n = arm.requests
    if n == 0:
        return 0.0
    rank, seen = math.ceil(q * n), 0
    for edge, count in zip(arm.latency_edges, arm.latency_counts, strict=True):
        seen += count
        if seen >= rank:
            return edge if math.isfinite(edge) else arm.latency_edges[-2]
    return arm.latency_edges[-1]


def _ms(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.3g}"


def _pct(value: float) -> str:
    return f"{value * 100:.1f}%"


def _pts(value: float) -> str:
    return f"{value * 100:+.2f}"
