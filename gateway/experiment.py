"""The A/B experiment: arms and weights, shadow share, sticky key, gates and rollout steps.

Declared in a JSON file that every gateway replica follows (as the manifest is followed; a ConfigMap or
a shared volume in Kubernetes) and changed at run time with `PUT /v1/experiment`, which writes the file
(atomically) and applies it at once on the replica that took it; the others read it within
`experiment_poll_s`. Without a file, the experiment is the start-up settings' (`ab_weights`,
`shadow_fraction`, `ab_key_header`) with no gates.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Literal

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.ab import ABRouter
from gateway.errors import GatewayError
from gateway.files import file_stamp, write_whole
from gateway.settings import GatewaySettings
from kdcontract.manifest import Manifest
from kdcontract.names import AUTO, DEFAULT_AB_WEIGHTS, STUDENT, TEACHER, callable_names

log = logging.getLogger("kdserve.gateway")

WEIGHT_TOLERANCE = 1e-6


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LatencyGate(_Strict):
    quantile: float = Field(0.99, gt=0, lt=1, description="the latency quantile judged (0.99: p99)")
    max_ms: float | None = Field(None, gt=0, description="the candidate's quantile at most this many ms")
    max_ratio: float | None = Field(None, gt=0, description="the candidate's quantile at most this x the control's")

    @model_validator(mode="after")
    def _one_bound(self) -> LatencyGate:
        if (self.max_ms is None) == (self.max_ratio is None):
            raise ValueError("give exactly one of max_ms and max_ratio")
        return self


class Gates(_Strict):
    latency: LatencyGate | None = None
    min_agreement: float | None = Field(
        None, ge=0, le=1, description="the candidate's top-1 agrees with the control's on at least this share of "
        "shadowed requests",
    )  # fmt: skip
    max_top1_drop: float | None = Field(
        None, ge=0, le=1, description="the candidate's top-1 on feedback labels at most this much below the control's"
    )


class Rollout(_Strict):
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


Phase = Literal["off", "running", "promoted", "rolled_back"]
HISTORY = 100  # rollout events kept in the file (the controller's event log keeps all of them)


class RolloutEvent(_Strict):
    at: float = Field(description="unix time")
    event: Literal["started", "advanced", "promoted", "rolled_back"]
    step: int
    weight: float = Field(description="the candidate's weight from this event on")
    reason: str
    verdicts: list[dict] = Field(default_factory=list, description="the gates as judged at this event")


class RolloutState(_Strict):
    """Written by the rollout controller only; a new experiment (PUT) starts from `off`."""

    phase: Phase = "off"
    step: int = Field(-1, description="index into rollout.steps; -1 before the first")
    step_started_at: float | None = None
    baseline: dict[str, float] = Field(
        default_factory=dict, description="the gates' counters, summed over replicas, when this step began"
    )
    reason: str = ""
    history: list[RolloutEvent] = Field(default_factory=list)


class Experiment(_Strict):
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
    alpha: float = Field(0.05, gt=0, lt=0.5, description="error rate of each gate's anytime-valid test")
    state: RolloutState = Field(default_factory=RolloutState)

    @field_validator("weights")
    @classmethod
    def _distribution(cls, weights: dict[str, float]) -> dict[str, float]:
        if not weights or any(w < 0 for w in weights.values()):
            raise ValueError("weights must be non-negative shares of at least one arm")
        if abs(sum(weights.values()) - 1) > WEIGHT_TOLERANCE:
            raise ValueError(f"weights must sum to 1, got {sum(weights.values()):g}")
        return weights

    @model_validator(mode="after")
    def _arms(self) -> Experiment:
        if self.control == self.candidate and len(self.weights) > 1:
            raise ValueError("control and candidate must be different arms")
        missing = {self.control, self.candidate} - set(self.weights)
        if missing:
            raise ValueError(f"weights must give a share to control and candidate; missing {sorted(missing)}")
        if self.shadow_fraction > 0 and len(self.weights) < 2:
            raise ValueError("shadow_fraction > 0 needs two arms to mirror between")
        if self.rollout.enabled and len(self.weights) != 2:
            raise ValueError("a rollout moves traffic between two arms: give weights to control and candidate only")
        return self

    def with_candidate_weight(self, weight: float) -> dict[str, float]:
        return {self.candidate: weight, self.control: round(1 - weight, 9)}


class ExperimentRefused(GatewayError):
    """A well-formed experiment this gateway cannot run (an arm it does not serve)."""

    status_code, kind = 422, "invalid_experiment"


def from_settings(settings: GatewaySettings) -> Experiment:
    """The experiment of the start-up settings, for a gateway without an experiment file: the teacher
    is the control and the student the candidate when both are arms (else the last and the first)."""
    arms = list(settings.ab_weights)
    return Experiment(
        control=TEACHER if TEACHER in arms else arms[-1],
        candidate=STUDENT if STUDENT in arms else arms[0],
        weights=dict(settings.ab_weights),
        shadow_fraction=settings.shadow_fraction,
        sticky_header=settings.ab_key_header,
    )


def ordered_weights(experiment: Experiment) -> dict[str, float]:
    """The candidate's share first: a sticky key's uniform draw below the candidate's weight lands on
    it, so raising the weight moves clients from the control to the candidate and never back."""
    first = {experiment.candidate: experiment.weights[experiment.candidate]}
    return first | {arm: w for arm, w in experiment.weights.items() if arm != experiment.candidate}


def check_arms(manifest: Manifest, experiment: Experiment) -> None:
    """Every arm must be a name `/v1/classify` answers (an alias or a served model), never `auto`."""
    known = callable_names(manifest)
    unknown = sorted(set(experiment.weights) - set(known))
    if unknown:
        raise ExperimentRefused(f"weights: {unknown} not served; arms are among: {', '.join(known)} (not {AUTO})")


def apply_experiment(app: FastAPI, experiment: Experiment) -> None:
    """Route by `experiment` from the next request on (its arms were checked against the manifest)."""
    state = app.state
    previous = getattr(state, "experiment", None)
    state.experiment = experiment
    state.ab_router = ABRouter(ordered_weights(experiment), experiment.shadow_fraction)
    state.ab_stats.add_arms(list(experiment.weights))
    for arm in set(previous.weights if previous else ()) - set(experiment.weights):
        state.metrics.ab_weight.labels(arm).set(0)
    for arm, weight in experiment.weights.items():
        state.metrics.ab_weight.labels(arm).set(weight)
        for correct in ("true", "false"):  # from the first scrape on, so the top-1 panel and rule have a series
            state.metrics.feedback_top1.labels(arm, correct)
    for phase in Phase.__args__:
        state.metrics.rollout_phase.labels(phase).set(int(phase == experiment.state.phase))
    state.metrics.rollout_step.set(experiment.state.step)
    # A step is what the controller last wrote: the same experiment with another weight is another step.
    state.local_step.restart(experiment.model_dump_json(exclude={"state": {"history", "reason"}}))


def initial_experiment(settings: GatewaySettings) -> Experiment:
    """The experiment file's when there is one (a replica joining runs what the others run), else the
    settings'. A file that does not parse stops the gateway, as a bad setting does."""
    path = settings.experiment_file
    if path is None or not path.is_file():
        return from_settings(settings)
    try:
        return read_experiment(path)
    except (OSError, ValueError) as exc:
        raise GatewayError(f"experiment file {path}: {exc}") from exc


def start_experiment(app: FastAPI, settings: GatewaySettings, manifest: Manifest) -> None:
    """The initial experiment applied, and (with an experiment file) its follower on `app.state`, which
    the lifespan runs; a followed experiment is checked against the manifest served at that moment."""
    experiment = initial_experiment(settings)
    check_arms(manifest, experiment)
    apply_experiment(app, experiment)
    app.state.experiment_follower = None
    if settings.experiment_file is not None:

        def follow(new: Experiment) -> None:
            check_arms(app.state.classifier.manifest, new)
            apply_experiment(app, new)

        app.state.experiment_follower = ExperimentFollower(
            settings.experiment_file,
            settings.experiment_poll_s,
            follow,
            lambda: app.state.metrics.errors.labels("experiment_refused").inc(),
        )


def parse_experiment(body: bytes) -> Experiment:
    """An experiment from a request or file body; a ValidationError names the field."""
    return Experiment.model_validate_json(body)


def read_experiment(path: Path) -> Experiment:
    return parse_experiment(path.read_bytes())


def write_experiment(path: Path, experiment: Experiment) -> None:
    """Written whole or not at all: a replica reading mid-write sees the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_whole(path, json.dumps(experiment.model_dump(mode="json"), indent=2) + "\n", durable=True)


class ExperimentFollower:
    """Re-reads the experiment file when it changes and hands each valid new experiment to `apply`;
    an unreadable or invalid file is logged and counted, and the running experiment stays."""

    def __init__(self, path: Path, poll_s: float, apply, on_refused) -> None:
        self.path, self.poll_s, self.apply, self.on_refused = path, poll_s, apply, on_refused
        self.seen = file_stamp(path)

    def mark_written(self) -> None:
        """This replica wrote the file itself (PUT) and applied it already."""
        self.seen = file_stamp(self.path)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                self.check()
            except Exception:  # a poll must never end the follower
                log.exception("experiment check failed")

    def check(self) -> str:
        stamp = file_stamp(self.path)
        if stamp == self.seen:
            return "same"
        self.seen = stamp
        if stamp is None:
            return "same"  # removed: the running experiment stays until a new file is written
        try:
            experiment = read_experiment(self.path)
            self.apply(experiment)
        except (OSError, ValidationError, GatewayError) as exc:
            log.error("experiment file %s refused, keeping the running one: %s", self.path, exc)
            self.on_refused()
            return "refused"
        log.warning("experiment changed: weights %s, shadow %s", experiment.weights, experiment.shadow_fraction)
        return "applied"
