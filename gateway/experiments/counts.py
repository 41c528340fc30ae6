"""The counters every gate is judged on, read from Prometheus series and added up across replicas.

Counts are kept as a flat mapping `key -> value`, with keys such as `latency|student|0.005` (requests
of the arm at or under 5 ms, through any front door), `agree|teacher|true` (shadowed requests whose top-1
agreed), `top1|student|false` and `pair|student|teacher|true|false`. Such mappings add up (replicas) and
are plain JSON. The same keys come from three sources (`sources`): this process's registry, the text of
the replicas' /metrics, and Prometheus' query API, each read per replica, so that a step's counts are
the increases of every replica's own series (`StepLedger`): a replica that restarts counts from 0 again,
and only what it counted since is added, never the fall of its series.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

Counts = dict[str, float]
Sample = tuple[str, dict[str, str], float]

# Every front door of inference, as the request metrics' `route` label names it: the latency gate judges
# them all (it read /v1/classify only before, and v2 REST and gRPC traffic was invisible to it).
INFERENCE_ROUTES = (
    "/v1/classify",
    "/v2/models/{name}/infer",
    "/v2/models/{name}/versions/{version}/infer",
    "grpc:ModelInfer",
)
START = "start"  # a replica's start time, read beside its counts: a new value means it restarted
# Series read -> the labels that make up the key (in order); their values must be known at this point.
SERIES = {
    "kdserve_request_duration_seconds_bucket": ("latency", ("arm", "le")),
    "kdserve_shadow_requests_total": ("agree", ("arm", "agreed")),
    "kdserve_feedback_top1_total": ("top1", ("arm", "correct")),
    "kdserve_feedback_pairs_total": ("pair", ("primary", "shadow", "primary_correct", "shadow_correct")),
    "kdserve_started_at_seconds": (START, ()),
}
LATENCY_STATUS = "200"  # the latency histogram counts every route and status: the gates read answered ones


def _latency_sample_counts(labels: dict[str, str]) -> bool:
    return (
        bool(labels.get("arm")) and labels.get("route") in INFERENCE_ROUTES and labels.get("status") == LATENCY_STATUS
    )


def counts_from_samples(samples: Iterable[Sample]) -> Counts:
    counts: Counts = {}
    for name, labels, value in samples:
        if name not in SERIES:
            continue
        if name.endswith("_bucket") and not _latency_sample_counts(labels):
            continue
        prefix, keys = SERIES[name]
        key = "|".join([prefix, *(_le(labels[k]) if k == "le" else labels[k] for k in keys)])
        counts[key] = max(counts.get(key, 0.0), value) if key == START else counts.get(key, 0.0) + value
    return counts


def _le(text: str) -> str:
    return "inf" if math.isinf(float(text)) else repr(float(text))


def total(by_instance: dict[str, Counts]) -> Counts:
    """The counts of every replica added up (start times are per replica and are left out)."""
    summed: Counts = {}
    for counts in by_instance.values():
        for key, value in counts.items():
            if key != START:
                summed[key] = summed.get(key, 0.0) + value
    return summed


@dataclass(frozen=True)
class StepLedger:
    """What a rollout step has counted so far: every replica's series as last read (`seen`), and the sum of
    their increases since the step began (`counted`). Advanced at every read, so a replica that restarted
    between two reads (a new start time, or a series lower than before) adds what it counted since it
    started, and nothing is subtracted across a reset. Plain JSON, kept by the controller beside the
    experiment file, so a restarted controller carries on."""

    step_started_at: float
    seen: dict[str, Counts]
    counted: Counts

    @classmethod
    def begin(cls, step_started_at: float, by_instance: dict[str, Counts]) -> StepLedger:
        return cls(step_started_at, dict(by_instance), {})

    def advance(self, by_instance: dict[str, Counts]) -> StepLedger:
        counted, seen = dict(self.counted), dict(self.seen)
        for instance, now in by_instance.items():
            before = self.seen.get(instance)
            if before is None:
                # A replica first read during the step: counted from its start when it started during the
                # step (a new pod), else from now (it was there before, unread: its counts are not all ours).
                before = {} if now.get(START, 0.0) > self.step_started_at else now
            elif now.get(START) != before.get(START) or any(now.get(k, 0.0) < v for k, v in before.items()):
                before = {}  # restarted since the last read: all it counts now came after
            for key, value in now.items():
                if key != START:
                    counted[key] = counted.get(key, 0.0) + value - before.get(key, 0.0)
            seen[instance] = now
        return StepLedger(self.step_started_at, seen, counted)


def minus(now: Counts, baseline: Counts) -> Counts:
    """Counts since the baseline. A replica that restarted counts from 0 again: its series can fall
    below the baseline, and is then clamped at 0 (the step counts less, never invented samples)."""
    return {key: max(0.0, value - baseline.get(key, 0.0)) for key, value in now.items()}


@dataclass(frozen=True)
class ArmCounts:
    """What the gates need of one arm, from a counts mapping."""

    latency_edges: list[float]  # buckets' upper edges, increasing, the last inf
    latency_counts: list[int]  # per bucket (not cumulative)
    correct: int
    labelled: int

    @property
    def requests(self) -> int:
        return sum(self.latency_counts)


def arm_counts(counts: Counts, arm: str) -> ArmCounts:
    cumulative = sorted(
        (float(key.rsplit("|", 1)[1]), value) for key, value in counts.items() if key.startswith(f"latency|{arm}|")
    )
    edges = [edge for edge, _ in cumulative]
    per_bucket, previous = [], 0.0
    for _, value in cumulative:
        per_bucket.append(round(max(value - previous, 0.0)))
        previous = max(previous, value)
    correct = int(counts.get(f"top1|{arm}|true", 0))
    return ArmCounts(edges, per_bucket, correct, correct + int(counts.get(f"top1|{arm}|false", 0)))


def agreement_counts(counts: Counts, arms: tuple[str, str]) -> tuple[int, int]:
    """(agreed, shadowed) over requests one arm answered and the other shadowed, either way round."""
    agreed = sum(int(counts.get(f"agree|{arm}|true", 0)) for arm in arms)
    return agreed, agreed + sum(int(counts.get(f"agree|{arm}|false", 0)) for arm in arms)


def paired_counts(counts: Counts, candidate: str, control: str) -> tuple[int, int, int]:
    """(wins, losses, pairs): images both answered where only the candidate was right, only the control
    was right, and in all (whichever of the two was the primary and which the shadow)."""
    wins = losses = pairs = 0
    for key, value in counts.items():
        if not key.startswith("pair|"):
            continue
        _, primary, shadow, primary_right, shadow_right = key.split("|")
        if {primary, shadow} != {candidate, control}:
            continue
        n = int(value)
        candidate_right, control_right = (
            (primary_right, shadow_right) if primary == candidate else (shadow_right, primary_right)
        )
        pairs += n
        wins += n if (candidate_right, control_right) == ("true", "false") else 0
        losses += n if (candidate_right, control_right) == ("false", "true") else 0
    return wins, losses, pairs
