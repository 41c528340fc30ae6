"""`python -m loadtest bench`: every figure a side-by-side comparison measured in this one run.

Paths: in-process ONNX Runtime (the floor), Triton called directly over binary HTTP, and the
gateway (HTTP POST of a PNG: decode, resize, Triton, calibration, fusion). Models: student vs
teacher, INT8 vs fp32 student, and three ways to get an ensemble (members fused in the gateway,
Triton's ensemble model, the K-head model) against one student.
Results: benchmarks/results.json and benchmarks/results.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

import httpx
import numpy as np
import tritonclient.http as httpclient

from gateway.process import GatewayProcess, free_port
from gateway.service import trained_entry
from gateway.triton_server import EmbeddedTriton, TritonPorts
from training.imageprep import to_model_input
from training.manifest import read_manifest
from training.onnx_tools import session
from training.splits import digit_as_png_image, digit_png_bytes

SATURATION_CONCURRENCY = 4  # 2 cores: more in flight only queues
SATURATION_SECONDS = 8.0


def _percentiles(samples_ms: list[float]) -> dict[str, float]:
    values = np.asarray(samples_ms)
    return {
        "p50_ms": round(float(np.percentile(values, 50)), 3),
        "p99_ms": round(float(np.percentile(values, 99)), 3),
        "mean_ms": round(statistics.fmean(samples_ms), 3),
        "requests": len(samples_ms),
    }


def time_calls(call: Callable[[], object], requests: int, warmup: int = 20) -> dict[str, float]:
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(requests):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000)
    return _percentiles(samples)


def saturate_threads(call: Callable[[], object], workers: int, seconds: float) -> dict[str, float]:
    """Throughput with `workers` callers looping for `seconds` (in-process ONNX Runtime)."""
    deadline = time.perf_counter() + seconds

    def loop() -> list[float]:
        done = []
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            call()
            done.append((time.perf_counter() - start) * 1000)
        return done

    with ThreadPoolExecutor(workers) as pool:
        samples = [s for part in pool.map(lambda _: loop(), range(workers)) for s in part]
    return {"throughput_per_s": round(len(samples) / seconds, 1), **_percentiles(samples)}


async def _saturate_http(url: str, path: str, body: bytes, workers: int, seconds: float) -> dict[str, float]:
    samples: list[float] = []
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=workers)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:

        async def loop() -> None:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                resp = await client.post(path, content=body, headers={"Content-Type": "image/png"})
                resp.raise_for_status()
                samples.append((time.perf_counter() - start) * 1000)

        await asyncio.gather(*(loop() for _ in range(workers)))
    return {"throughput_per_s": round(len(samples) / seconds, 1), **_percentiles(samples)}


def saturate_gateway(url: str, model: str, body: bytes) -> dict[str, float]:
    return asyncio.run(
        _saturate_http(url, f"/v1/classify?model={model}", body, SATURATION_CONCURRENCY, SATURATION_SECONDS)
    )


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    versions = {}
    for package in ("onnxruntime", "tritonclient", "nvidia-pytriton", "fastapi", "uvicorn", "torch"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": None,
        "python": platform.python_version(),
        "versions": versions,
        "triton": "2.51 (nvidia-pytriton 0.7.0, Python backend + ONNX Runtime)",
    }


def run_bench(repo: Path, out_dir: Path, requests: int = 300) -> dict:
    started = time.perf_counter()
    manifest = read_manifest(repo)
    size = manifest.preprocessing.image_size
    png = digit_png_bytes(1700)  # a held-out digit, sent as a user would send it
    tensor = to_model_input(digit_as_png_image(1700), size)[None]

    results: dict = {
        "machine": machine(),
        "requests_per_latency_figure": requests,
        "saturation": {"concurrency": SATURATION_CONCURRENCY, "seconds": SATURATION_SECONDS},
        "paths": {},
        "ensembles": {},
    }
    ports = TritonPorts(free_port(), free_port(), free_port())
    with EmbeddedTriton(repo, ports) as triton, GatewayProcess(repo, triton.http_url, ready_path="/readyz") as gateway:
        direct = httpclient.InferenceServerClient(triton.http_url)

        clients = threading.local()

        def triton_call(model: str, own_client: bool = False) -> Callable[[], object]:
            """One binary-HTTP inference; with own_client, one connection per calling thread."""

            def call():
                client = direct
                if own_client:
                    if not hasattr(clients, "client"):
                        clients.client = httpclient.InferenceServerClient(triton.http_url)
                    client = clients.client
                inp = httpclient.InferInput("images", list(tensor.shape), "UINT8")
                inp.set_data_from_numpy(tensor, binary_data=True)
                return client.infer(model, [inp], outputs=[httpclient.InferRequestedOutput("logits", binary_data=True)])

            return call

        def gateway_call(model: str) -> Callable[[], object]:
            def call():
                resp = gateway.client.post(
                    f"/v1/classify?model={model}", content=png, headers={"Content-Type": "image/png"}
                )
                resp.raise_for_status()

            return call

        for label, name, alias in (
            ("student", "student_kd", "student"),
            ("teacher", "teacher", "teacher"),
            ("student_int8", "student_kd_int8", "student_kd_int8"),
        ):
            if name not in manifest.models:
                continue
            entry = manifest.models[name]
            ort = session(repo / name / str(entry.version) / "model.onnx")

            def in_process(s=ort):
                return s.run(["logits"], {"images": tensor})

            figures = {
                "top1": entry.metrics.get("top1"),
                "latency_c1": {
                    "in_process": time_calls(in_process, requests),
                    "triton_direct": time_calls(triton_call(name), requests),
                    "gateway": time_calls(gateway_call(alias), requests),
                },
                "saturation": {
                    "in_process": saturate_threads(in_process, SATURATION_CONCURRENCY, SATURATION_SECONDS),
                    "triton_direct": saturate_threads(
                        triton_call(name, own_client=True), SATURATION_CONCURRENCY, SATURATION_SECONDS
                    ),
                    "gateway": saturate_gateway(gateway.url, alias, png),
                },
            }
            results["paths"][label] = figures
            print(
                f"[bench] {label}: c=1 p50 in-process {figures['latency_c1']['in_process']['p50_ms']} ms, "
                f"triton {figures['latency_c1']['triton_direct']['p50_ms']} ms, "
                f"gateway {figures['latency_c1']['gateway']['p50_ms']} ms",
                flush=True,
            )

        for label, model in (
            ("one student", "student"),
            ("variants fused in the gateway", "ensemble"),
            ("Triton ensemble model", "ensemble_triton"),
            ("K-head model", "multihead"),
        ):
            results["ensembles"][label] = {
                "model": model,
                "top1": _top1(manifest, model),
                "latency_c1": time_calls(gateway_call(model), requests // 2),
                "saturation": saturate_gateway(gateway.url, model, png),
            }
            print(f"[bench] {label}: p50 {results['ensembles'][label]['latency_c1']['p50_ms']} ms", flush=True)

    s, t = results["paths"]["student"], results["paths"]["teacher"]
    results["teacher_over_student"] = {
        "latency_p50": {
            p: round(t["latency_c1"][p]["p50_ms"] / s["latency_c1"][p]["p50_ms"], 2) for p in s["latency_c1"]
        },
        "throughput": {
            p: round(s["saturation"][p]["throughput_per_s"] / t["saturation"][p]["throughput_per_s"], 2)
            for p in s["saturation"]
        },
    }
    results["seconds"] = round(time.perf_counter() - started, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "results.md").write_text(results_markdown(results))
    return results


def _top1(manifest, model: str) -> float | None:
    entry = trained_entry(manifest, model)
    return entry.metrics.get("top1") if entry else None


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"


def results_markdown(results: dict) -> str:
    m = results["machine"]
    sat = results["saturation"]
    lines = [
        "# kdserve benchmarks",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu'] or 'none'}; Python {m['python']}; "
        f"Triton {m['triton']}; "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
        + f". Whole run: {results['seconds']:.0f} s.",
        "",
        "Every figure below comes from the same run. Concurrency 1: one request at a time, one image "
        f"({results['requests_per_latency_figure']} requests). Saturation: {sat['concurrency']} requests in flight "
        f"for {sat['seconds']:.0f} s (in-process: {sat['concurrency']} threads; Triton: {sat['concurrency']} "
        "threads with tritonclient; gateway: async HTTP client). The load generator shares the 2 cores "
        "with the server.",
        "",
        "## Paths: in-process ONNX Runtime vs Triton direct vs the gateway",
        "",
        "| model | top-1 | in-process p50 / p99 ms | Triton p50 / p99 ms | gateway p50 / p99 ms | "
        "in-process img/s | Triton img/s | gateway img/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, f in results["paths"].items():
        lat = [
            f"{f['latency_c1'][p]['p50_ms']:.2f} / {f['latency_c1'][p]['p99_ms']:.2f}"
            for p in ("in_process", "triton_direct", "gateway")
        ]
        thr = [f"{f['saturation'][p]['throughput_per_s']:.0f}" for p in ("in_process", "triton_direct", "gateway")]
        lines.append(f"| {label} | {_pct(f['top1'])} | {' | '.join(lat)} | {' | '.join(thr)} |")
    ratio = results["teacher_over_student"]
    lines += [
        "",
        "Teacher / student: p50 latency "
        + ", ".join(f"{k} x{v}" for k, v in ratio["latency_p50"].items())
        + "; student / teacher throughput "
        + ", ".join(f"{k} x{v}" for k, v in ratio["throughput"].items())
        + ".",
    ]
    paths = results["paths"]
    if "student_int8" in paths:
        f32, i8 = paths["student"], paths["student_int8"]
        lines += [
            "",
            f"INT8 vs fp32 student: top-1 {_pct(i8['top1'])} vs {_pct(f32['top1'])}; in-process p50 "
            f"{i8['latency_c1']['in_process']['p50_ms']:.2f} vs {f32['latency_c1']['in_process']['p50_ms']:.2f} ms; "
            f"Triton throughput {i8['saturation']['triton_direct']['throughput_per_s']:.0f} vs "
            f"{f32['saturation']['triton_direct']['throughput_per_s']:.0f} img/s.",
        ]
    lines += [
        "",
        "## Ensembles through the gateway, against one student",
        "",
        "| what | top-1 | p50 / p99 ms (c=1) | img/s at saturation |",
        "|---|---:|---:|---:|",
    ]
    for label, e in results["ensembles"].items():
        lines.append(
            f"| {label} (`{e['model']}`) | {_pct(e['top1'])} | {e['latency_c1']['p50_ms']:.2f} / "
            f"{e['latency_c1']['p99_ms']:.2f} | {e['saturation']['throughput_per_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"
