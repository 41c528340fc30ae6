"""The gateway's front doors measured against each other in one run (`make bench`):
`/v1/classify`, Open Inference Protocol v2 over REST and over gRPC, and tracing off against on.

- Concurrency 1: each path's latency, interleaved in blocks with Triton called directly (binary v2
  HTTP, the same student), so the overhead of a path is its p50 minus Triton's in the same minutes.
- 16 clients: throughput, and the gateway process's CPU seconds per request (from /proc: user +
  system time over the window, divided by the requests answered).
- perf_analyzer, Triton's own load generator, against the gateway over HTTP and gRPC, and against
  Triton directly for reference.

Every path sends the same PNG of a held-out digit and asks the student (`student_kd` on Triton). The
traced gateway samples every request and exports its spans to a collector in this process.
"""

from __future__ import annotations

import asyncio
import http.server
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import httpx
import numpy as np
from PIL import Image
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.process import GatewayProcess, free_port
from gateway.triton.rest import infer_request
from gateway.triton.server import EmbeddedTriton, TritonPorts
from kdcontract.client_forms import ClientForm, render
from kdcontract.imageprep import prepare
from kdcontract.machine import cpu_description
from kdcontract.manifest import read_manifest
from kdcontract.names import STUDENT, STUDENT_KD, V2_IMAGE_INPUT, V2_OUTPUT
from kdcontract.tables import markdown_table, write_results
from loadtest.clients import perf_analyzer
from loadtest.clients.measure import load_async, summarize, time_interleaved
from loadtest.clients.served_accuracy import held_out

CLIENTS = 16
LOAD_SECONDS = 5.0
PATHS = ("triton_direct", "v1", "v2_rest", "v2_grpc", "v1_traced")
LABELS = {
    "triton_direct": "Triton directly (v2 HTTP, binary)",
    "v1": "gateway `/v1/classify` (PNG body)",
    "v2_rest": "gateway v2 REST (binary tensor extension)",
    "v2_grpc": "gateway v2 gRPC",
    "v1_traced": "gateway `/v1/classify`, tracing on (every request, OTLP export)",
}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far (/proc/<pid>/stat, in clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Sink(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP collector that accepts and counts what it is sent (the traced gateway's spans)."""

    posts = 0

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).posts += 1
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@contextmanager
def collector() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


class Paths:
    """The same one-image classification, sent each way."""

    def __init__(self, triton_http: str, gateway: GatewayProcess, traced: GatewayProcess, png: bytes, tensor):
        self.gateway, self.traced, self.png = gateway, traced, png
        body, size = infer_request(tensor, "logits")
        triton_url = f"http://{triton_http}/v2/models/{STUDENT_KD}/infer"
        self.triton = (triton_url, body, {"Inference-Header-Content-Length": str(size)})
        element = perf_analyzer.bytes_element(png)
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": V2_IMAGE_INPUT,
                        "shape": [1, 1],
                        "datatype": "BYTES",
                        "parameters": {"binary_data_size": len(element)},
                    }
                ],
                "outputs": [{"name": V2_OUTPUT, "parameters": {"binary_data": True}}],
            },
            separators=(",", ":"),
        ).encode()
        self.v2 = (
            f"{gateway.url}/v2/models/{STUDENT}/infer",
            header + element,
            {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"},
        )
        self.grpc_request = service_pb2.ModelInferRequest(
            model_name=STUDENT,
            inputs=[
                service_pb2.ModelInferRequest.InferInputTensor(name=V2_IMAGE_INPUT, datatype="BYTES", shape=[1, 1])
            ],
            raw_input_contents=[element],
        )

    def http_posts(self) -> dict[str, tuple[str, bytes, dict]]:
        png_headers = {"Content-Type": "image/png"}
        return {
            "triton_direct": self.triton,
            "v1": (f"{self.gateway.url}/v1/classify?model={STUDENT}", self.png, png_headers),
            "v2_rest": self.v2,
            "v1_traced": (f"{self.traced.url}/v1/classify?model={STUDENT}", self.png, png_headers),
        }

    def sync_calls(self, client: httpx.Client, stub) -> dict[str, Callable[[], object]]:

        def post(url: str, body: bytes, headers: dict) -> Callable[[], object]:
            return lambda: client.post(url, content=body, headers=headers).raise_for_status()

        calls = {name: post(*request) for name, request in self.http_posts().items()}
        calls["v2_grpc"] = lambda: stub.ModelInfer(self.grpc_request, timeout=30)
        return {name: calls[name] for name in PATHS}


# The gateway's own `route` label of each path: its mean time per request, from its /metrics, is the
# server's side of the figure, free of what each client library costs.
ROUTES = {
    "v1": "/v1/classify",
    "v2_rest": "/v2/models/{name}/infer",
    "v2_grpc": "grpc:ModelInfer",
    "v1_traced": "/v1/classify",
}


def server_mean_ms(metrics_text: str, route: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = count = 0.0
    for family in text_string_to_metric_families(metrics_text):
        if family.name != "kdserve_request_duration_seconds":
            continue
        for sample in family.samples:
            if sample.labels.get("route") == route and sample.labels.get("status") == "200":
                if sample.name.endswith("_sum"):
                    total += sample.value
                elif sample.name.endswith("_count"):
                    count += sample.value
    return round(total / count * 1000, 3) if count else float("nan")


def latency_c1(paths: Paths, requests: int) -> dict[str, dict]:
    with httpx.Client(timeout=60) as client, grpc.insecure_channel(paths.gateway.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        samples = time_interleaved(paths.sync_calls(client, stub), requests)
        served = {
            name: client.get(f"{gw.url}/metrics").text
            for name, gw in (("gateway", paths.gateway), ("traced", paths.traced))
        }
    figures = {name: summarize(s) for name, s in samples.items()}
    direct = figures["triton_direct"]["p50_ms"]
    for name in PATHS[1:]:
        figures[name]["overhead_p50_ms"] = round(figures[name]["p50_ms"] - direct, 3)
        text = served["traced" if name == "v1_traced" else "gateway"]
        figures[name]["server_mean_ms"] = server_mean_ms(text, ROUTES[name])
    return figures


def tracing_off_cost_ns(spans_per_request: int = 6) -> float:
    """What a request pays for its spans while tracing is off: `span()` handing out the shared no-op
    and entering it, timed with `timeit` in a fresh process (the load tools use the gateway's modules
    only through processes)."""
    timed = subprocess.run(
        [sys.executable, "-m", "timeit", "-n", "200000", "-s", "from gateway.telemetry import tracing",
         "with tracing.span('decode'): pass"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    value, unit = re.search(r"best of \d+: ([0-9.]+) (nsec|usec|msec)", timed).groups()
    return round(float(value) * {"nsec": 1, "usec": 1e3, "msec": 1e6}[unit] * spans_per_request, 1)


def _grpc_load(address: str, request, clients: int, seconds: float) -> dict[str, float]:
    async def run() -> list[float]:
        samples: list[float] = []
        async with grpc.aio.insecure_channel(address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            deadline = time.perf_counter() + seconds

            async def loop() -> None:
                while time.perf_counter() < deadline:
                    start = time.perf_counter()
                    await stub.ModelInfer(request, timeout=30)
                    samples.append((time.perf_counter() - start) * 1000)

            await asyncio.gather(*(loop() for _ in range(clients)))
        return samples

    samples = asyncio.run(run())
    return {"throughput_per_s": round(len(samples) / seconds, 1), **summarize(samples)}


def under_load(paths: Paths, clients: int = CLIENTS, seconds: float = LOAD_SECONDS) -> dict[str, dict]:
    figures = {}
    posts = paths.http_posts()
    for name in PATHS:
        pid = {"v1_traced": paths.traced.proc.pid}.get(name, paths.gateway.proc.pid)
        before = cpu_seconds(pid)
        if name == "v2_grpc":
            result = _grpc_load(paths.gateway.grpc_url, paths.grpc_request, clients, seconds)
        else:
            url, body, headers = posts[name]

            async def call(client, url=url, body=body, headers=headers) -> None:
                async with client.post(url, data=body, headers=headers) as response:
                    await response.read()
                    response.raise_for_status()

            result = load_async(call, clients, seconds)
        answered = result["throughput_per_s"] * seconds
        if name != "triton_direct":  # the gateway's own CPU (Triton's is the same work on every path)
            result["gateway_cpu_ms_per_request"] = round((cpu_seconds(pid) - before) * 1000 / answered, 3)
        figures[name] = result
        print(f"[protocols] c={clients} {name}: {result['throughput_per_s']}/s", flush=True)
    return figures


def perf_analyzer_runs(paths: Paths, triton_http: str, image_size: int, png: bytes, work: Path) -> dict[str, list]:
    data = perf_analyzer.encoded_images_input([png], work / "perf_analyzer_input.json")
    levels = f"1:{CLIENTS}:{CLIENTS - 1}"
    pixels, images = ["--shape", f"images:{image_size},{image_size},3"], ["--input-data", str(data)]
    gateway_http, gateway_grpc = paths.gateway.url.removeprefix("http://"), paths.gateway.grpc_url
    run = perf_analyzer.run
    return {
        "triton_direct_http": run(triton_http, "http", STUDENT_KD, pixels, levels, work / "pa_triton.csv"),
        "gateway_http": run(gateway_http, "http", STUDENT, images, levels, work / "pa_http.csv"),
        "gateway_grpc": run(gateway_grpc, "grpc", STUDENT, images, levels, work / "pa_grpc.csv"),
    }


def run_protocols(repo: Path, out_dir: Path, requests: int = 1000) -> dict:
    started = time.perf_counter()
    manifest = read_manifest(repo)
    digits, _ = held_out(manifest.split)
    size = manifest.preprocessing.image_size
    png = render(digits[0], ClientForm(size=size, resample="bicubic"))
    tensor = prepare(Image.open(io.BytesIO(png)), manifest.preprocessing)[None]
    results: dict = {"machine": {"cpu": cpu_description()}, "requests_c1": requests, "clients": CLIENTS}
    out_dir.mkdir(parents=True, exist_ok=True)
    with (
        collector() as endpoint,
        EmbeddedTriton(repo, TritonPorts(free_port(), free_port(), free_port())) as triton,
        GatewayProcess(repo, triton.http_url, ready_path="/readyz") as gateway,
        GatewayProcess(
            repo,
            triton.http_url,
            env={"KDSERVE_TRACE_SAMPLE_RATIO": "1", "KDSERVE_OTLP_ENDPOINT": endpoint},
            ready_path="/readyz",
        ) as traced,
    ):
        paths = Paths(triton.http_url, gateway, traced, png, np.ascontiguousarray(tensor))
        results["latency_c1"] = latency_c1(paths, requests)
        results["load"] = under_load(paths)
        results["perf_analyzer"] = perf_analyzer_runs(paths, triton.http_url, size, png, out_dir)
    results["spans_exported_posts"] = _Sink.posts
    results["tracing_off_ns_per_request"] = tracing_off_cost_ns()
    results["seconds"] = round(time.perf_counter() - started, 1)
    write_results(out_dir, results, results_markdown(results))
    return results


def results_markdown(results: dict) -> str:
    c1, load = results["latency_c1"], results["load"]
    lines = [
        "# The gateway's protocols compared (one run)",
        "",
        f"Machine: {results['machine']['cpu']}. Written by `make bench` (`python -m loadtest protocols`); "
        f"one image (a held-out digit as PNG) per request, the student; {results['requests_c1']} requests per "
        f"path at concurrency 1 (interleaved in blocks), {results['clients']} clients for {LOAD_SECONDS:g} s per path.",
        "",
        "## Concurrency 1",
        "",
        markdown_table(
            ["path", "p50 ms", "p99 ms", "overhead p50 over Triton, ms", "gateway's own mean, ms"],
            [
                [
                    LABELS[n],
                    c1[n]["p50_ms"],
                    c1[n]["p99_ms"],
                    c1[n].get("overhead_p50_ms", "-"),
                    c1[n].get("server_mean_ms", "-"),
                ]
                for n in PATHS
            ],
        ),
        "",
        "The gateway's own mean is its `kdserve_request_duration_seconds` (sum over count) for the path's "
        "route: the server's side of the latency, without the client library's. Tracing off, a request's "
        f"spans cost {results['tracing_off_ns_per_request'] / 1000:.1f} µs (six no-op spans, timed in-process).",
        "",
        f"## {results['clients']} clients",
        "",
        markdown_table(
            ["path", "requests/s", "p50 ms", "p99 ms", "gateway CPU ms per request"],
            [
                [
                    LABELS[n],
                    load[n]["throughput_per_s"],
                    load[n]["p50_ms"],
                    load[n]["p99_ms"],
                    load[n].get("gateway_cpu_ms_per_request", "-"),
                ]
                for n in PATHS
            ],
        ),
        "",
        "## perf_analyzer",
        "",
        markdown_table(
            ["target", "concurrency", "inferences/s", "p50 ms", "p99 ms"],
            [
                [name, row["concurrency"], row["throughput_per_s"], round(row["p50_ms"], 3), round(row["p99_ms"], 3)]
                for name, rows in results["perf_analyzer"].items()
                for row in rows
            ],
        ),
        "",
    ]
    return "\n".join(lines)
