"""`python -m loadtest bench`: side-by-side latency of the same model through three paths, one run.

In-process ONNX Runtime (the floor), Triton called directly over binary HTTP, and the gateway (HTTP
with a PNG body: decode + resize + Triton + calibration). Each figure is measured in this run, on
this machine, one request at a time after a warm-up, so differences are overheads, not noise
between runs. Results: benchmarks/results.json and benchmarks/results.md.
"""

from __future__ import annotations

import io
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient

from gateway.process import GatewayProcess, free_port
from gateway.triton_server import EmbeddedTriton, TritonPorts
from training.imageprep import to_model_input
from training.manifest import read_manifest
from training.onnx_tools import session
from training.splits import digit_as_png_image


def _percentiles(samples_ms: list[float]) -> dict[str, float]:
    ordered = np.asarray(samples_ms)
    return {
        "p50_ms": round(float(np.percentile(ordered, 50)), 3),
        "p99_ms": round(float(np.percentile(ordered, 99)), 3),
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


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for package in ("onnxruntime", "tritonclient", "nvidia-pytriton", "fastapi", "uvicorn"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": None, "python": platform.python_version(), "versions": versions}


def run_bench(repo: Path, out_dir: Path, requests: int = 300) -> dict:
    manifest = read_manifest(repo)
    size = manifest.preprocessing.image_size
    picture = digit_as_png_image(1700)  # a held-out digit, sent as a user would send it
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    png = buf.getvalue()
    tensor = to_model_input(picture, size)[None]

    results: dict = {"machine": machine(), "requests_per_figure": requests, "concurrency": 1, "models": {}}
    ports = TritonPorts(free_port(), free_port(), free_port())
    with EmbeddedTriton(repo, ports) as triton:
        gateway = GatewayProcess(repo, triton.http_url, ready_path="/readyz")
        direct = httpclient.InferenceServerClient(triton.http_url)
        http = gateway.client
        try:
            for alias, name in (("student", "student_kd"), ("teacher", "teacher")):
                entry = manifest.models[name]
                ort_session = session(repo / name / str(entry.version) / "model.onnx")

                def in_process(s=ort_session):
                    return s.run(["logits"], {"images": tensor})

                def triton_direct(model=name):
                    inp = httpclient.InferInput("images", list(tensor.shape), "UINT8")
                    inp.set_data_from_numpy(tensor, binary_data=True)
                    return direct.infer(
                        model, [inp], outputs=[httpclient.InferRequestedOutput("logits", binary_data=True)]
                    )

                def through_gateway(model=alias):
                    resp = http.post(f"/v1/classify?model={model}", content=png, headers={"Content-Type": "image/png"})
                    resp.raise_for_status()
                    return resp

                figures = {
                    "in_process_onnxruntime": time_calls(in_process, requests),
                    "triton_direct_http": time_calls(triton_direct, requests),
                    "gateway_http": time_calls(through_gateway, requests),
                }
                figures["gateway_overhead_p50_ms"] = round(
                    figures["gateway_http"]["p50_ms"] - figures["triton_direct_http"]["p50_ms"], 3
                )
                figures["top1"] = entry.metrics.get("top1")
                figures["params"] = entry.metrics.get("params")
                results["models"][alias] = figures
                print(
                    f"[bench] {alias}: in-process {figures['in_process_onnxruntime']['p50_ms']} ms, "
                    f"triton {figures['triton_direct_http']['p50_ms']} ms, "
                    f"gateway {figures['gateway_http']['p50_ms']} ms (p50)",
                    flush=True,
                )
        finally:
            gateway.stop()
    s, t = results["models"]["student"], results["models"]["teacher"]
    results["student_vs_teacher"] = {
        path: round(t[path]["p50_ms"] / s[path]["p50_ms"], 2)
        for path in ("in_process_onnxruntime", "triton_direct_http", "gateway_http")
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "results.md").write_text(results_markdown(results))
    return results


def results_markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# kdserve benchmarks",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu'] or 'none'}; Python {m['python']}; "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
        + ".",
        "",
        f"## Latency at concurrency 1 ({results['requests_per_figure']} requests per figure, one image each)",
        "",
        "In-process: ONNX Runtime in this Python process (uint8 tensor). Triton direct: binary HTTP to the "
        "embedded Triton (uint8 tensor). Gateway: HTTP POST of a PNG to /v1/classify (decode, resize, Triton, "
        "calibrated probabilities).",
        "",
        "| model | top-1 | in-process p50 / p99 ms | Triton direct p50 / p99 ms | gateway p50 / p99 ms | "
        "gateway overhead p50 ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for alias, f in results["models"].items():
        top1 = f"{100 * f['top1']:.2f}%" if f.get("top1") is not None else "—"
        cells = [
            f"{f[p]['p50_ms']:.2f} / {f[p]['p99_ms']:.2f}"
            for p in ("in_process_onnxruntime", "triton_direct_http", "gateway_http")
        ]
        lines.append(f"| {alias} | {top1} | {' | '.join(cells)} | {f['gateway_overhead_p50_ms']:.2f} |")
    ratio = results["student_vs_teacher"]
    lines += [
        "",
        "Teacher / student p50 latency ratio: "
        + ", ".join(f"{k.replace('_', ' ')} x{v}" for k, v in ratio.items())
        + ".",
    ]
    return "\n".join(lines) + "\n"
