"""`python -m loadtest run`: Locust headless against the gateway, with metrics before and after.

Writes into --out: Locust's CSVs (stats, failures, full history) and HTML, the held-out images it
sent, the gateway's and Triton's Prometheus metrics before and after, accuracy.json (top-1 of the
answers under load), and run.json with the load generator's own CPU use, so a saturated client can
be told from a saturated server.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from kdcontract.digits import digit_png_bytes, digits_gray, held_out_indices
from kdcontract.errors import UserError
from kdcontract.manifest import DataSplit
from kdcontract.names import ENSEMBLE, STUDENT, TEACHER, TRITON_ENSEMBLE
from loadtest.clients.perf_analyzer import UnstableMeasurement, measure
from loadtest.clients.stages import parse_stages

ROOT = Path(__file__).resolve().parents[2]
LOCUST_GRACE_S = 120  # past its run time (stop timeout, CSV writing), Locust is stuck
LOCUSTFILE = Path(__file__).with_name("locustfile.py")
# The alias behind each scenario's requests, for the direct (perf_analyzer) figures. The gateway's
# `ensemble` fuses the variants itself; its direct counterpart is Triton's own ensemble.
DIRECT_ALIASES = {
    "student": [("classify student", STUDENT)],
    "teacher": [("classify teacher", TEACHER)],
    "ensemble": [("classify ensemble", TRITON_ENSEMBLE)],
    "compare": [("classify student", STUDENT), ("classify teacher", TEACHER)],
}
SCENARIOS = {
    "student": ["StudentUser"],
    "teacher": ["TeacherUser"],
    "ensemble": ["EnsembleUser"],
    "ab": ["ABUser"],
    "ab_feedback": ["ABFeedbackUser"],  # A/B traffic with the true labels sent back (a rollout's gates)
    "compare": ["StudentUser", "TeacherUser"],  # both at once: half the users each
    "loop": ["LoopUser"],  # A/B traffic under API keys, each labelling its own requests (make loop)
}


def locust_binary() -> Path:
    """Locust lives in its own virtualenv (it cannot share one with nvidia-pytriton's tritonclient pin)."""
    path = Path(os.environ.get("KDSERVE_LOCUST", ROOT / ".venv-locust" / "bin" / "locust"))
    if not path.exists():
        raise UserError(f"{path} not found; run `make setup` (it creates .venv-locust)")
    return path


def write_images(out: Path, split: DataSplit | None) -> Path:
    """The held-out digits of `split` as PNG files, and their labels, for the Locust users to send."""
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    labels = digits_gray()[1]
    mapping = {}
    for index in held_out_indices(split):
        name = f"{int(index):04d}.png"
        (images / name).write_bytes(digit_png_bytes(int(index)))
        mapping[name] = str(labels[index])
    (images / "labels.json").write_text(json.dumps(mapping))
    return images


def warm_up(
    host: str, images: Path, models: list[str], requests: int = 5, headers: dict[str, str] | None = None
) -> None:
    """A few requests per model first, so first-call costs do not land in the measured percentiles.

    A 4xx here is a broken set-up (a model the gateway does not serve, an image it refuses), found before
    minutes of load; 5xx are left to the run, which measures them (and its stop rule acts on them)."""
    sample = sorted(images.glob("*.png"))[0].read_bytes()
    with httpx.Client(base_url=host, timeout=30, headers=headers) as client:
        for model in models:
            for _ in range(requests):
                resp = client.post(f"/v1/classify?model={model}", content=sample, headers={"Content-Type": "image/png"})
                if 400 <= resp.status_code < 500:
                    raise UserError(f"warm-up: {model} answered {resp.status_code}: {resp.text[:200]}")


def scrape(url: str, path: Path) -> None:
    try:
        path.write_text(httpx.get(url, timeout=5).text)
    except httpx.HTTPError as exc:
        path.write_text(f"# unreachable: {exc}\n")


def parse_duration(text: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def run_load(
    host: str,
    scenario: str,
    users: int,
    duration: str,
    out: Path,
    triton_metrics: str | None,
    stages: str | None = None,
    max_fail_ratio: float = 0.01,
    triton_http: str | None = None,
    feedback_url: str | None = None,
    stop_when: Callable[[], bool] | None = None,
    api_key: str | None = None,
    images: Path | None = None,
    env: dict[str, str] | None = None,
) -> dict:
    """Locust against `host`. `api_key`: sent by this function's own calls and by every user (a gateway with
    keys); `images`: a folder of PNGs and labels.json to send (default: the held-out split's digits); `env`:
    more of the Locust users' environment (LoopUser's keys)."""
    out.mkdir(parents=True, exist_ok=True)
    auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    models = _get_json(f"{host}/v1/models", auth)
    if images is None:
        images = write_images(out, DataSplit.model_validate(models["split"]) if models.get("split") else None)
    ab_weights = _get_json(f"{host}/v1/ab/summary", auth)["weights"]
    warm_up(host, images, [m for m in (STUDENT, TEACHER, ENSEMBLE) if m in models["aliases"]], headers=auth)
    scrape(f"{host}/metrics", out / "gateway_metrics_before.txt")
    if triton_metrics:
        scrape(triton_metrics, out / "triton_metrics_before.txt")
    steps = parse_stages(stages)
    seconds = sum(s for s, _ in steps) if steps else parse_duration(duration)
    command = [
        str(locust_binary()),
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        host,
        "-u",
        str(users),
        "-r",
        str(users),
        "-t",
        f"{seconds}s",
        "--stop-timeout",
        "5",
        "--csv",
        str(out / "locust"),
        "--csv-full-history",
        "--html",
        str(out / "locust.html"),
        "--only-summary",
        *SCENARIOS[scenario],
    ]
    env = {
        **os.environ,
        "KDSERVE_IMAGES_DIR": str(images),
        "KDSERVE_OUT": str(out),
        "KDSERVE_MAX_FAIL_RATIO": str(max_fail_ratio),
        "KDSERVE_STAGES": stages or "",
        "KDSERVE_FEEDBACK_URL": feedback_url or host,
        "KDSERVE_API_KEY": api_key or "",
        **(env or {}),
    }
    started = time.perf_counter()
    # The children's CPU time around the run is Locust's own: how hard the load generator itself worked.
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with (out / "locust.log").open("w") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        exit_code = _wait_for_locust(proc, seconds, stop_when, out)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    generator_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    scrape(f"{host}/metrics", out / "gateway_metrics_after.txt")
    if triton_metrics:
        scrape(triton_metrics, out / "triton_metrics_after.txt")
    summary = {
        "host": host,
        "scenario": scenario,
        "user_classes": SCENARIOS[scenario],
        "users": users,
        "stages": stages,
        "seconds": seconds,
        "wall_seconds": round(wall, 2),
        "locust_exit_code": exit_code,
        "generator_cpu_seconds": round(generator_cpu, 2),
        "generator_cpu_share_of_one_core": round(generator_cpu / wall, 3),
        "cores": os.cpu_count(),
        "manifest_top1": {m["name"]: m["top1"] for m in models["models"]},
        "aliases": models["aliases"],
    }
    if triton_http:
        targets = direct_targets(scenario, models["aliases"], ab_weights)
        summary["perf_analyzer"] = triton_direct(
            triton_http, targets, users, stages, out, models["models"][0]["input_shape"][0]
        )
    (out / "run.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _wait_for_locust(proc: subprocess.Popen, seconds: int, stop_when: Callable[[], bool] | None, out: Path) -> int:
    """Locust's exit code once it ends by itself, or once `stop_when()` holds (SIGTERM: Locust stops its
    users and writes its CSVs as at the end of its run time)."""
    deadline = time.monotonic() + seconds + LOCUST_GRACE_S
    stopping = False
    while True:
        try:
            return proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise UserError(f"Locust ran {LOCUST_GRACE_S} s past its {seconds} s; see {out / 'locust.log'}")
        if not stopping and stop_when is not None and stop_when():
            proc.terminate()
            stopping = True


def _get_json(url: str, headers: dict[str, str] | None = None) -> dict:
    response = httpx.get(url, headers=headers, timeout=10)
    if response.status_code != 200:
        raise UserError(f"{url} answered {response.status_code}: {response.text[:200]}")
    return response.json()


def direct_targets(scenario: str, aliases: dict[str, str], ab_weights: dict[str, float]) -> list[dict]:
    """The Triton models behind a scenario's requests, each with the share of the users that reach it.

    A/B traffic reaches both arms in proportion to their weights, so both arms are measured directly;
    users of a scenario with several user classes split evenly between them.
    """
    if scenario == "ab":
        pairs = [("classify auto", arm, share) for arm, share in ab_weights.items()]
    else:
        pairs = [(request, alias, 1 / len(DIRECT_ALIASES[scenario])) for request, alias in DIRECT_ALIASES[scenario]]
    return [
        {"request": request, "alias": alias, "model": aliases.get(alias, alias), "share": share}
        for request, alias, share in pairs
    ]


def model_concurrency(users: int, share: float) -> int:
    return max(1, round(users * share))


def triton_direct(
    triton_http: str, targets: list[dict], users: int, stages: str | None, out: Path, size: int
) -> list[dict]:
    """perf_analyzer on the same Triton models at the concurrency each saw during the Locust steps."""
    steps = sorted({u for _, u in parse_stages(stages)}) or [users]
    results = []
    for target in targets:
        model = target["model"]
        levels = sorted({model_concurrency(u, target["share"]) for u in steps})
        rows, unstable = [], []
        for level in levels:
            try:
                rows += measure(triton_http, model, size, [level], out / f"perf_analyzer_{model}_c{level}.csv", 3000)
            except UnstableMeasurement:
                # Recorded, not fatal: the Locust figures stand on their own; the report says what is missing.
                unstable.append(level)
        results.append({**target, "per_model_concurrency": levels, "rows": rows, "unstable": unstable})
    return results
