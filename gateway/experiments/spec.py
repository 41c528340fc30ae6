"""The A/B experiment: arms and weights, shadow share, sticky key, gates and rollout steps.

Declared in a JSON file that every gateway replica follows (as the manifest is followed; a ConfigMap or
a shared volume in Kubernetes) and changed at run time with `PUT /v1/experiment`, which writes the file
(atomically) and applies it at once on the replica that took it; the others read it within
`experiment_poll_s`. Without a file, the experiment is the start-up settings' (`ab_weights`,
`shadow_fraction`, `ab_key_header`) with no gates.
"""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from gateway.errors import GatewayError
from gateway.experiments.state import RolloutState, StrictModel
from kdcontract.names import DEFAULT_AB_WEIGHTS, STUDENT, TEACHER

WEIGHT_TOLERANCE = 1e-6


class LatencyGate(StrictModel):
    quantile: float = Field(0.99, gt=0, lt=1, description="the latency quantile judged (0.99: p99)")
    max_ms: float | None = Field(None, gt=0, description="the candidate's quantile at most this many ms")
    max_ratio: float | None = Field(None, gt=0, description="the candidate's quantile at most this x the control's")

    @model_validator(mode="after")
    def _one_bound(self) -> LatencyGate:
        if (self.max_ms is None) == (self.max_ratio is None):
            raise ValueError("give exactly one of max_ms and max_ratio")
        return self


class Gates(StrictModel):
    latency: LatencyGate | None = None
    min_agreement: float | None = Field(
        None, ge=0, le=1, description="the candidate's top-1 agrees with the control's on at least this share of "
        "shadowed requests",
    )  # fmt: skip
    max_top1_drop: float | None = Field(
        None, ge=0, le=1, description="the candidate's top-1 on feedback labels at most this much below the control's"
    )
    label_keys: list[str] | None = Field(
        None,
        description="API key ids whose feedback labels the top-1 gate counts (None: every key's); others' labels "
        "still join the capture and kdserve_feedback_key_labels_total",
    )


class Rollout(StrictModel):
    enabled: bool = Field(
        False, description="the rollout controller steps the candidate's weight (off: a fixed split, judged only)"
    )
    steps: list[float] = Field(
        default_factory=lambda: [0.05, 0.25, 0.5, 1.0], description="the candidate's weight at each step"
    )
    min_samples: int = Field(200, ge=1, description="samples each gate needs in a step before it may pass")
    min_duration_s: float = Field(60.0, ge=0, description="time a step lasts at least")

    @field_validator("steps")
    @classmethod
    def _increasing(cls, steps: list[float]) -> list[float]:
        if not steps or any(not 0 < s <= 1 for s in steps) or steps != sorted(set(steps)):
            raise ValueError("steps must be increasing weights in (0, 1]")
        return steps


class ExperimentSpec(StrictModel):
    """What the user declares (Flagger's `analysis`): arms and weights, the shadow share, the sticky
    header, the gates, the rollout's steps and alpha. Everything that judges or routes reads this."""

    control: str = Field(TEACHER, description="the arm the candidate is judged against (and falls back to)")
    candidate: str = Field(STUDENT, description="the arm being rolled out")
    weights: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_AB_WEIGHTS), description="arm -> share of traffic; sums to 1"
    )
    shadow_fraction: float = Field(0.0, ge=0, le=1, description="share of requests mirrored to the other arm")
    sticky_header: str = Field(
        "X-Client-Key", min_length=1, description="the header whose value keeps a client on one arm"
    )
    gates: Gates = Field(default_factory=Gates)
    rollout: Rollout = Field(default_factory=Rollout)
    alpha: float = Field(
        0.05,
        gt=0,
        lt=0.5,
        description="error rate of the whole rollout: each gate at each judged step is tested at "
        "alpha / (gates x steps)",
    )

    @field_validator("weights")
    @classmethod
    def _distribution(cls, weights: dict[str, float]) -> dict[str, float]:
        if not weights or any(w < 0 for w in weights.values()):
            raise ValueError("weights must be non-negative shares of at least one arm")
        if abs(sum(weights.values()) - 1) > WEIGHT_TOLERANCE:
            raise ValueError(f"weights must sum to 1, got {sum(weights.values()):g}")
        return weights

    @model_validator(mode="after")
    def _arms(self) -> ExperimentSpec:
        if self.control == self.candidate and len(self.weights) > 1:
            raise ValueError("control and candidate must be different arms")
        missing = {self.control, self.candidate} - set(self.weights)
        if missing:
            raise ValueError(f"weights must give a share to control and candidate; missing {sorted(missing)}")
        if self.shadow_fraction > 0 and len(self.weights) < 2:
            raise ValueError("shadow_fraction > 0 needs two arms to mirror between")
        if self.rollout.enabled and len(self.weights) != 2:
            raise ValueError("a rollout moves traffic between two arms: give weights to control and candidate only")
        if self.rollout.enabled and self.gates.min_agreement is None and self.gates.max_top1_drop is None:
            raise ValueError(
                "a rollout needs a quality gate (gates.min_agreement or gates.max_top1_drop): latency and "
                "traffic alone say nothing of the candidate's answers"
            )
        return self

    def with_candidate_weight(self, weight: float) -> dict[str, float]:
        return {self.candidate: weight, self.control: round(1 - weight, 9)}


class Experiment(ExperimentSpec):
    """The experiment as its file and the API hold it: the spec, and beside it the rollout's state, which
    only the rollout controller writes (a Kubernetes object's spec and status, in one JSON object)."""

    state: RolloutState = Field(default_factory=RolloutState)


class ExperimentRefused(GatewayError):
    """A well-formed experiment this gateway cannot run (an arm it does not serve)."""

    status_code, kind = 422, "invalid_experiment"


def ordered_weights(experiment: ExperimentSpec) -> dict[str, float]:
    """The candidate's share first: a sticky key's uniform draw below the candidate's weight lands on
    it, so raising the weight moves clients from the control to the candidate and never back."""
    first = {experiment.candidate: experiment.weights[experiment.candidate]}
    return first | {arm: w for arm, w in experiment.weights.items() if arm != experiment.candidate}


def parse_experiment(body: bytes) -> Experiment:
    """An experiment from a request or file body; a ValidationError names the field."""
    return Experiment.model_validate_json(body)
