"""Shared fixtures. The tiny training run is trained once per session and reused by many tests."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from gateway.process import GatewayProcess, free_port

ROOT = Path(__file__).resolve().parents[1]

# Under pytest-xdist (`make test`) every core already has a worker, so torch in the tests' subprocesses gets
# one thread: OpenMP's threads spin while they wait for work, and next to another busy process that spinning
# doubled a tiny training run (24 s and 25 CPU-s with two threads, 13 s and 12 CPU-s with one).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

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


def training_cli(capsys: pytest.CaptureFixture, *args: str) -> subprocess.CompletedProcess:
    """`python -m training <args>` run in this process by the command line's own `main`: its exit code,
    stdout and stderr. For commands that end in seconds, where a subprocess would spend most of its time
    importing torch again (this worker has it imported already)."""
    from training.cli import main

    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse's usage errors, `plan --exit-code`
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return subprocess.CompletedProcess([sys.executable, "-m", "training", *args], code, captured.out, captured.err)


def triton_inference_stats(http_url: str, model: str, successes_at_least: int = 0, timeout: float = 10.0) -> dict:
    """Triton's inference statistics of `model`. Triton records a request's statistics
    after its response is sent, so a read right after the last answer can miss that request (seen on one
    core: 399 of 400): this waits, up to `timeout`, until the success count has reached `successes_at_least`."""
    deadline = time.monotonic() + timeout
    while True:
        stats = httpx.get(f"http://{http_url}/v2/models/{model}/stats").json()["model_stats"][0]["inference_stats"]
        if int(stats["success"]["count"]) >= successes_at_least or time.monotonic() > deadline:
            return stats
        time.sleep(0.02)


def override_args(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


class SessionArtifact:
    """A folder built once per test session however many pytest-xdist workers run it (`make test` runs
    two): whoever asks first builds it while holding a file lock, everyone else waits on the lock and
    takes the finished folder. A failed build is recorded, so every test that needs it fails with the
    build's own message instead of building it again.

    `start()` builds it in a background thread at the session's start, so that the tests that do not
    need it (they are ordered first, see `pytest_collection_modifyitems`) run while it trains."""

    def __init__(self, folder: Path, build: Callable[[Path], None]) -> None:
        self.folder, self._build = folder, build
        self._lock, self._failed = folder.with_name(folder.name + ".lock"), folder.with_name(folder.name + ".failed")
        self._done = folder / ".built"

    def start(self) -> None:
        threading.Thread(target=self._build_once, name=f"build {self.folder.name}", daemon=True).start()

    def get(self) -> Path:
        self._build_once()
        if self._failed.exists():
            pytest.fail(f"building {self.folder.name} failed:\n{self._failed.read_text()}", pytrace=False)
        return self.folder

    def _build_once(self) -> None:
        # A file lock of its own descriptor per call: flock excludes other threads of this process too.
        with self._lock.open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self._done.exists() or self._failed.exists():
                return
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                self._build(self.folder)
                self._done.touch()
            except BaseException as error:  # recorded for every waiting test, then the thread ends
                self._failed.write_text(str(error) or repr(error))


def _train_tiny_run(folder: Path) -> None:
    run, repo = folder / "run", folder / "repo"
    # Trained, then exported (cpu flavour) by the same process.
    built = run_training("all", "--out", str(run), "--export", str(repo), *override_args(TINY_OVERRIDES))
    if built.returncode != 0:
        raise RuntimeError(f"training or exporting the tiny run failed:\n{built.stderr[-3000:]}")


def _build_gateway_image(folder: Path) -> None:
    """The gateway image from the repository's Dockerfile (deploy/podman/image.sh, cached by content hash)."""
    for tool in ("podman", "buildah", "runc", "debootstrap"):
        if not shutil.which(tool):
            raise RuntimeError(f"{tool} is missing: `make setup` installs Debian's {tool} package")
    built = subprocess.run(
        ["bash", str(ROOT / "deploy" / "podman" / "image.sh")], capture_output=True, text=True, timeout=1500
    )
    if built.returncode != 0:
        raise RuntimeError(f"building the gateway image failed:\n{built.stderr[-3000:]}")
    (folder / "image").write_text(built.stdout.strip().splitlines()[-1])


# What tests share, by the fixture that hands it out, and how it is built.
ARTIFACTS: dict[str, Callable[[Path], None]] = {"tiny": _train_tiny_run, "gateway_image": _build_gateway_image}
NEEDED_BY = {"tiny_run": "tiny", "gateway_image": "gateway_image"}


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> dict[str, SessionArtifact]:
    # Under pytest-xdist each worker's base temp is a sub-folder of one shared by the session's workers.
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    return {name: SessionArtifact(shared / name, build) for name, build in ARTIFACTS.items()}


@pytest.fixture(scope="session", autouse=True)
def _build_artifacts_in_background(request, artifacts) -> None:
    """Starts building what the collected tests will need (only that: one unit test file trains nothing)."""
    needed = {NEEDED_BY[f] for item in request.session.items for f in item.fixturenames if f in NEEDED_BY}
    for name in sorted(needed):
        artifacts[name].start()


def pytest_collection_modifyitems(config, items) -> None:
    """Modules whose tests need no shared artifact first, so that they run while the artifacts build; within
    each of the two groups, modules with a `slow` test first, so that the last module a worker takes is a
    short one (the longest first keeps both workers busy to the end). The order is otherwise
    pytest-randomly's (it runs before this hook), and a module stays whole for `--dist loadscope`."""
    waits = {item.module.__name__ for item in items if NEEDED_BY.keys() & set(item.fixturenames)}
    slow = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: (item.module.__name__ in waits, item.module.__name__ not in slow))


@pytest.fixture(scope="session")
def tiny_run(artifacts) -> Path:
    return artifacts["tiny"].get() / "run"


@pytest.fixture(scope="session")
def tiny_results(tiny_run: Path) -> dict:
    return json.loads((tiny_run / "results.json").read_text())


@pytest.fixture(scope="session")
def tiny_repo(tiny_run: Path) -> Path:
    """The tiny run exported into a cpu-flavour Triton repository."""
    return tiny_run.parent / "repo"


@pytest.fixture(scope="session")
def gateway_image(artifacts) -> str:
    """The name of the gateway image built with podman (built once per content hash)."""
    return (artifacts["gateway_image"].get() / "image").read_text()


@pytest.fixture(scope="session")
def triton(tiny_repo: Path, tmp_path_factory):
    """A real tritonserver on free loopback ports serving the tiny repository."""
    from gateway.triton.server import EmbeddedTriton, TritonPorts

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
