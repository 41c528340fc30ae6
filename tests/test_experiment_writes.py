"""Writing the experiment file: one writer at a time (a PUT, or the rollout controller's transition), a
PUT starts from `off`, and `If-Match` changes exactly the version read. In process: no Triton is needed
to change an experiment."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import httpx
import pytest

from gateway.app.factory import create_app
from gateway.experiments.controller import RolloutController
from gateway.experiments.file import ExperimentBusy, read_experiment, write_experiment, writing
from gateway.experiments.sources import RegistryCounts
from gateway.experiments.spec import Experiment
from gateway.settings import GatewaySettings
from gateway.telemetry.metrics import GatewayMetrics

TOKEN = "test-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def experiment(weight: float, **changes) -> dict:
    return {
        "control": "teacher",
        "candidate": "student",
        "weights": {"student": weight, "teacher": round(1 - weight, 6)},
        "gates": {"min_agreement": 0.9},
        "rollout": {"enabled": True, "steps": [0.25, 0.5, 1.0], "min_samples": 50, "min_duration_s": 1},
    } | changes


def calls(repo: Path, experiment_file: Path, *requests):
    """Each (method, body, headers) through a started gateway's ASGI app; the responses."""
    settings = GatewaySettings(
        repo=repo,
        grpc_port=0,
        manifest_poll_s=0,
        experiment_file=experiment_file,
        admin_token_sha256=hashlib.sha256(TOKEN.encode()).hexdigest(),
    )
    app = create_app(settings)

    async def run():
        answers = []
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
                for request in requests:
                    if callable(request):
                        request()
                        continue
                    method, body, headers = request
                    answers.append(await client.request(method, "/v1/experiment", json=body, headers=headers))
        return answers

    return asyncio.run(run())


def test_a_put_starts_a_new_experiment_from_off_whatever_state_its_body_carries(tiny_repo, tmp_path):
    """Issue 36: a GET-edit-PUT of a running rollout kept the state the body carried (its step, its phase)."""
    path = tmp_path / "experiment.json"
    running = {"phase": "running", "step": 2, "step_started_at": 1.0, "reason": "copied from a GET"}
    (put,) = calls(tiny_repo, path, ("PUT", experiment(0.25, state=running), ADMIN))
    assert put.status_code == 200, put.text
    assert put.json()["experiment"]["state"]["phase"] == "off"
    stored = read_experiment(path).state
    assert (stored.phase, stored.step, stored.step_started_at) == ("off", -1, None)


def test_a_put_while_the_controller_writes_is_refused_and_changes_nothing(tiny_repo, tmp_path):
    path = tmp_path / "experiment.json"
    write_experiment(path, Experiment.model_validate(experiment(0.0)))
    before = path.read_bytes()
    holding = writing(path)
    answers = calls(
        tiny_repo,
        path,
        holding.__enter__,  # the controller mid-transition
        ("PUT", experiment(0.5), ADMIN),
        lambda: holding.__exit__(None, None, None),
        ("PUT", experiment(0.5), ADMIN),
    )
    busy, after = answers
    assert busy.status_code == 409 and busy.json()["error"]["kind"] == "experiment_busy", busy.text
    assert after.status_code == 200
    assert before != path.read_bytes() and read_experiment(path).weights["student"] == 0.5


def test_if_match_changes_exactly_the_version_read(tiny_repo, tmp_path):
    path = tmp_path / "experiment.json"
    write_experiment(path, Experiment.model_validate(experiment(0.0)))
    read = f'"{hashlib.sha256(path.read_bytes()).hexdigest()[:32]}"'  # the version a GET hands out
    got, stale_put, current_put = calls(
        tiny_repo,
        path,
        ("GET", None, {}),  # classify is open on loopback; the admin token has the admin scope only
        ("PUT", experiment(0.25), ADMIN | {"If-Match": '"0000"'}),
        ("PUT", experiment(0.5), ADMIN | {"If-Match": read}),
    )
    assert got.status_code == 200 and got.headers["ETag"] == read, got.text
    assert stale_put.status_code == 412 and stale_put.json()["error"]["kind"] == "experiment_changed"
    assert current_put.status_code == 200, current_put.text
    assert read_experiment(path).weights["student"] == 0.5


def test_the_controller_writes_nothing_while_a_put_holds_the_file(tmp_path):
    path = tmp_path / "experiment.json"
    write_experiment(path, Experiment.model_validate(experiment(0.0)))
    before = path.read_bytes()
    controller = RolloutController(path, RegistryCounts(GatewayMetrics().registry), clock=lambda: 0.0)
    with writing(path):
        assert controller.tick().outcome == "changed_underneath"
        with pytest.raises(ExperimentBusy), writing(path):
            pass
    assert path.read_bytes() == before
    assert controller.tick().outcome == "started"
    assert json.loads(path.read_text())["state"]["phase"] == "running"
