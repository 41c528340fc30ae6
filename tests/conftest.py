"""Shared fixtures. The tiny training run is trained once per session and reused by many tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.process import GatewayProcess, free_port

ROOT = Path(__file__).resolve().parents[1]

# A short version of the digits recipe: narrow ResNet18s (half the published channels for the teacher, a
# quarter for the students: 5-12x less compute a step, which these tests of plumbing do not need), 5 and 8
# epochs (96-98% test top-1: past the point where accuracy swings by points between client forms, which
# the served-accuracy test needs), two seeds, a 2-head model, two pruning steps.
TINY_OVERRIDES = [
    "teacher.arch=resnet18",
    "teacher.width=0.5",
    "teacher.train.epochs=5",
    "student.width=0.25",
    "student.train.epochs=8",
    "evaluation.seeds=[0, 1]",
    "ensemble.variants=[{seed: 0}, {seed: 1}]",
    "ensemble.multihead.heads=2",
    "compression.max_steps=2",
    "compression.round_to=2",  # multiples of 8 would take half of a 16-channel layer at once
    "compression.finetune.epochs=1",
    "compression.max_extra_epochs=1",
]


def run_training(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "training", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def override_args(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_run")
    proc = run_training(
        "all", "--recipe", "digits", "--out", str(out), "--threads", "2", *override_args(TINY_OVERRIDES)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def tiny_results(tiny_run: Path) -> dict:
    return json.loads((tiny_run / "results.json").read_text())


@pytest.fixture(scope="session")
def tiny_repo(tiny_run: Path, tmp_path_factory) -> Path:
    """The tiny run exported into a cpu-flavour Triton repository."""
    repo = tmp_path_factory.mktemp("repo")
    proc = run_training("export", "--run", str(tiny_run), "--repo", str(repo))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return repo


@pytest.fixture(scope="session")
def triton(tiny_repo: Path, tmp_path_factory):
    """A real tritonserver on free loopback ports serving the tiny repository."""
    from gateway.triton_server import EmbeddedTriton, TritonPorts

    log_file = tmp_path_factory.mktemp("triton") / "triton.log"
    # Explicit model control (all models loaded at start) lets a test unload an ensemble member for real.
    server = EmbeddedTriton(
        tiny_repo,
        TritonPorts(free_port(), free_port(), free_port()),
        log_file=log_file,
        extra_args=["--model-control-mode=explicit", "--load-model=*"],
    )
    server.start(timeout=180)
    yield server
    server.stop()


# The test gateways' settings: a 70/30 A/B split with every request shadowed, ensembles answering with
# one member left.
GATEWAY_ENV = {
    "KDSERVE_AB_WEIGHTS": '{"student": 0.7, "teacher": 0.3}',
    "KDSERVE_SHADOW_FRACTION": "1.0",
    "KDSERVE_ENSEMBLE_QUORUM": "1",
}


@pytest.fixture(scope="session")
def gateway(tiny_repo: Path, triton, tmp_path_factory):
    answers = tmp_path_factory.mktemp("answers")  # A/B answers kept for feedback
    gw = GatewayProcess(tiny_repo, triton.http_url, env=GATEWAY_ENV | {"KDSERVE_ANSWERS_DIR": str(answers)})
    yield gw
    gw.stop()
