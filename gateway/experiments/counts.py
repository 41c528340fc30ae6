"""The counters every gate is judged on, read from Prometheus series and added up across replicas.

Counts are kept as a flat mapping `key -> value`, with keys such as `latency|student|0.005` (requests
of the arm at or under 5 ms), `agree|teacher|true` (shadowed requests whose top-1 agreed),
`top1|student|false` and `pair|student|teacher|true|false`. Such mappings add up (replicas), subtract
(a step's figures are now minus its baseline) and are plain JSON (the baseline lives in the experiment
file, so a restarted controller carries on). The same keys come from three sources: this process's
registry, the text of one or more replicas' /metrics, and Prometheus' query API (`sources`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

Counts = dict[str, float]
Sample = tuple[str, dict[str, str], float]

CLASSIFY_ROUTE = "/v1/classify"
# Series read -> the labels that make up the key (in order); their values must be known at this point.
SERIES = {
    "kdserve_request_duration_seconds_bucket": ("latency", ("arm", "le")),
    "kdserve_shadow_requests_total": ("agree", ("arm", "agreed")),
    "kdserve_feedback_top1_total": ("top1", ("arm", "correct")),
    "kdserve_feedback_pairs_total": ("pair", ("primary", "shadow", "primary_correct", "shadow_correct")),
}
# The latency histogram counts every route and model: the gates read answered A/B requests only.
LATENCY_FILTER = {"route": CLASSIFY_ROUTE, "status": "200"}


def counts_from_samples(samples: Iterable[Sample]) -> Counts:
    counts: Counts = {}
    for name, labels, value in samples:
        if name not in SERIES:
            continue
        if name.endswith("_bucket") and (
            not labels.get("arm") or any(labels.get(k) != v for k, v in LATENCY_FILTER.items())
        ):
            continue
        prefix, keys = SERIES[name]
        key = "|".join([prefix, *(_le(labels[k]) if k == "le" else labels[k] for k in keys)])
        counts[key] = counts.get(key, 0.0) + value
    return counts


def _le(text: str) -> str:
    return "inf" if math.isinf(float(text)) else repr(float(text))


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
