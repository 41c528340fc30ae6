"""`python -m loadtest rollout`: a student rollout on the real stack under Locust, with feedback.

A scratch copy of the repository's student and teacher, served by Triton (polling the copy) and two
gateway replicas that follow one experiment file and share one answer store; the rollout controller
(in this process) reads both replicas' /metrics; Locust sends the held-out digits to one replica as A/B
traffic and their true labels as feedback to the other. With `--break-student`, a broken version of the
student (its classes shifted by one, as a label-order bug at export would do) is exported into the copy
once the first step runs: the controller must roll back to the teacher, with no request failed.

Writes rollout.json and rollout.md: every step with the figures that decided it, the verdicts'
intervals next to the offline figures (test-split top-1 from the manifest; latency from `make bench`
when its results are there), the requests, failures and 5xx of the whole run, and the CPU.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from gateway.files import write_whole
from gateway.process import GatewayProcess, free_port
from gateway.triton.server import EmbeddedTriton, TritonPorts
from kdcontract.machine import cpu_description
from kdcontract.manifest import read_manifest, write_manifest
from kdcontract.names import STUDENT, STUDENT_KD, TEACHER
from kdcontract.tables import markdown_table
from kdcontract.versions import config_loading, replace_file
from loadtest.clients.measure import metric_value
from loadtest.clients.run import run_load

POLL_S = 0.5  # the replicas' experiment and manifest polls
TICK_S = 1.0  # the controller's evaluation interval
GATES = {"latency": {"quantile": 0.5, "max_ratio": 2.0}, "min_agreement": 0.9, "max_top1_drop": 0.03}


def scratch_repository(repo: Path, into: Path) -> Path:
    """The student and the teacher of `repo`, with a manifest of just those two, in `into`."""
    for name in (STUDENT_KD, TEACHER):
        shutil.copytree(repo / name, into / name, ignore=shutil.ignore_patterns("__pycache__"))
    manifest = read_manifest(repo)
    manifest.models = {n: manifest.models[n] for n in (STUDENT_KD, TEACHER)}
    write_manifest(into, manifest)
    return into


def shift_classes(model: Path) -> None:
    """Rewrite an ONNX classifier so its logits come out shifted by one class (a digit's answer is the
    next digit): a version broken at export, as a label-order bug would break it."""
    import onnx
    from onnx import helper, numpy_helper

    graph = onnx.load(model)
    output = graph.graph.output[0].name
    classes = graph.graph.output[0].type.tensor_type.shape.dim[1].dim_value
    for node in graph.graph.node:
        node.output[:] = [f"{output}_unshifted" if o == output else o for o in node.output]
    order = numpy_helper.from_array(np.roll(np.arange(classes), 1).astype(np.int64), name="shifted_order")
    graph.graph.initializer.append(order)
    graph.graph.node.append(helper.make_node("Gather", [f"{output}_unshifted", "shifted_order"], [output], axis=1))
    onnx.checker.check_model(graph)
    onnx.save(graph, model)


def export_broken_student(repo: Path) -> int:
    """A new version of the student, shifted, written beside the served one and then named in the manifest
    as the current version, as `training export --promote` would (Triton polling the repository loads it; the
    gateways switch once it is ready): the mistake this simulates skips the candidate's trial."""
    manifest = read_manifest(repo)
    entry = manifest.models[STUDENT_KD]
    version = entry.version + 1
    staging = repo / STUDENT_KD / f".{version}"
    shutil.copytree(repo / STUDENT_KD / str(entry.version), staging, ignore=shutil.ignore_patterns("__pycache__"))
    shift_classes(staging / "model.onnx")
    staging.rename(repo / STUDENT_KD / str(version))
    config = repo / STUDENT_KD / "config.pbtxt"
    replace_file(config, config_loading(config, [version]))  # as an export writes it: Triton loads this one
    entry.version = version
    write_manifest(repo, manifest)
    return version


def rollout_experiment(steps: list[float], min_samples: int, min_duration_s: float, shadow: float) -> dict:
    """The experiment file's JSON (the gateways validate it: a bad one is refused and logged)."""
    return {
        "control": TEACHER,
        "candidate": STUDENT,
        "weights": {STUDENT: 0.0, TEACHER: 1.0},
        "shadow_fraction": shadow,
        "gates": GATES,
        "rollout": {"enabled": True, "steps": steps, "min_samples": min_samples, "min_duration_s": min_duration_s},
    }


def read_file(path: Path) -> dict:
    return json.loads(path.read_text())


def rollout_state(path: Path) -> dict:
    """The controller's part of the experiment file (none until its first tick)."""
    return read_file(path).get("state", {"phase": "off", "step_started_at": None})


def start_experiment_file(path: Path, experiment: dict) -> None:
    """Written aside and renamed into place: a replica polling it reads the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_whole(path, json.dumps(experiment, indent=2) + "\n")


def start_controller(experiment_file: Path, gateways: list[str], events_file: Path, log: Path) -> subprocess.Popen:
    """`python -m gateway rollout` reading every replica's /metrics (as alone, without Prometheus)."""
    command = [sys.executable, "-m", "gateway", "rollout", "--experiment-file", str(experiment_file)]
    for url in gateways:
        command += ["--metrics-url", f"{url}/metrics"]
    command += ["--interval", str(TICK_S), "--events", str(events_file)]
    with log.open("w") as handle:
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)


@dataclass(frozen=True)
class RolloutPlan:
    seconds: int = 240  # Locust's run time at most: the rollout must end within it
    tail_s: float = 10.0  # traffic kept up after the rollout ended (the promoted or rolled-back split)
    users: int = 4
    steps: tuple[float, ...] = (0.1, 0.5, 1.0)
    min_samples: int = 300
    min_duration_s: float = 10.0
    shadow: float = 1.0


def run_rollout(
    repo: Path,
    out: Path,
    plan: RolloutPlan,
    break_student: bool = False,
    bench: Path | None = None,
    work: Path = Path("runs/rollout"),
) -> dict:
    """The rollout on a stack of its own in `work` (a scratch copy of the repository, Triton polling it,
    two gateway replicas following one experiment file and sharing one answer store); results in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    scratch = scratch_repository(repo, work / "repo")
    experiment_file = work / "experiment.json"
    env = {
        "KDSERVE_EXPERIMENT_FILE": str(experiment_file),
        "KDSERVE_EXPERIMENT_POLL_S": str(POLL_S),
        "KDSERVE_MANIFEST_POLL_S": str(POLL_S),
        "KDSERVE_ANSWERS_DIR": str(work / "answers"),
    }
    ports = TritonPorts(free_port(), free_port(), free_port())
    poll = ["--model-control-mode=poll", "--repository-poll-secs=1"]
    with EmbeddedTriton(scratch, ports, log_file=work / "triton.log", extra_args=poll) as triton:
        replicas = [GatewayProcess(scratch, triton.http_url, env=env, ready_path="/readyz") for _ in range(2)]
        try:
            breaker = _Breaker(scratch, experiment_file) if break_student else None
            urls = [gw.url for gw in replicas]
            results = drive_rollout(urls, experiment_file, repo, out, work, plan, bench, breaker)
        finally:
            for gw in replicas:
                gw.stop()
    return results


def drive_rollout(
    gateways: list[str],
    experiment_file: Path,
    repo: Path,
    out: Path,
    work: Path,
    plan: RolloutPlan,
    bench: Path | None = None,
    breaker: _Breaker | None = None,
) -> dict:
    """Starts a rollout in `experiment_file` (which the `gateways` follow), runs the controller on their
    summed /metrics and Locust against the first gateway (feedback to the last) until the rollout ended
    (at most `plan.seconds`), and writes what happened into `out` (Locust's own files into `work`). The
    demo calls this with its own gateway."""
    name = "rollout-broken" if breaker else "rollout"
    events_file = out / f"{name}-events.jsonl"
    events_file.unlink(missing_ok=True)
    start_experiment_file(
        experiment_file, rollout_experiment(list(plan.steps), plan.min_samples, plan.min_duration_s, plan.shadow)
    )
    work.mkdir(parents=True, exist_ok=True)
    controller = start_controller(experiment_file, gateways, events_file, work / f"{name}-controller.log")
    if breaker is not None:
        breaker.start(gateways)
    started = time.time()
    ended: list[float] = []

    def finished() -> bool:
        if not ended and rollout_state(experiment_file)["phase"] in ("promoted", "rolled_back"):
            ended.append(time.monotonic())
        return bool(ended) and time.monotonic() - ended[0] >= plan.tail_s

    try:
        load = run_load(
            gateways[0],
            "ab_feedback",
            plan.users,
            f"{plan.seconds}s",
            work / f"{name}-locust",
            None,
            max_fail_ratio=1.0,  # the run is measured whole: a failure is a finding, not a reason to stop
            feedback_url=gateways[-1],
            stop_when=finished,
        )
    finally:
        controller.terminate()
        controller.wait(timeout=30)
    texts = [httpx.get(f"{url}/metrics", timeout=10).text for url in gateways]
    served = httpx.get(f"{gateways[0]}/v1/models", timeout=10).json()["models"]
    final = read_file(experiment_file)
    state = final.pop("state")
    results = {
        "cpu": cpu_description(),
        "case": "broken student" if breaker else "healthy student",
        "replicas": len(gateways),
        "seconds": load["wall_seconds"],
        "users": plan.users,
        "experiment": final,
        "versions": {m["name"]: m["version"] for m in served},
        "phase": state["phase"],
        "reason": state["reason"],
        "events": state["history"],
        "requests": request_counts(texts),
        "locust": {"exit_code": load["locust_exit_code"], **locust_totals(work / f"{name}-locust")},
        "offline": offline_figures(repo, bench),
    }
    if breaker is not None:
        results["broken"] = breaker.timeline(started, state["history"])
    (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown(results))
    return results


class _Breaker:
    """Exports the broken student once the rollout's first step has run a few seconds, then times what
    follows from the gateways' side (in its own thread): when every replica serves the broken version
    (their manifest switch), and when every replica routes to the control again after the rollback."""

    def __init__(self, repo: Path, experiment_file: Path) -> None:
        self.repo, self.experiment_file = repo, experiment_file
        self.times: dict[str, float] = {}

    def start(self, gateways: list[str]) -> None:
        threading.Thread(target=self._run, args=(gateways,), daemon=True).start()

    def _run(self, gateways: list[str]) -> None:
        deadline = time.time() + 120
        while time.time() < deadline:
            state = rollout_state(self.experiment_file)
            if state["phase"] == "running" and time.time() - (state["step_started_at"] or time.time()) > 3:
                export_broken_student(self.repo)
                self.times["exported"] = time.time()
                break
            time.sleep(0.2)
        self._until(
            gateways,
            lambda url: (
                metric_value(
                    httpx.get(f"{url}/metrics").text, "kdserve_manifest_reloads_total", {"outcome": "switched"}
                )
                >= 1
            ),
            "served",
            deadline,
        )
        self._until(
            gateways,
            lambda url: httpx.get(f"{url}/v1/experiment").json()["experiment"]["weights"][STUDENT] == 0,
            "replicas_on_control",
            deadline,
        )

    def _until(self, gateways: list[str], holds, name: str, deadline: float) -> None:
        while time.time() < deadline:
            if all(holds(url) for url in gateways):
                self.times[name] = time.time()
                return
            time.sleep(0.05)

    def timeline(self, started: float, history: list[dict]) -> dict:
        rolled = next((e["at"] for e in history if e["event"] == "rolled_back"), None)
        t = self.times | ({"rolled_back": rolled} if rolled else {})

        def between(a: str, b: str) -> float | None:
            return round(t[b] - t[a], 2) if a in t and b in t else None

        return {
            "exported_after_start_s": round(t["exported"] - started, 2) if "exported" in t else None,
            "served_after_export_s": between("exported", "served"),
            "rolled_back_after_served_s": between("served", "rolled_back"),
            "replicas_on_control_after_rollback_s": between("rolled_back", "replicas_on_control"),
        }


def request_counts(texts: list[str]) -> dict:
    """Classification requests over both replicas, by status class (the gateways' own counters)."""
    from prometheus_client.parser import text_string_to_metric_families

    by_status: dict[str, float] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "kdserve_requests_total" and s.labels.get("route") in ("/v1/classify", "/v1/feedback"):
                    key = f"{s.labels['route']} {s.labels['status'][0]}xx"
                    by_status[key] = by_status.get(key, 0) + s.value
    feedback = {
        outcome: sum(metric_value(t, "kdserve_feedback_total", {"outcome": outcome}) for t in texts)
        for outcome in ("accepted", "unknown", "expired", "duplicate", "invalid_label")
    }
    return {
        "by_status": {k: int(v) for k, v in sorted(by_status.items())},
        "feedback": {k: int(v) for k, v in feedback.items()},
    }


def locust_totals(run_dir: Path) -> dict:
    import csv

    with (run_dir / "locust_stats.csv").open() as handle:
        rows = {row["Name"]: row for row in csv.DictReader(handle)}
    total = rows.get("Aggregated", {})
    return {"requests": int(total.get("Request Count", 0)), "failures": int(total.get("Failure Count", 0))}


def offline_figures(repo: Path, bench_results: Path | None) -> dict:
    metrics = {n: m.metrics for n, m in read_manifest(repo).models.items()}
    figures = {
        "top1_student": metrics[STUDENT_KD]["top1"],
        "top1_teacher": metrics[TEACHER]["top1"],
        "top1_difference": metrics[STUDENT_KD]["top1"] - metrics[TEACHER]["top1"],
        "source_top1": "the manifest (test split, in-process)",
    }
    if bench_results is not None and bench_results.is_file():
        latency = json.loads(bench_results.read_text()).get("latency_c1", {})
        if "student" in latency and "teacher" in latency:
            student, teacher = latency["student"]["gateway"]["p50_ms"], latency["teacher"]["gateway"]["p50_ms"]
            figures |= {"latency_p50_ratio": student / teacher, "source_latency": f"{bench_results} (gateway, c=1)"}
    return figures


def markdown(results: dict) -> str:
    lines = [
        f"# Rollout of the student: {results['case']}",
        "",
        f"CPU: {results['cpu']}. {results['users']} Locust users for {results['seconds']:.0f} s against "
        + (
            "one of two gateway replicas, the true labels sent as feedback to the other; the controller read both "
            "replicas' /metrics"
            if results["replicas"] > 1
            else "the gateway, the true labels sent back as feedback; the controller read its /metrics"
        )
        + f" every {TICK_S:g} s. Versions at the end: "
        + ", ".join(f"{name} v{version}" for name, version in results.get("versions", {}).items())
        + f". Outcome: **{results['phase']}** ({results['reason']}).",
        "",
        "## Steps",
        "",
    ]
    lines += [steps_table(results), ""]
    offline = results["offline"]
    if "broken" not in results:  # the broken student's figures are not the offline model's
        lines += served_beside_offline(results["events"], offline)

    requests = results["requests"]
    lines += [
        "## Traffic",
        "",
        f"Requests by status (both replicas): {requests['by_status']}. Feedback: {requests['feedback']}. "
        f"Locust: {results['locust']['requests']} requests, {results['locust']['failures']} failures.",
        "",
    ]
    if "broken" in results:
        b = results["broken"]
        lines += [
            f"The broken student was exported {b['exported_after_start_s']} s into the run; every replica served it "
            f"{b['served_after_export_s']} s later (Triton's repository poll, then the gateways' manifest switch); "
            f"the controller rolled back {b['rolled_back_after_served_s']} s after that (ticking every {TICK_S:g} s, "
            "once the wrong answers had pushed a gate's interval past its threshold), and every replica routed "
            f"to the teacher {b['replicas_on_control_after_rollback_s']} s after the rollback (their experiment "
            f"poll, every {POLL_S:g} s).",
            "",
        ]
    return "\n".join(lines)


def served_beside_offline(events: list[dict], offline: dict) -> list[str]:
    lines = ["## Served figures beside the offline ones", ""]
    last = next((e for e in reversed(events) if e["verdicts"]), None)
    rows = []
    for gate in last["verdicts"] if last else []:
        if gate["gate"] in offline:  # the gates named as the offline figures: top1_difference, latency_p50_ratio
            low, high = gate["interval"][0], gate["interval"][1]
            figure = offline[gate["gate"]]
            inside = low <= figure <= (high if high is not None else float("inf"))
            rows.append([gate["gate"], _interval(gate), f"{figure:.4g}", "yes" if inside else "**no**"])
    lines += [
        markdown_table(["figure (last judged step)", "served interval", "offline", "inside"], rows, "l r r l"),
        "",
    ]
    return lines


def steps_table(results: dict) -> str:
    rows = []
    for event in results["events"]:
        gates = "; ".join(f"{g['gate']} {g['status']} ({_interval(g)}, n={g['samples']})" for g in event["verdicts"])
        rows.append([event["event"], event["step"], f"{event['weight']:.0%}", gates or "-"])
    return markdown_table(["event", "step", "student weight", "gates at the decision"], rows, "l r r l")


def _interval(gate: dict) -> str:
    low, high = gate["interval"]
    return f"[{low:.3g}, {'inf' if high is None else f'{high:.3g}'}]"
