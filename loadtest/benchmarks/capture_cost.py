"""`python -m loadtest capture-cost`: what capturing every request costs, capture on vs off in one run.

Two gateways in front of one Triton, identical but for `KDSERVE_CAPTURE_FRACTION` (0 and 1.0): the
student's p50/p99 at concurrency 1 (the two interleaved in blocks, so drift hits both alike) and the
throughput at 16 clients (each gateway in turn, three rounds, so the spread is visible); then the
capture gateway's own counters: images written, segments, drops. Writes capture_cost.md and .json.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

import aiohttp
import httpx

from gateway.process import GatewayProcess, serving
from kdcontract.digits import digit_png_bytes
from kdcontract.machine import cpu_description
from kdcontract.names import STUDENT
from kdcontract.tables import markdown_table
from loadtest.clients.measure import load_async, metric_value, summarize, time_interleaved

CLIENTS = 16
ROUNDS = 3
LOAD_SECONDS = 4.0
TARGET_P50_MS = 0.1  # the bound on capture's cost at concurrency 1


def _call(url: str, client: httpx.Client, png: bytes):
    return lambda: client.post(
        f"{url}/v1/classify?model={STUDENT}", content=png, headers={"Content-Type": "image/png"}
    ).raise_for_status()


def _call_async(url: str, png: bytes):
    async def call(session: aiohttp.ClientSession) -> None:
        async with session.post(
            f"{url}/v1/classify?model={STUDENT}", data=png, headers={"Content-Type": "image/png"}
        ) as response:
            await response.read()
            response.raise_for_status()

    return call


def capture_cost(repo: Path, out: Path, requests: int = 2000) -> dict:
    png = digit_png_bytes(1700)
    with tempfile.TemporaryDirectory(prefix="kdserve-capture-") as capture_dir, serving(repo) as (triton, plain):
        env = {"KDSERVE_CAPTURE_FRACTION": "1.0", "KDSERVE_CAPTURE_DIR": capture_dir}
        with (
            GatewayProcess(repo, triton.http_url, env=env, ready_path="/readyz") as capturing,
            httpx.Client(timeout=30) as client,
        ):
            gateways = {"capture off": plain.url, "capture on": capturing.url}
            samples = time_interleaved({name: _call(url, client, png) for name, url in gateways.items()}, requests)
            c1 = {name: summarize(s) for name, s in samples.items()}
            throughput: dict[str, list[float]] = {name: [] for name in gateways}
            for _ in range(ROUNDS):
                for name, url in gateways.items():
                    throughput[name].append(
                        load_async(_call_async(url, png), CLIENTS, LOAD_SECONDS)["throughput_per_s"]
                    )
            text = client.get(f"{capturing.url}/metrics").text
        written = sum(1 for p in Path(capture_dir).iterdir() if p.suffix == ".npz")
    counters = {
        "images_written": metric_value(text, "kdserve_capture_images_total"),
        "segments": written,
        "dropped_queue_full": metric_value(text, "kdserve_capture_dropped_total", {"reason": "queue_full"}),
        "dropped_write_failed": metric_value(text, "kdserve_capture_dropped_total", {"reason": "write_failed"}),
    }
    results = {
        "cpu": cpu_description(),
        "requests_c1": requests,
        "c1": c1,
        "p50_cost_ms": round(c1["capture on"]["p50_ms"] - c1["capture off"]["p50_ms"], 3),
        "throughput_c16": {name: [round(x, 1) for x in runs] for name, runs in throughput.items()},
        "capture": counters,
        "target_p50_ms": TARGET_P50_MS,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "capture_cost.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "capture_cost.md").write_text(markdown(results))
    return results


def markdown(r: dict) -> str:
    t = r["throughput_c16"]
    rows = [
        [
            name,
            f"{r['c1'][name]['p50_ms']:.2f}",
            f"{r['c1'][name]['p99_ms']:.2f}",
            " / ".join(f"{x:.0f}" for x in t[name]),
            f"{statistics.median(t[name]):.0f}",
        ]
        for name in ("capture off", "capture on")
    ]
    c = r["capture"]
    verdict = "within" if r["p50_cost_ms"] <= r["target_p50_ms"] else "**over**"
    return "\n".join(
        [
            "# What capturing every request costs",
            "",
            f"CPU: {r['cpu']}. Two gateways on one Triton, the same but for `KDSERVE_CAPTURE_FRACTION` (0 / 1.0); "
            f"the student, one 8x8 PNG a request; {r['requests_c1']} requests each at concurrency 1 (interleaved "
            f"in blocks), then {CLIENTS} clients for {LOAD_SECONDS:g} s, each gateway in turn, {ROUNDS} rounds.",
            "",
            markdown_table(
                ["gateway", "p50 ms (c=1)", "p99 ms (c=1)", f"img/s at {CLIENTS} clients, per round", "median"], rows
            ),
            "",
            f"Capture's cost at p50, concurrency 1: **{r['p50_cost_ms']:+.3f} ms** ({verdict} the "
            f"{r['target_p50_ms']} ms target). The capturing gateway wrote {c['images_written']:.0f} images in "
            f"{c['segments']} segment files; "
            f"dropped: {c['dropped_queue_full']:.0f} (queue full), {c['dropped_write_failed']:.0f} (write failed).",
            "",
        ]
    )
