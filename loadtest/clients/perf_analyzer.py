"""Triton's perf_analyzer (shipped in the tritonclient wheel), against Triton or the gateway's v2 endpoints.

The binary needs `libb64.so.0d` and `libcudart.so.12`; nvidia-pytriton bundles both under hashed
names, so a small directory of correctly named links goes on LD_LIBRARY_PATH.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from gateway.triton.server import pytriton_root
from kdcontract.names import V2_IMAGE_INPUT


class UnstableMeasurement(RuntimeError):
    """perf_analyzer ran but its measurement windows never agreed (a loaded machine)."""


NEEDED = {"libb64.so.0d": "libb64-*.so.0d", "libcudart.so.12": "libcudart-*.so.12*"}


def perf_analyzer_binary() -> Path:
    path = Path(sys.executable).parent / "perf_analyzer"
    if not path.exists():
        found = shutil.which("perf_analyzer")
        if not found:
            raise FileNotFoundError("perf_analyzer not found; it ships in the tritonclient wheel (kdserve[serve])")
        path = Path(found)
    return path


def perf_analyzer_env() -> dict[str, str]:
    libs = pytriton_root().parent.parent / "nvidia_pytriton.libs"
    links = Path(tempfile.gettempdir()) / "kdserve-perf-analyzer-libs"
    links.mkdir(exist_ok=True)
    for name, pattern in NEEDED.items():
        matches = sorted(libs.glob(pattern))
        if not matches:
            raise FileNotFoundError(f"{pattern} not in {libs}")
        link = links / name
        if link.is_symlink() and link.resolve() != matches[0].resolve():
            link.unlink()  # dangling, or left by another installation: point it at this one's library
        if not link.is_symlink():
            link.symlink_to(matches[0])
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join([str(links), str(libs), env.get("LD_LIBRARY_PATH", "")])
    return env


def measure(
    triton_http: str, model: str, image_size: int, concurrency: list[int], out_csv: Path, interval_ms: int = 3000
) -> list[dict]:
    """Triton directly: throughput and latency percentiles per concurrency level, one image per request
    (random UINT8 pixels of the model's input shape), with Triton's queue and compute times."""
    levels = f"{min(concurrency)}:{max(concurrency)}:1" if len(concurrency) > 1 else f"{concurrency[0]}"
    shape = ["--shape", f"images:{image_size},{image_size},3"]
    return run(triton_http, "http", model, shape, levels, out_csv, interval_ms)


def bytes_element(data: bytes) -> bytes:
    """One element of a BYTES tensor as the v2 binary form carries it: a 4-byte little-endian length, the bytes."""
    return len(data).to_bytes(4, "little") + data


def encoded_images_input(images: list[bytes], path: Path) -> Path:
    """perf_analyzer's --input-data file for the gateway's v2 models: one step per image, each the
    IMAGE tensor's serialized BYTES."""
    steps = [
        {V2_IMAGE_INPUT: {"b64": base64.b64encode(bytes_element(image)).decode(), "shape": [1]}} for image in images
    ]
    path.write_text(json.dumps({"data": steps}))
    return path


def run(
    url: str,
    protocol: str,
    model: str,
    input_args: list[str],
    concurrency_range: str,
    out_csv: Path,
    interval_ms: int = 3000,
) -> list[dict]:
    """perf_analyzer against any v2 endpoint (Triton, or the gateway over `http` or `grpc`). The
    server-side columns are there only when the server has Triton's statistics extension."""
    command = [
        str(perf_analyzer_binary()),
        "-m",
        model,
        "-u",
        url,
        "-i",
        protocol,
        *input_args,
        "-b",
        "1",
        "--concurrency-range",
        concurrency_range,  # start:end:step, or one level
        "--measurement-interval",
        str(interval_ms),
        "-f",
        str(out_csv),
        # No --percentile: with it perf_analyzer stabilises on p99, which rare scheduler stalls on 2
        # shared cores never let settle; without it, on the mean latency (the CSV still has p50-p99).
        # The default 10% band is rarely met on 2 cores shared with the server: accept 50% over 20 windows.
        "--stability-percentage",
        "50",
        "--max-trials",
        "20",
    ]
    proc = subprocess.run(command, env=perf_analyzer_env(), capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        if "Failed to obtain stable measurement" in proc.stdout + proc.stderr:
            raise UnstableMeasurement(f"{model}: no stable measurement at concurrency {concurrency_range}")
        raise RuntimeError(f"perf_analyzer failed: {proc.stdout[-1500:]} {proc.stderr[-1500:]}")
    rows = []
    with out_csv.open() as fh:
        for row in csv.DictReader(fh):
            figures = {
                "concurrency": int(row["Concurrency"]),
                "throughput_per_s": float(row["Inferences/Second"]),
                "p50_ms": float(row["p50 latency"]) / 1000,
                "p99_ms": float(row["p99 latency"]) / 1000,
            }
            if "Server Queue" in row:
                figures["server_queue_ms"] = float(row["Server Queue"]) / 1000
                figures["server_compute_ms"] = float(row["Server Compute Infer"]) / 1000
            rows.append(figures)
    return rows
