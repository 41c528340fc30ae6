"""The experiment a replica runs: checked against the served manifest, applied to its routing and metrics,
followed from the experiment file."""

from __future__ import annotations

from gateway.errors import GatewayError
from gateway.experiments.file import ExperimentFollower, read_experiment
from gateway.experiments.spec import Experiment, ExperimentRefused, ordered_weights
from gateway.experiments.state import Phase
from gateway.serving.routing import ABRouter
from gateway.serving.service import ReplicaState
from gateway.settings import GatewaySettings
from kdcontract.manifest import Manifest
from kdcontract.names import AUTO, STUDENT, TEACHER, callable_names


def check_arms(manifest: Manifest, experiment: Experiment) -> None:
    """Every arm must be a name `/v1/classify` answers (an alias, a served model or `NAME@VERSION`), never
    `auto`; but a rolled-back candidate's version is unloaded as the roll-back's last act, so that arm (at
    weight 0, never routed to) may have gone."""
    known = callable_names(manifest)
    gone = {experiment.candidate} if experiment.state.phase == "rolled_back" else set()
    unknown = sorted(set(experiment.weights) - set(known) - gone)
    if unknown:
        raise ExperimentRefused(f"weights: {unknown} not served; arms are among: {', '.join(known)} (not {AUTO})")


def apply_experiment(state: ReplicaState, experiment: Experiment) -> None:
    """Route by `experiment` from the next request on (its arms were checked against the manifest)."""
    previous = getattr(state, "experiment", None)
    state.experiment = experiment
    # Nothing is mirrored to a rolled-back candidate: it is refused, and its version is being unloaded.
    shadow = 0.0 if experiment.state.phase == "rolled_back" else experiment.shadow_fraction
    state.ab_router = ABRouter(ordered_weights(experiment), shadow)
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


def start_experiment(state: ReplicaState, settings: GatewaySettings, manifest: Manifest) -> None:
    """The initial experiment applied, and (with an experiment file) its follower on `state`, which
    the lifespan runs; a followed experiment is checked against the manifest served at that moment."""
    experiment = initial_experiment(settings)
    check_arms(manifest, experiment)
    apply_experiment(state, experiment)
    state.experiment_follower = None
    if settings.experiment_file is not None:

        def follow(new: Experiment) -> None:
            check_arms(state.classifier.manifest, new)
            apply_experiment(state, new)

        state.experiment_follower = ExperimentFollower(
            settings.experiment_file,
            settings.experiment_poll_s,
            follow,
            lambda: state.metrics.errors.labels("experiment_refused").inc(),
        )
