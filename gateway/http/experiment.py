"""`GET` and `PUT /v1/experiment`: the A/B experiment this replica runs, with its own figures, and changing it
for every replica through the experiment file."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from gateway.auth.scopes import requires
from gateway.errors import Conflict
from gateway.experiments.file import ExperimentChanged, file_version, write_experiment, writing
from gateway.experiments.gates import arm_statistics, judge
from gateway.experiments.spec import Experiment, ExperimentRefused, parse_experiment
from gateway.experiments.state import RolloutState
from gateway.http.reading import parse_json_body, read_body_limited
from gateway.http.schemas import ErrorResponse, ExperimentResponse, inline_schema
from gateway.serving.experiment import apply_experiment, check_arms

router = APIRouter()


EXPERIMENT_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 409, 412, 422)}


@router.get("/v1/experiment", response_model=ExperimentResponse, summary="The A/B experiment this gateway runs")
@requires("classify")
async def get_experiment(request: Request) -> Response:
    """The experiment, this replica's figures, and the file's version as `ETag` (send it back as `If-Match`
    with a `PUT` to change exactly the version you read)."""
    return await _experiment_figures(request)


@router.put(
    "/v1/experiment",
    response_model=ExperimentResponse,
    responses=EXPERIMENT_ERRORS,
    openapi_extra={"requestBody": {"content": {"application/json": {"schema": inline_schema(Experiment)}}}},
    summary="Change the A/B experiment (admin): every replica following its file takes it up",
)
@requires("admin")
async def put_experiment(request: Request) -> Response:
    """A new experiment, started from `off`: a `state` in the body is not taken (a GET-edit-PUT of a running
    rollout would inherit its step). Refused with 409 while the rollout controller writes the file, and with
    412 when `If-Match` is not the file's current `ETag`."""
    state = request.app.state
    body = await read_body_limited(request, 64 * 1024)
    experiment = parse_json_body(parse_experiment, body, ExperimentRefused)
    experiment = experiment.model_copy(update={"state": RolloutState()})
    check_arms(state.classifier.manifest, experiment)
    path = state.settings.experiment_file
    if path is None:
        raise Conflict("no experiment file is configured (KDSERVE_EXPERIMENT_FILE): replicas would not follow")
    try:
        with writing(path):
            expected = request.headers.get("if-match")
            if expected is not None and expected != file_version(path):
                raise ExperimentChanged("the experiment changed since it was read (If-Match): read it again")
            write_experiment(path, experiment)
    except OSError as exc:
        raise Conflict(f"the experiment file cannot be written ({exc.strerror}); change it where it is kept") from exc
    apply_experiment(request.app.state, experiment)
    if state.experiment_follower is not None:
        state.experiment_follower.mark_written()
    return await _experiment_figures(request)


async def _experiment_figures(request: Request) -> Response:
    """The experiment with this replica's figures, computed and serialised off the event loop: at a million
    samples per arm the intervals take ~3 ms of CPU (`make bench`: benchmarks/experiment_read.json), which
    would hold every other request. Readers arriving while it is computed share that computation. The
    answer is a ready `Response`: FastAPI would otherwise validate and encode the model again on the loop
    (`response_model` still documents it). The file's version (`ETag`) is read in the same thread: a file on
    a slow shared volume never holds the loop."""
    body, version = await request.app.state.figures.read(lambda: _experiment_answer(request))
    return Response(body, media_type="application/json", headers={"ETag": version} if version else None)


def _experiment_answer(request: Request) -> tuple[bytes, str | None]:
    path = request.app.state.settings.experiment_file
    version = file_version(path) if path is not None else None
    return _experiment_response(request).model_dump_json().encode(), version


def _experiment_response(request: Request) -> ExperimentResponse:
    state = request.app.state
    path = state.settings.experiment_file
    experiment, counts = state.experiment, state.local_step.counts()
    return ExperimentResponse(
        experiment=experiment,
        source="file" if path is not None and path.is_file() else "settings",
        file=str(path) if path is not None else None,
        this_replica={
            "since": state.local_step.started,
            "step": judge(experiment, counts, state.local_step.age_s()).as_dict(),
            "arms": arm_statistics(experiment, counts),
        },
    )
