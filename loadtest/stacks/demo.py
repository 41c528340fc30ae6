"""`python -m loadtest demo`: Triton + gateway up, held-out digits classified over HTTP, side by side.

Starts the embedded Triton and the gateway (uvicorn, as `python -m gateway serve` runs it) on whatever
the repository serves (`make demo`: the plain student alone, the quickest model to train), sends the
digits test split as PNG files through HTTP to each served model and prints a handful of predictions
with latencies and each model's served accuracy next to the accuracy training measured. Each `--then`
command exports more models into the repository while it serves (the teacher and the KD student, then
the rest of the recipe); their models are shown once the gateway serves them. Then it keeps serving (or
exits with --once).
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx

from gateway.process import GatewayProcess
from gateway.triton.server import EmbeddedTriton, TritonPorts
from kdcontract.digits import digit_png_bytes, digits_gray, held_out_indices
from kdcontract.manifest import Manifest, read_manifest
from kdcontract.names import (
    DEFAULT_AB_WEIGHTS,
    SHOWCASE,
    STUDENT,
    STUDENT_PLAIN,
    TEACHER,
    available,
    trained_entry,
)


def classify_all(client: httpx.Client, model: str, indices, batch: int = 32) -> tuple[list[dict], list[dict]]:
    """Every index through HTTP in multipart batches; returns per-image top-1 and per-request latencies (with
    the version that answered)."""
    predictions, latencies = [], []
    for start in range(0, len(indices), batch):
        chunk = indices[start : start + batch]
        files = [("images", (f"{i}.png", digit_png_bytes(int(i)), "image/png")) for i in chunk]
        resp = client.post("/v1/classify", params={"model": model, "top_k": 1}, files=files)
        resp.raise_for_status()
        body = resp.json()
        predictions += [p["top_k"][0] for p in body["predictions"]]
        latencies.append({**body["latency"], "version": body.get("version")})
    return predictions, latencies


# Triton polls the repository so that an export made while the demo serves (the rest of the recipe, or
# a user's) is loaded; the gateway follows the manifest and switches once Triton serves it.
POLL_ARGS = ["--model-control-mode=poll", "--repository-poll-secs=5"]


class DemoClock:
    """Seconds from `started_at` (when `make demo` began, after set-up) to the page serving and to
    everything served, written with the CPU to `record` as they happen."""

    def __init__(self, started_at: float | None, record: Path | None):
        self.started_at, self.record = started_at, record
        self.seconds: dict[str, float] = {}

    def mark(self, event: str) -> None:
        if self.started_at is None or self.record is None:
            return
        from kdcontract.machine import cpu_description

        self.seconds[event] = round(time.time() - self.started_at, 1)
        self.record.parent.mkdir(parents=True, exist_ok=True)
        self.record.write_text(json.dumps({"cpu": cpu_description(), "seconds_after_start": self.seconds}, indent=2))
        print(f"[demo] {event}: {self.seconds[event]:.0f} s after make demo started", flush=True)


# What the demo shows, in this order, where the repository has it: the plain student first (it is
# trained first and served alone at the start), then what every served-accuracy check sends.
SHOWN = (STUDENT_PLAIN, *SHOWCASE)


def ab_arms(manifest: Manifest) -> dict[str, float] | None:
    """The A/B split the demo's gateway starts with: None (the settings' student/teacher split) when
    both are served, else all traffic on the one model served so far (a one-arm experiment)."""
    callable_now = available(manifest, (STUDENT, TEACHER, STUDENT_PLAIN))
    if {STUDENT, TEACHER} <= set(callable_now):
        return None
    return {callable_now[0]: 1.0}


def run_demo(
    repo: Path,
    gateway_port: int,
    ports: TritonPorts,
    once: bool,
    then: list[str] | None = None,
    clock: DemoClock | None = None,
    state: Path = Path("runs/demo-state"),
    rollout: bool = False,
) -> int:
    """Serve `repo` and show it; with `then`, run those commands in turn (each exports more models into
    `repo`) while serving, and show the models each one added once the gateway serves them. When the
    student and the teacher are served, the A/B split moves to them; with `rollout`, the demo ends with
    a rollout of the student under Locust (the page draws it as it happens)."""
    clock = clock or DemoClock(None, None)
    triton_log = repo.resolve().parent / "triton.log"
    experiment_file = state / "experiment.json"
    experiment_file.unlink(missing_ok=True)  # each demo starts from the settings' split
    env = {
        "KDSERVE_EXPERIMENT_FILE": str(experiment_file),
        "KDSERVE_EXPERIMENT_POLL_S": "0.5",
        "KDSERVE_ANSWERS_DIR": str(state / "answers"),
    }
    with contextlib.ExitStack() as serving:
        # Triton first: it tells a folder that is no model repository apart, in one line.
        triton = serving.enter_context(EmbeddedTriton(repo, ports, log_file=triton_log, extra_args=POLL_ARGS))
        first_arms = ab_arms(read_manifest(repo))
        if first_arms is not None:
            env["KDSERVE_AB_WEIGHTS"] = json.dumps(first_arms)
        gateway = serving.enter_context(
            GatewayProcess(repo, triton.http_url, port=gateway_port, ready_path="/readyz", env=env)
        )
        url = gateway.url
        print(f"\nWeb page {url}/  (draw a digit or drop a photo: the served models side by side)")
        print(f"Gateway  {url}  (docs {url}/docs, metrics {url}/metrics, A/B {url}/v1/ab/summary)")
        print(
            f"Triton   http://{triton.http_url}  grpc {triton.grpc_url}  "
            f"metrics http://127.0.0.1:{ports.metrics}/metrics"
        )
        print(f"Try:     curl -s -F images=@some_digit.png '{url}/v1/classify?model=auto'", flush=True)
        clock.mark("page_serving")
        shown = show_served(gateway.client, read_manifest(repo), set())
        split_moved = first_arms is None
        for step, command in enumerate(then or [], start=1):
            print(f"\nServing; more of the recipe trains meanwhile and is exported into {repo}: {command}", flush=True)
            if subprocess.run(command, shell=True, check=False).returncode != 0:
                print("\nThat part of the recipe failed; what is shown above keeps serving.", flush=True)
                break
            manifest = read_manifest(repo)
            if not wait_until_served(gateway.client, manifest):
                print(f"\nThe new export is not served after {FOLLOW_TIMEOUT_S:.0f} s; see {triton_log}.")
                break
            if not split_moved and ab_arms(manifest) is None:
                move_split_to_student_and_teacher(experiment_file)
                split_moved = True
                clock.mark("student_and_teacher_served")
            if step == len(then):
                clock.mark("everything_served")
            shown = show_served(gateway.client, manifest, shown)
        if rollout and split_moved:
            show_rollout(gateway.url, experiment_file, repo, state)
        elif rollout:
            print(f"\nNo rollout: it moves traffic from the {TEACHER} to the {STUDENT}, and they are not both served.")
        if not once:
            print("Serving; Ctrl-C stops.", flush=True)
            stop = threading.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.set())
            stop.wait()
    return 0


def move_split_to_student_and_teacher(experiment_file: Path) -> None:
    """The gateway's default split between the student and the teacher, as the experiment it follows."""
    from loadtest.stacks.rollout import start_experiment_file

    start_experiment_file(experiment_file, {"control": TEACHER, "candidate": STUDENT, "weights": DEFAULT_AB_WEIGHTS})
    split = ", ".join(f"{arm} {weight:.0%}" for arm, weight in DEFAULT_AB_WEIGHTS.items())
    print(f"\nThe student and the teacher are served: the A/B split is now {split}.", flush=True)


FOLLOW_TIMEOUT_S = 120.0


def show_rollout(url: str, experiment_file: Path, repo: Path, state: Path) -> dict:
    """A short rollout: the student at 25%, 50%, then 100%, each step on 150 samples and 5 s at least."""
    from loadtest.stacks.rollout import RolloutPlan, drive_rollout, steps_table  # Locust, ONNX: only when asked

    plan = RolloutPlan(seconds=180, users=4, steps=(0.25, 0.5, 1.0), min_samples=150, min_duration_s=5, tail_s=5)
    print(
        f"\nRolling the student out under Locust ({plan.users} users, the held-out labels sent back as "
        f"feedback); watch it on {url}/ (Experiment) or {url}/v1/experiment",
        flush=True,
    )
    results = drive_rollout([url], experiment_file, repo, state / "rollout", state / "rollout", plan)
    print(steps_table(results))
    print(
        f"Rollout {results['phase']}: {results['reason']}. Locust: {results['locust']['requests']} requests, "
        f"{results['locust']['failures']} failures. The unhealthy case (a broken student exported mid-rollout, "
        "rolled back to the teacher): make rollout BROKEN=1",
        flush=True,
    )
    return results


def wait_until_served(client: httpx.Client, manifest: Manifest) -> bool:
    """True once the gateway routes by `manifest` (it follows the file) and Triton reports every one of
    its models ready (the gateway switches once the models its routes need are; the others may load later)."""
    wanted = {name: entry.version for name, entry in manifest.models.items()}
    deadline = time.monotonic() + FOLLOW_TIMEOUT_S
    while time.monotonic() < deadline:
        models = client.get("/v1/models").json()["models"]
        if {m["name"]: m["version"] for m in models} == wanted and all(m["ready"] for m in models):
            return True
        time.sleep(1.0)
    return False


def show_served(client: httpx.Client, manifest: Manifest, already: set[str]) -> set[str]:
    """The held-out digits through HTTP for each served model not in `already`; returns all shown."""
    models = [m for m in available(manifest, SHOWN) if m not in already]
    if models:
        labels = digits_gray()[1]
        test = held_out_indices(manifest.split)
        results = {m: classify_all(client, m, test) for m in models}
        # One image per request, for latencies a single user sees.
        single = {m: [classify_all(client, m, [i])[1][0] for i in test[:20]] for m in models}
        _print_side_by_side(test, labels, results, single, manifest)
    return already | set(models)


def _print_side_by_side(test, labels, results, single, manifest) -> None:
    models = list(results)
    show = test[:: max(1, len(test) // 8)][:8]
    position = {int(i): k for k, i in enumerate(test)}
    print("\nHeld-out digits through HTTP (top-1 and its calibrated probability)\n")
    print(f"{'digit #':>8} {'true':>5} " + " ".join(f"{m:>16}" for m in models))
    for i in show:
        top1 = [results[m][0][position[int(i)]] for m in models]
        cells = [f"{p['label']:>6} ({p['probability']:.3f})" for p in top1]
        print(f"{int(i):>8} {labels[i]:>5} " + " ".join(f"{c:>16}" for c in cells))
    print(
        f"\n{'model':>14} {'version':>8} {'served top-1':>13} {'trained top-1':>14} {'p50 ms/req (1 img)':>19} "
        f"{'inference ms':>13} {'decode ms':>10} {'fusion ms':>10}"
    )
    for m in models:
        served = sum(int(p["label"]) == labels[i] for p, i in zip(results[m][0], test, strict=True)) / len(test)
        entry = trained_entry(manifest, m)
        trained = f"{100 * entry.metrics['top1']:.2f}%" if entry and "top1" in entry.metrics else "—"
        lat = sorted(single[m], key=lambda x: x["total_ms"])
        mid = lat[len(lat) // 2]
        # The version that answered (the current one; a candidate on trial answers only as NAME@VERSION).
        version = str(single[m][0].get("version") or "—")
        print(
            f"{m:>14} {version:>8} {100 * served:>12.2f}% {trained:>14} {mid['total_ms']:>19.2f} "
            f"{mid['inference_ms']:>13.2f} {mid['decode_ms']:>10.2f} {mid['fusion_ms']:>10.2f}"
        )
    on_trial = [f"{n}@{e.candidate.version} beside {n} v{e.version}" for n, e in manifest.models.items() if e.candidate]
    if on_trial:
        print(f"Candidate versions on trial (served only to a rollout): {', '.join(on_trial)}")
    print(f"({len(test)} held-out test digits; latencies are the median of 20 single-image requests)")
