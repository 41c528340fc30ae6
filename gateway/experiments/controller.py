"""The rollout controller: steps the candidate's weight up while every gate passes, and sets it back to 0
(the control serves everything) the moment one fails.

One controller for any number of gateway replicas, in the pattern of Flagger and Argo Rollouts: it reads
figures summed over the replicas (Prometheus' query API when deployed, the replicas' own /metrics when
there is no Prometheus) and writes the experiment file they all follow. Its state is in that file (phase,
step, when the step began) and, beside it, the step's counts so far (`<experiment>.counts.json`, a
`counts.StepLedger` advanced at every tick, so a replica's restart never subtracts), so a restarted
controller carries on where the last one stopped; one replica of it is enough.

Each tick: read the file; a rollout that is enabled and not finished is judged on the counts since its
step began (gateway/experiments/gates.py); a failed gate rolls back at once, a passing step advances (the step
after the last judged one is 100%: the rollout is then promoted), a pending one waits. Every transition
is an event: appended to the event log (JSON lines), kept in the file's recent history, logged, and
counted on the controller's own metrics.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge

from gateway.experiments.counts import Counts, StepLedger
from gateway.experiments.file import ExperimentBusy, read_experiment, write_experiment, writing
from gateway.experiments.gates import StepVerdict, judge
from gateway.experiments.sources import CountSource
from gateway.experiments.spec import Experiment
from gateway.experiments.state import HISTORY, RolloutEvent, RolloutState
from gateway.files import file_stamp, write_whole
from kdcontract.errors import UserError
from kdcontract.names import VERSION_MARK
from kdcontract.versions import promote, reject, split_versioned

log = logging.getLogger("kdserve.rollout")

STATUS_VALUE = {"pass": 1, "pending": 0, "fail": -1}


class ControllerMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.gate_status = Gauge(
            "kdserve_rollout_gate_status", "Each gate as last judged: 1 pass, 0 pending, -1 fail", ["gate"], registry=r
        )
        self.gate_value = Gauge(
            "kdserve_rollout_gate_value",
            "Each gate's estimate, interval bounds and threshold as last judged",
            ["gate", "bound"],
            registry=r,
        )
        self.candidate_weight = Gauge("kdserve_rollout_candidate_weight", "The candidate's weight", registry=r)
        self.transitions = Counter(
            "kdserve_rollout_transitions_total",
            "Rollout events: started, advanced, promoted, rolled_back",
            ["event"],
            registry=r,
        )
        self.ticks = Counter("kdserve_rollout_ticks_total", "Evaluations, by outcome", ["outcome"], registry=r)
        self.version_changes = Counter(
            "kdserve_rollout_version_changes_total",
            "Candidate versions promoted or rejected in the model repository, by outcome",
            ["action", "outcome"],
            registry=r,
        )
        for event in ("started", "advanced", "promoted", "rolled_back"):
            self.transitions.labels(event)

    def show(self, experiment: Experiment, verdict: StepVerdict | None) -> None:
        self.candidate_weight.set(experiment.weights.get(experiment.candidate, 0.0))
        for v in verdict.verdicts if verdict else ():
            self.gate_status.labels(v.gate).set(STATUS_VALUE[v.status])
            for bound, value in (
                ("estimate", v.estimate),
                ("low", v.interval[0]),
                ("high", v.interval[1]),
                ("threshold", v.threshold),
            ):
                if value is not None:
                    self.gate_value.labels(v.gate, bound).set(value)


@dataclass
class Tick:
    outcome: str  # idle | waiting | started | advanced | promoted | rolled_back | changed_underneath
    experiment: Experiment | None
    verdict: StepVerdict | None = None


class RolloutController:
    def __init__(
        self,
        experiment_file: Path,
        counts: CountSource,
        events_file: Path | None = None,
        metrics: ControllerMetrics | None = None,
        clock: Callable[[], float] = time.time,
        repo: Path | None = None,
    ) -> None:
        self.path, self.counts, self.clock = Path(experiment_file), counts, clock
        self.repo = Path(repo) if repo is not None else None
        self.events_file = events_file or self.path.with_name(self.path.stem + ".events.jsonl")
        self.ledger_file = self.path.with_name(self.path.stem + ".counts.json")
        self.metrics = metrics or ControllerMetrics()

    def step_counts(self) -> Counts:
        """What the current step has counted so far, over every replica (empty before a step began)."""
        ledger = self._ledger()
        return dict(ledger.counted) if ledger is not None else {}

    def _ledger(self) -> StepLedger | None:
        try:
            return StepLedger(**json.loads(self.ledger_file.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:  # not a ledger this controller wrote: the step counts from now
            log.warning("the step's counts in %s are unreadable (%s): counting from now", self.ledger_file, exc)
            return None

    def _keep(self, ledger: StepLedger) -> None:
        write_whole(self.ledger_file, json.dumps(asdict(ledger)), durable=True)

    def _counted(self, state: RolloutState, by_instance: dict[str, Counts]) -> Counts:
        """The step's counts advanced to this read. Without a ledger for this step (lost, or another
        step's), counting starts over from now: fewer samples, never counts the step did not see."""
        ledger = self._ledger()
        if ledger is None or ledger.step_started_at != state.step_started_at:
            log.warning("no counts kept for step %d: counting it from now", state.step)
            ledger = StepLedger.begin(state.step_started_at or self.clock(), by_instance)
        else:
            ledger = ledger.advance(by_instance)
        self._keep(ledger)
        return ledger.counted

    def tick(self) -> Tick:
        stamp = file_stamp(self.path)
        if stamp is None:
            return self._count(Tick("idle", None))
        experiment = read_experiment(self.path)
        state = experiment.state
        if not experiment.rollout.enabled or state.phase in ("promoted", "rolled_back"):
            self.metrics.show(experiment, None)
            return self._count(Tick("idle", experiment))
        by_instance, now = self.counts.read_by_instance(), self.clock()
        if state.phase == "off":
            return self._transition(experiment, stamp, "started", 0, by_instance, now, None, "rollout started")
        counted = self._counted(state, by_instance)
        verdict = judge(experiment, counted, now - (state.step_started_at or now))
        self.metrics.show(experiment, verdict)
        if verdict.status == "fail":
            return self._transition(
                experiment, stamp, "rolled_back", state.step, by_instance, now, verdict, verdict.reason
            )
        if verdict.status == "pending":
            return self._count(Tick("waiting", experiment, verdict))
        following = state.step + 1
        steps = experiment.rollout.steps
        if following >= len(steps) or steps[following] >= 1.0:
            return self._transition(
                experiment, stamp, "promoted", len(steps) - 1, by_instance, now, verdict, "every step passed"
            )
        return self._transition(experiment, stamp, "advanced", following, by_instance, now, verdict, verdict.reason)

    def _transition(
        self,
        experiment: Experiment,
        stamp,
        event: str,
        step: int,
        by_instance: dict[str, Counts],
        now: float,
        verdict: StepVerdict | None,
        reason: str,
    ) -> Tick:
        weight = {"rolled_back": 0.0, "promoted": 1.0}.get(event, experiment.rollout.steps[step])
        phase = {"rolled_back": "rolled_back", "promoted": "promoted"}.get(event, "running")
        record = RolloutEvent(
            at=now,
            event=event,
            step=step,
            weight=weight,
            reason=reason,
            verdicts=[v.as_dict() for v in verdict.verdicts] if verdict else [],
        )
        state = RolloutState(
            phase=phase,
            step=step,
            step_started_at=now,
            reason=reason,
            history=[*experiment.state.history, record][-HISTORY:],
        )
        changed = experiment.model_copy(update={"weights": experiment.with_candidate_weight(weight), "state": state})
        changed = Experiment.model_validate(changed.model_dump())  # the file is always a valid experiment
        try:
            with writing(self.path):
                if file_stamp(self.path) != stamp:
                    # Changed since this tick read it (a PUT): the next tick judges the new one.
                    return self._count(Tick("changed_underneath", experiment, verdict))
                self._write(changed, record, by_instance, now, phase)
        except ExperimentBusy:  # a PUT is writing it now: the next tick reads what it wrote
            return self._count(Tick("changed_underneath", experiment, verdict))
        (log.error if event == "rolled_back" else log.warning)(
            "rollout %s: step %d, %s weight %.3g: %s", event, step, experiment.candidate, weight, reason
        )
        self.metrics.transitions.labels(event).inc()
        self.metrics.show(changed, verdict)
        if event in ("promoted", "rolled_back"):
            self._end_trial(changed.candidate, event)
        return self._count(Tick(event, changed, verdict))

    def _end_trial(self, candidate: str, event: str) -> None:
        """A candidate version (`NAME@VERSION`) is promoted to current or rejected (unloaded) in the model
        repository, after the experiment moved its traffic: a failure here leaves the traffic where the gates
        put it, and is logged and counted for an operator (`python -m training versions`)."""
        if self.repo is None or VERSION_MARK not in candidate:
            return
        action = "promote" if event == "promoted" else "reject"
        try:
            name, version = split_versioned(candidate)
            done = (promote if action == "promote" else reject)(self.repo, name, version)
        except (OSError, ValueError, UserError) as exc:
            log.error("rollout %s: could not %s %s in %s: %s", event, action, candidate, self.repo, exc)
            self.metrics.version_changes.labels(action, "failed").inc()
            return
        log.warning("rollout %s: %s %s", event, action, "; ".join(done))
        self.metrics.version_changes.labels(action, "done").inc()

    def _write(
        self, changed: Experiment, record: RolloutEvent, by_instance: dict[str, Counts], now: float, phase: str
    ) -> None:
        if phase == "running":  # before the file: a step never runs without its ledger (a finished one keeps its)
            self._keep(StepLedger.begin(now, by_instance))
        write_experiment(self.path, changed)
        with self.events_file.open("a") as handle:
            handle.write(json.dumps({"experiment_file": str(self.path), **record.model_dump()}) + "\n")

    def _count(self, tick: Tick) -> Tick:
        self.metrics.ticks.labels(tick.outcome).inc()
        return tick

    def run(self, interval_s: float, stop: Callable[[], bool] = lambda: False) -> None:
        """Tick every `interval_s` until `stop()`; a tick that fails (a replica down, Prometheus away) is
        logged and the next one tries again: the replicas keep the last written weights meanwhile."""
        while not stop():
            try:
                self.tick()
            except Exception as exc:  # one bad tick must not end the controller
                log.error("rollout tick failed, trying again in %.3g s: %s", interval_s, exc)
                self.metrics.ticks.labels("error").inc()
            deadline = time.monotonic() + interval_s
            while not stop() and time.monotonic() < deadline:
                time.sleep(min(0.1, interval_s))
