"""`python -m gateway experiment-cost`: what `GET /v1/experiment` costs once a replica has counted a
million requests per arm, and how long it holds the event loop (for `make bench`).

The app is the real one (`create_app`, the repository's manifest, its routes and middleware); its
latency histograms are filled with `--samples` observations per arm drawn from a log-normal around the
student's and the teacher's latencies, with shadow and feedback counts to match, and the route is called
through ASGI with the experiment's three gates set. A task ticking every millisecond on the same loop
records the longest gap between its ticks: how long the loop was held. No Triton is needed: the route
reads this replica's counts only.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import numpy as np

from gateway.app.factory import create_app
from gateway.experiments.spec import parse_experiment
from gateway.serving.experiment import apply_experiment
from gateway.settings import GatewaySettings

ROUTE = "/v1/classify"
ARMS = {"student": ("student_kd", 0.004), "teacher": ("teacher", 0.009)}  # arm -> (model, median seconds)


def _fill(app, samples: int, seed: int) -> None:
    metrics, rng = app.state.metrics, np.random.default_rng(seed)
    for arm, (model, median) in ARMS.items():
        latencies = rng.lognormal(np.log(median), 0.35, samples)
        histogram = metrics.request_seconds.labels(ROUTE, model, arm, "200")
        for value in latencies:  # through the client's own observe(): the buckets as serving fills them
            histogram.observe(float(value))
        metrics.shadow.labels(arm, "true").inc(samples * 0.98)
        metrics.shadow.labels(arm, "false").inc(samples * 0.02)
        metrics.feedback_top1.labels(arm, "true").inc(samples * 0.09)
        metrics.feedback_top1.labels(arm, "false").inc(samples * 0.01)


async def _measure(app, reads: int) -> dict:
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last - 0.001)
            last = now

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    quiet_gap = max(gaps, default=0.0)
    latencies = []
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        # One read first, not measured: the first request through an app builds what FastAPI and pydantic
        # build lazily (the same on a gateway: its first request of a route).
        started = time.perf_counter()
        (await client.get("/v1/experiment")).raise_for_status()
        first_ms = (time.perf_counter() - started) * 1000
        await asyncio.sleep(0.05)
        first_gap = max(gaps, default=0.0)
        gaps.clear()
        for _ in range(reads):
            start = time.perf_counter()
            answer = await client.get("/v1/experiment")
            latencies.append((time.perf_counter() - start) * 1000)
            answer.raise_for_status()
            await asyncio.sleep(0.005)
    done.set()
    await tick
    body = answer.json()["this_replica"]
    samples = {arm: figures.get("requests") for arm, figures in body["arms"].items()}
    return {
        "reads": reads,
        "samples_per_arm": samples,
        "gates": [(g["gate"], g["status"]) for g in body["step"]["gates"]],
        "answer_p50_ms": round(float(np.percentile(latencies, 50)), 2),
        "answer_max_ms": round(max(latencies), 2),
        "loop_held_max_ms": round(max(gaps) * 1000, 2),
        "loop_held_max_quiet_ms": round(quiet_gap * 1000, 2),
        "first_read_ms": round(first_ms, 2),
        "first_read_loop_held_max_ms": round(first_gap * 1000, 2),
    }


def experiment_cost(repo: Path, samples: int, reads: int = 50, seed: int = 0) -> dict:
    app = create_app(GatewaySettings(repo=repo, grpc_port=0, manifest_poll_s=0))
    experiment = parse_experiment(
        json.dumps(
            {
                "control": "teacher",
                "candidate": "student",
                "weights": {"student": 0.5, "teacher": 0.5},
                "shadow_fraction": 1.0,
                "gates": {
                    "latency": {"quantile": 0.99, "max_ratio": 1.5},
                    "min_agreement": 0.95,
                    "max_top1_drop": 0.02,
                },
            }
        ).encode()
    )
    apply_experiment(app.state, experiment)
    started = time.perf_counter()
    _fill(app, samples, seed)
    figures = asyncio.run(_measure(app, reads))
    figures["fill_s"] = round(time.perf_counter() - started, 1)
    return figures
