"""`python -m loadtest loop`: served traffic becomes a better student, measured at each step.

On the few-labels digits (63 labels; the teacher and the plain student that `make fewlabels` trained):
1. serve: a copy of that run's repository (Triton polling it), a gateway capturing every request;
2. traffic: a client sends the recipe's unlabelled training digits (the images the offline KD student
   learnt from) through the gateway to the plain student, each in a client form drawn at random (sizes,
   filters, PNG/JPEG, polarity, canvases), one image a request, several clients at once;
3. the gateway is stopped (SIGTERM: its open capture segment is written whole) and the capture counted;
4. re-distil: `python -m training redistill` trains a KD student from the teacher on the labelled split
   and the capture, and exports it as a new version of `student_kd` into the served repository;
5. compare: once Triton has loaded the new version, a new gateway (capture off, so the held-out images
   never join a capture) serves the held-out test split to the old and the new student by name, and
   then as an A/B experiment (the old student the control, the new one the candidate, every request
   shadowed, true labels sent as feedback) whose verdict comes from the gateway's own statistics.

Writes `results.json` and `results.md` (the offline KD student of `make fewlabels` beside it, the CPU,
and the seconds of every step).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import yaml

from gateway.files import write_whole
from gateway.process import GatewayProcess, free_port
from gateway.triton.server import EmbeddedTriton, TritonPorts
from kdcontract.capture import capture_files, read_capture
from kdcontract.client_forms import ClientForm, random_form, render
from kdcontract.digits import digits_gray, labelled_positions, split_indices
from kdcontract.errors import UserError
from kdcontract.manifest import read_manifest
from kdcontract.names import STUDENT, STUDENT_KD, STUDENT_PLAIN, TEACHER
from kdcontract.tables import markdown_table
from loadtest.benchmarks.bench import cpu_description
from loadtest.clients.measure import metric_value
from loadtest.clients.served_accuracy import held_out, top1_through_gateway

CLIENTS = 4  # concurrent clients sending the traffic
POLL_S = 1.0  # Triton's repository poll
READY_TIMEOUT_S = 120.0


def traffic_indices(run: Path, split) -> np.ndarray:
    """Indices (into sklearn's digits) of the few-labels recipe's unlabelled training images: what the
    offline KD student learnt from, and what the loop's client sends."""
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    labels = digits_gray()[1]
    train_idx = split_indices(labels, split, with_test=True)[0]
    kept = labelled_positions(labels[train_idx], recipe["data"]["labelled_fraction"], split.seed)
    return train_idx[~kept]


def send_traffic(url: str, digits: np.ndarray, model: str, seed: int = 0) -> tuple[list[int], float]:
    """Every digit once, in a random client form, from CLIENTS clients at once; the answers' top-1 and
    the seconds it took."""
    rng = np.random.default_rng(seed)
    forms: list[ClientForm] = [random_form(rng) for _ in digits]
    bodies = [(render(d, f), f"image/{f.encoding.lower()}") for d, f in zip(digits, forms, strict=True)]

    def send(chunk: list[int]) -> list[tuple[int, int]]:
        answers = []
        with httpx.Client(base_url=url, timeout=60) as client:
            for i in chunk:
                body, content_type = bodies[i]
                resp = client.post(
                    f"/v1/classify?model={model}&top_k=1", content=body, headers={"Content-Type": content_type}
                )
                if resp.status_code != 200:
                    raise RuntimeError(f"traffic image {i}: HTTP {resp.status_code}: {resp.text[:300]}")
                answers.append((i, int(resp.json()["predictions"][0]["top_k"][0]["label"])))
        return answers

    started = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        chunks = [list(range(k, len(digits), CLIENTS)) for k in range(CLIENTS)]
        answered = dict(pair for part in pool.map(send, chunks) for pair in part)
    return [answered[i] for i in range(len(digits))], time.perf_counter() - started


def wait_for_version(triton_url: str, model: str, version: int) -> float:
    """Seconds until Triton (polling the repository) has `version` of `model` ready."""
    started = time.monotonic()
    while time.monotonic() - started < READY_TIMEOUT_S:
        try:
            if httpx.get(f"{triton_url}/v2/models/{model}/versions/{version}/ready", timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"Triton did not load {model} version {version} within {READY_TIMEOUT_S:.0f}s")


def ab_experiment() -> dict:
    """The old student the control, the new one the candidate, half the traffic each, every request
    answered by both (shadow), judged on feedback labels: the candidate at most 0 points worse."""
    return {
        "control": STUDENT_PLAIN,
        "candidate": STUDENT,
        "weights": {STUDENT_PLAIN: 0.5, STUDENT: 0.5},
        "shadow_fraction": 1.0,
        "gates": {"max_top1_drop": 0.0},
        "rollout": {"enabled": False, "min_samples": 100, "min_duration_s": 0},
    }


def run_ab(gateway: GatewayProcess, digits: np.ndarray, labels: np.ndarray) -> dict:
    """The held-out split as A/B traffic (a client key per image), its true labels as feedback; the
    gateway's own per-arm top-1 and verdict, with their intervals."""
    client = gateway.client
    feedback = []
    for i, digit in enumerate(digits):
        body = render(digit, ClientForm())
        resp = client.post(
            "/v1/classify?model=auto", content=body, headers={"Content-Type": "image/png", "X-Client-Key": f"c{i}"}
        )
        if resp.status_code != 200:
            raise RuntimeError(f"A/B image {i}: HTTP {resp.status_code}: {resp.text[:300]}")
        feedback.append({"request_id": resp.headers["x-request-id"], "label": str(labels[i])})
    time.sleep(0.5)  # the shadows' answers land beside the primaries' (the pairs count when both are there)
    results = client.post("/v1/feedback", json=feedback).json()
    accepted = sum(1 for r in results["results"] if r["status"] == 200)
    body = client.get("/v1/experiment").json()
    arms = {arm: {"requests": a["requests"], "top1": a["top1"]} for arm, a in body["this_replica"]["arms"].items()}
    return {"images": len(digits), "feedback_accepted": accepted, "arms": arms, "verdict": body["this_replica"]["step"]}


def run_loop(fewlabels_run: Path, repo: Path, out: Path, work: Path, seeds: list[int]) -> dict:
    """The whole loop on a stack of its own in `work`; results in `out`."""
    for needed in (fewlabels_run / "results.json", repo / "manifest.json"):
        if not needed.is_file():
            raise UserError(f"{needed} not found: train and export the few-labels recipe first (make fewlabels)")
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    shutil.rmtree(work, ignore_errors=True)
    served = work / "repo"
    shutil.copytree(repo, served, ignore=shutil.ignore_patterns("__pycache__"))
    manifest = read_manifest(served)
    before_version = manifest.models[STUDENT_KD].version
    traffic = traffic_indices(fewlabels_run, manifest.split)
    digits, true_labels = digits_gray()[0][traffic], digits_gray()[1][traffic]  # the labels: the report's only
    capture = work / "capture"
    ports = TritonPorts(free_port(), free_port(), free_port())
    poll = ["--model-control-mode=poll", f"--repository-poll-secs={POLL_S:g}"]
    with EmbeddedTriton(served, ports, log_file=work / "triton.log", extra_args=poll) as triton:
        capture_env = {
            "KDSERVE_CAPTURE_FRACTION": "1.0",
            "KDSERVE_CAPTURE_DIR": str(capture),
            "KDSERVE_CAPTURE_SEGMENT_S": "2",
        }
        with GatewayProcess(served, triton.http_url, env=capture_env, ready_path="/readyz") as gateway:
            answered, seconds["traffic"] = send_traffic(gateway.url, digits, STUDENT_PLAIN)
            metrics = gateway.client.get("/metrics").text
        dropped = metric_value(metrics, "kdserve_capture_dropped_total", {"reason": "queue_full"})
        captured = read_capture(capture_files(str(capture)))
        print(f"[loop] traffic: {len(digits)} images in {seconds['traffic']:.1f}s; captured {len(captured.images)}")

        t = time.perf_counter()
        redistill_out = work / "redistill"
        command = [sys.executable, "-m", "training", "redistill", "--run", str(fewlabels_run)]
        command += ["--capture", str(capture), "--repo", str(served), "--out", str(redistill_out)]
        command += ["--against", STUDENT_PLAIN, "--served-as", STUDENT_KD, "--seeds", *map(str, seeds)]
        subprocess.run(command, check=True)
        seconds["redistill_and_export"] = time.perf_counter() - t
        redistilled = json.loads((redistill_out / "redistill.json").read_text())
        new_version = redistilled["export"]["versions"][STUDENT_KD]
        seconds["triton_loaded_new_version"] = wait_for_version(f"http://{triton.http_url}", STUDENT_KD, new_version)

        t = time.perf_counter()
        test_digits, test_labels = held_out(manifest.split)
        experiment_file = work / "experiment.json"
        write_whole(experiment_file, json.dumps(ab_experiment(), indent=2) + "\n")
        env = {"KDSERVE_EXPERIMENT_FILE": str(experiment_file), "KDSERVE_ANSWERS_DIR": str(work / "answers")}
        with GatewayProcess(served, triton.http_url, env=env, ready_path="/readyz") as gateway:
            versions = {m["name"]: m["version"] for m in gateway.client.get("/v1/models").json()["models"]}
            served_top1 = {
                name: top1_through_gateway(gateway.client, name, ClientForm(), test_digits, test_labels)
                for name in (STUDENT_PLAIN, STUDENT, TEACHER)
            }
            ab = run_ab(gateway, test_digits, test_labels)
        seconds["compare"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - started

    offline = json.loads((fewlabels_run / "results.json").read_text())["seed_study"]
    results = {
        "cpu": cpu_description(),
        "seeds": seeds,
        "traffic": {
            "images": len(digits),
            "clients": CLIENTS,
            "captured": len(captured.images),
            "dropped": int(dropped),
            "skipped_files": len(captured.skipped),
            "served_top1_on_traffic": float(np.mean(np.asarray(answered) == true_labels)),
        },
        "served_before": {
            "model": STUDENT_PLAIN,
            "version": versions.get(STUDENT_PLAIN),
            "top1": served_top1[STUDENT_PLAIN],
            "offline_top1_seeds_mean": offline[STUDENT_PLAIN]["mean"],
        },
        "redistilled": {
            "model": STUDENT_KD,
            "version_before": before_version,
            "version": new_version,
            "start": redistilled["redistilled"]["start"],
            "epochs": redistilled["redistilled"]["epochs"],
            "top1": redistilled["redistilled"]["top1"],
            "std": redistilled["redistilled"]["std"],
            "per_seed": redistilled["redistilled"]["per_seed"],
            "served_top1": served_top1[STUDENT],
            "exported_seed": redistilled["redistilled"]["exported_seed"],
            "labelled_images": redistilled["labelled_images"],
            "captured_images": redistilled["captured_images"],
        },
        "offline_kd": {
            "top1": offline[STUDENT_KD]["mean"],
            "std": offline[STUDENT_KD]["std"],
            "per_seed": offline[STUDENT_KD]["top1"],
            "seeds": offline["seeds"],
        },
        "teacher": {"served_top1": served_top1[TEACHER]},
        "ab": ab,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    results["redistilled_minus_offline_kd_points"] = 100 * (
        results["redistilled"]["top1"] - results["offline_kd"]["top1"]
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    return results


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.2%}"


def markdown(r: dict) -> str:
    before, new, offline, traffic = r["served_before"], r["redistilled"], r["offline_kd"], r["traffic"]
    s = r["seconds"]
    steps = [
        ["traffic through the gateway, captured", f"{s['traffic']:.1f}",
         f"{traffic['images']} images, {traffic['clients']} clients; captured {traffic['captured']}, "
         f"dropped {traffic['dropped']}; the plain student answered {_pct(traffic['served_top1_on_traffic'])} right"],
        ["re-distilled and exported", f"{s['redistill_and_export']:.1f}",
         f"{len(r['seeds'])} seed(s) {r['seeds']}, each from {new['start']}, {new['epochs']} epochs; "
         f"{STUDENT_KD} version {new['version_before']} -> {new['version']}"],
        ["Triton loaded the new version", f"{s['triton_loaded_new_version']:.1f}", f"polling every {POLL_S:g}s"],
        ["compared through the gateway", f"{s['compare']:.1f}", "by name, then A/B with feedback"],
    ]  # fmt: skip
    models = [
        [f"served before: {before['model']} ({new['labelled_images']} labels, no teacher)", _pct(before["top1"]),
         f"{_pct(before['offline_top1_seeds_mean'])} (mean of seeds {offline['seeds']})"],
        [f"re-distilled from the capture: {STUDENT_KD} v{new['version']} (seed {new['exported_seed']})",
         _pct(new["served_top1"]), f"{_pct(new['top1'])} (mean of seeds {r['seeds']}, std {100 * new['std']:.2f} pt)"],
        ["offline KD student (`make fewlabels`)", "—",
         f"{_pct(offline['top1'])} (mean of seeds {offline['seeds']}, std {100 * offline['std']:.2f} pt)"],
        ["teacher", _pct(r["teacher"]["served_top1"]), "—"],
    ]  # fmt: skip
    arms = [
        [arm, str(a["requests"]), str(a["top1"]["labelled"]), _pct(a["top1"]["estimate"]),
         f"[{a['top1']['interval'][0]:.1%}, {a['top1']['interval'][1]:.1%}]"]
        for arm, a in r["ab"]["arms"].items()
    ]  # fmt: skip
    verdict = r["ab"]["verdict"]
    per_seed = ", ".join(f"seed {p['seed']}: {p['top1']:.2%}" for p in new["per_seed"])
    offline_seeds = ", ".join(f"seed {s}: {t:.2%}" for s, t in zip(offline["seeds"], offline["per_seed"], strict=True))
    return (
        "\n".join(
            [
                "# The loop: served traffic -> capture -> re-distillation -> a new version, compared",
                "",
                f"CPU: {r['cpu']}. Whole loop {s['total']:.0f}s (`make loop`; the teacher and the plain student are "
                "`make fewlabels`'s). Top-1 on the held-out test split (270 digits, 8x8 PNG), through the gateway.",
                "",
                markdown_table(["step", "seconds", "what happened"], steps, "l r l"),
                "",
                markdown_table(["model", "served top-1", "in-process top-1"], models, "l r l"),
                "",
                f"Re-distilled per seed: {per_seed}. Offline KD per seed: {offline_seeds}. Re-distilled minus offline "
                "KD (means): "
                f"{r['redistilled_minus_offline_kd_points']:+.2f} points.",
                "",
                f"A/B through the gateway ({STUDENT_PLAIN} control, {STUDENT} = the new {STUDENT_KD} candidate, every "
                "request shadowed, true labels as feedback; intervals: the gateway's 95% confidence sequences):",
                "",
                markdown_table(["arm", "requests", "labelled", "top-1", "interval"], arms),
                "",
                f"Verdict on 'the candidate at most 0 points worse than the control': **{verdict['status']}** "
                f"({verdict.get('reason', '')}).",
            ]
        )
        + "\n"
    )
