"""A rollout's state: the phase, the step, the counts it is judged from, and its history. Written by the rollout
controller only, kept beside the spec in the experiment file."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


Phase = Literal["off", "running", "promoted", "rolled_back"]


HISTORY = 100  # rollout events kept in the file (the controller's event log keeps all of them)


class RolloutEvent(StrictModel):
    at: float = Field(description="unix time")
    event: Literal["started", "advanced", "promoted", "rolled_back"]
    step: int
    weight: float = Field(description="the candidate's weight from this event on")
    reason: str
    verdicts: list[dict] = Field(default_factory=list, description="the gates as judged at this event")


class RolloutState(StrictModel):
    """Written by the rollout controller only; a new experiment (PUT) starts from `off`."""

    phase: Phase = "off"
    step: int = Field(-1, description="index into rollout.steps; -1 before the first")
    step_started_at: float | None = None
    reason: str = ""
    history: list[RolloutEvent] = Field(default_factory=list)
