"""`python -m loadtest bench`: every figure a side-by-side comparison measured in this one run.

Paths to one model: in-process ONNX Runtime (the floor, same threads as served), Triton called
directly, and the gateway (HTTP POST of PNGs: decode, resize, Triton, calibration, fusion). Triton
direct and the gateway are called with the same HTTP client (httpx at concurrency 1, aiohttp under
load), so their difference is what the gateway adds, not a difference between client libraries.
Beside every Triton and gateway figure stand Triton's own statistics for that phase: mean queue and
compute time per request and the mean batch Triton formed. Figures are interleaved in blocks (see
`loadtest.clients.measure`).

Results: <out>/results.json and <out>/results.md (linked from the README).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import os
import platform
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path

import aiohttp
import httpx
import numpy as np
from PIL import Image, ImageDraw

from gateway.process import GatewayProcess, serving
from gateway.triton.rest import infer_request
from gateway.triton.server import EmbeddedTriton
from kdcontract.client_forms import ClientForm, render
from kdcontract.digits import digits_gray
from kdcontract.imageprep import prepare
from kdcontract.machine import SIMD_FLAGS, cpu_info
from kdcontract.manifest import Manifest, read_manifest
from kdcontract.names import (
    ENSEMBLE,
    FUSED_ENSEMBLE,
    MULTIHEAD,
    SCHEDULER_ENSEMBLE,
    STUDENT,
    STUDENT_KD,
    TEACHER,
    int8_name,
    trained_entry,
)
from kdcontract.ort_session import open_session
from kdcontract.pareto import pareto_rows, write_pareto
from kdcontract.tables import markdown_table, percent, write_results
from loadtest.clients.measure import (
    STALL_MS,
    TritonStats,
    load_async,
    load_client,
    load_threads,
    summarize,
    time_interleaved,
)
from loadtest.clients.served_accuracy import held_out

CONCURRENCY = (1, 4, 16, 64)
LOAD_SECONDS = 3.0
SAMPLE_DIGIT = 1700  # any digit serves: latency does not depend on which one is sent

# What the serving issue asked of these figures; results.md says which were met.
TARGETS = {
    "triton_c1_max_ms": 100.0,
    "triton_c1_p99_ms": 5.0,
    "overhead_p50_ms": 1.0,
    "overhead_p99_ms": 3.0,
    "healthz_p99_ms": 100.0,
    "gateway_over_triton_c16": 0.7,
    "ensemble_over_student_p50": 1.5,
    "int8_ensemble_over_int8_student_p50": 1.5,  # the same target, both sides INT8
}
INT8_STUDENT = "one INT8 student"


def machine(triton_http: str) -> dict:
    cpu, flags = cpu_info()
    gpu = None
    if shutil.which("nvidia-smi"):
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
        gpu = listing.stdout.strip() or None
    with urllib.request.urlopen(f"http://{triton_http}/v2", timeout=10) as response:
        server = json.load(response)
    versions = {}
    for package in ("onnxruntime", "nvidia-pytriton", "fastapi", "uvicorn", "httptools", "pillow", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu": cpu,
        "simd": sorted(flags & SIMD_FLAGS),
        "cores": os.cpu_count(),
        "gpu": gpu,
        "python": platform.python_version(),
        "triton": f"{server.get('name', 'triton')} {server.get('version', '?')}",
        "versions": versions,
    }


class Served:
    """One running Triton + gateway pair and the three ways to call a model through it."""

    def __init__(self, repo: Path, triton: EmbeddedTriton, gateway: GatewayProcess):
        self.repo, self.manifest = repo, read_manifest(repo)
        self.triton_http, self.gateway_url = triton.http_url, gateway.url
        self.client = httpx.Client(timeout=60)
        size = self.manifest.preprocessing.image_size
        self.png = render(digits_gray()[0][SAMPLE_DIGIT], ClientForm(size=size, resample="bicubic"))
        self.tensor = prepare(Image.open(io.BytesIO(self.png)), self.manifest.preprocessing)[None]

    def close(self) -> None:
        self.client.close()

    def stats(self, model: str) -> TritonStats:
        return TritonStats.read(self.triton_http, model)

    def in_process(self, model: str, images: int = 1) -> Callable[[], object]:
        entry = self.manifest.models[model]
        session = open_session(self.repo / model / str(entry.version) / "model.onnx")  # as Triton serves it
        batch = np.repeat(self.tensor, images, axis=0)
        return lambda: session.run(None, {"images": batch})

    def _triton_request(self, model: str, images: int) -> tuple[str, bytes, dict[str, str]]:
        output = self.manifest.models[model].output.name
        body, json_size = infer_request(np.repeat(self.tensor, images, axis=0), output)
        url = f"http://{self.triton_http}/v2/models/{model}/infer"
        return url, body, {"Inference-Header-Content-Length": str(json_size)}

    def _gateway_request(self, alias: str, images: int) -> tuple[str, dict]:
        url = f"{self.gateway_url}/v1/classify?model={alias}"
        if images == 1:
            return url, {"content": self.png, "headers": {"Content-Type": "image/png"}}
        return url, {"files": [("images", (f"{i}.png", self.png, "image/png")) for i in range(images)]}

    def triton(self, model: str, images: int = 1) -> Callable[[], object]:
        url, body, headers = self._triton_request(model, images)
        return lambda: self.client.post(url, content=body, headers=headers).raise_for_status()

    def triton_async(self, model: str, images: int = 1):
        url, body, headers = self._triton_request(model, images)

        async def call(client: aiohttp.ClientSession) -> None:
            async with client.post(url, data=body, headers=headers) as response:
                await response.read()
                response.raise_for_status()

        return call

    def gateway_held_out(self, alias: str) -> Callable[[], object]:
        """One held-out test digit a call, the next one each time (as sent by a client at the served size)."""
        digits, _ = held_out(self.manifest.split)
        size = self.manifest.preprocessing.image_size
        pngs = itertools.cycle([render(d, ClientForm(size=size, resample="bicubic")) for d in digits])
        url = f"{self.gateway_url}/v1/classify?model={alias}"
        headers = {"Content-Type": "image/png"}
        return lambda: self.client.post(url, content=next(pngs), headers=headers).raise_for_status()

    def gateway(self, alias: str, images: int = 1) -> Callable[[], object]:
        url, kwargs = self._gateway_request(alias, images)
        return lambda: self.client.post(url, **kwargs).raise_for_status()

    def gateway_async(self, alias: str):
        """One image a request, sent as a raw PNG body."""
        url = f"{self.gateway_url}/v1/classify?model={alias}"

        async def call(client: aiohttp.ClientSession) -> None:
            async with client.post(url, data=self.png, headers={"Content-Type": "image/png"}) as response:
                await response.read()
                response.raise_for_status()

        return call


def latency_c1(served: Served, model: str, alias: str, requests: int, images: int = 1) -> dict:
    """In-process, Triton direct and gateway at concurrency 1, interleaved, with Triton's statistics per path."""
    totals = {"triton_direct": TritonStats(), "gateway": TritonStats()}

    @contextlib.contextmanager
    def triton_statistics(path: str) -> Iterator[None]:
        if path not in totals:
            yield
            return
        before = served.stats(model)
        yield
        totals[path] = totals[path] + (served.stats(model) - before)

    calls = {
        "in_process": served.in_process(model, images),
        "triton_direct": served.triton(model, images),
        "gateway": served.gateway(alias, images),
    }
    samples = time_interleaved(calls, requests, around_block=triton_statistics)
    figures = {path: summarize(s) for path, s in samples.items()}
    for path, stats in totals.items():
        figures[path]["triton"] = stats.figures()
    return figures


def throughput_curve(served: Served, model: str, alias: str) -> dict:
    curve: dict = {"in_process": {}, "triton_direct": {}, "gateway": {}}
    for concurrency in CONCURRENCY:
        curve["in_process"][concurrency] = load_threads(served.in_process(model), concurrency, LOAD_SECONDS)
        for path, call in (
            ("triton_direct", served.triton_async(model)),
            ("gateway", served.gateway_async(alias)),
        ):
            before = served.stats(model)
            figures = load_async(call, concurrency, LOAD_SECONDS)
            figures["triton"] = (served.stats(model) - before).figures()
            curve[path][concurrency] = figures
        print(
            f"[bench] {model} c={concurrency}: "
            + ", ".join(f"{p} {curve[p][concurrency]['throughput_per_s']:.0f}/s" for p in curve),
            flush=True,
        )
    return curve


def large_png(side: int = 4000) -> bytes:
    """A side x side PNG of a drawn ring: small on the wire (~38 KB at 4000), ~100 ms to decode and shrink."""
    canvas = Image.new("L", (side, side), 0)
    ImageDraw.Draw(canvas).ellipse(
        (side // 5, side * 3 // 20, side * 4 // 5, side * 17 // 20), outline=255, width=side // 13
    )
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def healthz_under_large_images(served: Served, seconds: float = 6.0) -> dict:
    """/healthz latency while two clients send 4000x4000 PNGs (decoding must not block the event loop)."""
    big = large_png()

    async def run() -> tuple[list[float], list[float]]:
        health: list[float] = []
        classified: list[float] = []
        async with load_client(4) as client:
            deadline = time.perf_counter() + seconds

            async def sender() -> None:
                while time.perf_counter() < deadline:
                    start = time.perf_counter()
                    url = f"{served.gateway_url}/v1/classify?model=student"
                    async with client.post(url, data=big, headers={"Content-Type": "image/png"}) as response:
                        await response.read()
                        response.raise_for_status()
                    classified.append((time.perf_counter() - start) * 1000)

            async def prober() -> None:
                while time.perf_counter() < deadline:
                    start = time.perf_counter()
                    async with client.get(f"{served.gateway_url}/healthz") as response:
                        await response.read()
                        response.raise_for_status()
                    health.append((time.perf_counter() - start) * 1000)
                    await asyncio.sleep(0.01)

            await asyncio.gather(sender(), sender(), prober())
        return health, classified

    health, classified = asyncio.run(run())
    return {"png_bytes": len(big), "healthz": summarize(health), "large_image_requests": summarize(classified)}


def ensembles(served: Served, requests: int) -> dict:
    manifest = served.manifest
    choices = [("one student", STUDENT)]
    if int8_name(STUDENT_KD) in manifest.models:
        choices.append((INT8_STUDENT, int8_name(STUDENT_KD)))
    if manifest.by_role("variant"):
        choices.append(("variants fused in the gateway", ENSEMBLE))
    triton_side = [FUSED_ENSEMBLE, int8_name(FUSED_ENSEMBLE), SCHEDULER_ENSEMBLE]
    choices += [(f"Triton: {name}", name) for name in triton_side if name in manifest.models]
    if MULTIHEAD in manifest.models:
        choices.append(("K-head model", MULTIHEAD))
    samples = time_interleaved({label: served.gateway(alias) for label, alias in choices}, requests)
    rows = {}
    for label, alias in choices:
        entry = trained_entry(manifest, alias)
        load = load_async(served.gateway_async(alias), 16, LOAD_SECONDS)
        rows[label] = {
            "model": alias,
            "top1": entry.metrics.get("top1") if entry else None,
            "latency_c1": summarize(samples[label]),
            "throughput_c16": load["throughput_per_s"],
        }
        print(f"[bench] {label}: p50 {rows[label]['latency_c1']['p50_ms']} ms", flush=True)
    return rows


def served_latency(served: Served, models: list[str], requests: int) -> dict[str, dict]:
    """Gateway latency of each model at concurrency 1, interleaved, cycling through the held-out digits
    (a cascade's cost depends on which images its student is unsure of, so one image would not do)."""
    samples = time_interleaved({m: served.gateway_held_out(m) for m in models}, requests)
    return {m: summarize(s) for m, s in samples.items()}


def write_served_pareto(run: Path, served_ms: dict[str, dict], out_dir: Path) -> None:
    results = json.loads((run / "results.json").read_text())
    export_report = json.loads((run / "export_report.json").read_text())
    rows = pareto_rows(results, export_report, {m: f["mean_ms"] for m, f in served_ms.items()})
    note = (
        f"Every served model of `{run}` on the held-out test split (top-1, ECE, params, MACs, ONNX file from "
        "training and export). In-process: ONNX Runtime, one image, median. Served: mean ms of one-image "
        "requests through the gateway at concurrency 1, cycling through the held-out digits, this run. The "
        "cascade's in-process cost is the student's plus the teacher's for the share it escalated."
    )
    write_pareto(rows, out_dir, f"{results['recipe']}: accuracy vs. cost", note)


def _ratio(a: float, b: float) -> float:
    return round(a / b, 2)


def teacher_over_student(served: Served, figures: dict[str, dict]) -> dict:
    s, t = figures["student"], figures["teacher"]
    macs = {n: served.manifest.models[n].metrics.get("macs") for n in (STUDENT_KD, TEACHER)}
    return {
        "image_size": served.manifest.preprocessing.image_size,
        "latency_p50": {p: _ratio(t[p]["p50_ms"], s[p]["p50_ms"]) for p in ("in_process", "triton_direct", "gateway")},
        "macs": _ratio(macs["teacher"], macs[STUDENT_KD]) if all(macs.values()) else None,
    }


def run_bench(
    repo: Path, out_dir: Path, timing_repo: Path | None = None, requests: int = 1000, run: Path | None = None
) -> dict:
    started = time.perf_counter()
    results: dict = {"requests_c1": requests, "load_seconds": LOAD_SECONDS, "targets": TARGETS}
    with serving(repo) as (triton, gateway):
        served = Served(repo, triton, gateway)
        results["machine"] = machine(served.triton_http)
        manifest: Manifest = served.manifest
        paths = {}
        for label, model, alias, n in (
            (STUDENT, STUDENT_KD, STUDENT, requests),
            (TEACHER, TEACHER, TEACHER, requests // 3),
            ("student_int8", int8_name(STUDENT_KD), int8_name(STUDENT_KD), requests // 3),
        ):
            if model in manifest.models:
                paths[label] = {"model": model, "top1": manifest.models[model].metrics.get("top1")}
                paths[label].update(latency_c1(served, model, alias, n))
                print(
                    f"[bench] {label} c=1 p50: "
                    + ", ".join(
                        f"{p} {paths[label][p]['p50_ms']} ms" for p in ("in_process", "triton_direct", "gateway")
                    ),
                    flush=True,
                )
        results["latency_c1"] = paths
        results["images_per_request"] = {
            str(n): latency_c1(served, STUDENT_KD, STUDENT, requests // 5, images=n) for n in (1, 16)
        }
        results["throughput"] = {
            name: throughput_curve(served, name, alias) for name, alias in ((STUDENT_KD, STUDENT), (TEACHER, TEACHER))
        }
        results["healthz_under_large_images"] = healthz_under_large_images(served)
        results["ensembles"] = ensembles(served, requests // 3)
        results["teacher_over_student"] = {"digits": teacher_over_student(served, paths)}
        if run is not None:
            export_report = json.loads((run / "export_report.json").read_text())
            names = [n for n, r in export_report["models"].items() if "latency_ms_batch1" in r]
            names += ["cascade"] if manifest.cascade is not None else []
            results["served_models"] = served_latency(served, names, requests // 5)
            write_served_pareto(run, results["served_models"], out_dir)
        served.close()
    if timing_repo is not None:
        results["timing_repo"] = str(timing_repo)
        with serving(timing_repo) as (triton, gateway):
            served = Served(timing_repo, triton, gateway)
            large = {
                label: latency_c1(served, model, alias, max(30, requests // 20))
                for label, model, alias in ((STUDENT, STUDENT_KD, STUDENT), (TEACHER, TEACHER, TEACHER))
            }
            results["latency_c1_224"] = large
            results["teacher_over_student"]["224"] = teacher_over_student(served, large)
            served.close()
    results["checks"] = checks(results)
    results["seconds"] = round(time.perf_counter() - started, 1)
    write_results(out_dir, results, results_markdown(results))
    return results


def checks(results: dict) -> dict[str, dict]:
    """Each target of the serving issue against this run's figure: value, target, met."""
    student = results["latency_c1"]["student"]
    direct, gw = student["triton_direct"], student["gateway"]
    c16 = {p: results["throughput"][STUDENT_KD][p][16]["throughput_per_s"] for p in ("triton_direct", "gateway")}
    ens = results["ensembles"]
    single = {"one student", INT8_STUDENT}

    def fastest(int8: bool) -> float | None:
        fused = [
            row["latency_c1"]["p50_ms"]
            for label, row in ens.items()
            if label not in single and row["model"] != "multihead" and row["model"].endswith("_int8") == int8
        ]
        return min(fused, default=None)

    # Like with like: fp32 ensembles against the fp32 student, the INT8 ensemble against the INT8 student.
    best_ensemble, best_int8 = fastest(False), fastest(True)
    values = {
        "triton_c1_max_ms": direct["max_ms"],
        "triton_c1_p99_ms": direct["p99_ms"],
        "overhead_p50_ms": round(gw["p50_ms"] - direct["p50_ms"], 3),
        "overhead_p99_ms": round(gw["p99_ms"] - direct["p99_ms"], 3),
        "healthz_p99_ms": results["healthz_under_large_images"]["healthz"]["p99_ms"],
        "gateway_over_triton_c16": _ratio(c16["gateway"], c16["triton_direct"]),
        "ensemble_over_student_p50": (
            _ratio(best_ensemble, ens["one student"]["latency_c1"]["p50_ms"]) if best_ensemble else None
        ),
        "int8_ensemble_over_int8_student_p50": (
            _ratio(best_int8, ens[INT8_STUDENT]["latency_c1"]["p50_ms"]) if best_int8 and INT8_STUDENT in ens else None
        ),
    }
    at_least = {"gateway_over_triton_c16"}
    out = {}
    for key, target in TARGETS.items():
        value = values[key]
        met = None if value is None else (value >= target if key in at_least else value <= target)
        out[key] = {"value": value, "target": target, "met": met}
    return out


CHECK_TEXT = {
    "triton_c1_max_ms": "Triton direct, student, c=1: slowest call (ms; a queue stall shows as ~500)",
    "triton_c1_p99_ms": "Triton direct, student, c=1: p99 (ms)",
    "overhead_p50_ms": "gateway minus Triton direct, c=1: p50 (ms)",
    "overhead_p99_ms": "gateway minus Triton direct, c=1: p99 (ms)",
    "healthz_p99_ms": "/healthz p99 while 4000x4000 PNGs are classified (ms)",
    "gateway_over_triton_c16": "gateway / Triton direct throughput at 16 clients",
    "ensemble_over_student_p50": "fastest fp32 fused ensemble / one fp32 student, gateway p50 at c=1",
    "int8_ensemble_over_int8_student_p50": "INT8 fused ensemble / one INT8 student, gateway p50 at c=1",
}


def _ms(f: dict) -> str:
    return f"{f['p50_ms']:.2f} / {f['p99_ms']:.2f} / {f['max_ms']:.1f}"


def _triton(f: dict) -> str:
    t = f.get("triton") or {}
    if t.get("queue_ms") is None:
        return "—"
    return f"{t['queue_ms']:.3f} / {t['compute_ms']:.3f} / {t['mean_batch']:.2f}"


def _header(results: dict) -> list[str]:
    m = results["machine"]
    return [
        "# kdserve benchmarks",
        "",
        f"Machine: {m['cpu']} ({', '.join(m['simd']) or 'no AVX2'}), {m['cores']} cores, GPU: {m['gpu'] or 'none'}; "
        f"{m['triton']} (embedded, Python backend + ONNX Runtime); Python {m['python']}; "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
        + f". Whole run: {results['seconds']:.0f} s. The load generator shares the cores with the servers.",
        "",
        "Triton direct and the gateway are called with the same HTTP client (httpx at concurrency 1, aiohttp",
        "under load), interleaved, so their difference is what the gateway adds. In-process is ONNX Runtime",
        "with the served settings (2 threads, no spinning). **Triton columns**: Triton's own statistics for that",
        "phase, mean queue ms / mean compute ms per request / mean batch it formed.",
    ]


def _section(title: str, header: list[str], rows: list[list], align: str = "", intro: str = "") -> list[str]:
    return ["", f"## {title}", "", *([intro, ""] if intro else []), markdown_table(header, rows, align)]


def _targets(results: dict) -> list[str]:
    met = {True: "yes", False: "**no**", None: "—"}
    rows = [[CHECK_TEXT[key], c["value"], c["target"], met[c["met"]]] for key, c in results["checks"].items()]
    return _section("Targets", ["what", "this run", "target", "met"], rows, "l r r c")


def _concurrency_1(results: dict) -> list[str]:
    rows = [
        [
            f"{label} (`{f['model']}`)",
            percent(f["top1"]),
            _ms(f["in_process"]),
            _ms(f["triton_direct"]),
            _triton(f["triton_direct"]),
            _ms(f["gateway"]),
            _triton(f["gateway"]),
            f["triton_direct"]["over_100ms"] + f["gateway"]["over_100ms"],
        ]
        for label, f in results["latency_c1"].items()
    ]
    header = [
        "model", "top-1", "in-process p50 / p99 / max ms", "Triton p50 / p99 / max ms",
        "Triton: queue / compute / batch", "gateway p50 / p99 / max ms", "gateway's Triton: queue / compute / batch",
        "calls over 100 ms",
    ]  # fmt: skip
    title = f"Concurrency 1, one image: in-process vs Triton direct vs gateway ({results['requests_c1']} student calls)"
    return _section(title, header, rows)


def _images_per_request(results: dict) -> list[str]:
    rows = [
        [
            n,
            f"{f['in_process']['p50_ms']:.2f}",
            f"{f['triton_direct']['p50_ms']:.2f}",
            f"{f['gateway']['p50_ms']:.2f}",
            f"{f['gateway']['p50_ms'] / int(n):.3f}",
            _triton(f["gateway"]),
        ]
        for n, f in results["images_per_request"].items()
    ]
    header = ["images", "in-process p50 ms", "Triton p50 ms", "gateway p50 ms", "gateway ms per image"]
    return _section(
        "Images per request (student, c=1)", [*header, "Triton: queue / compute / batch"], rows, "r " * 5 + "r"
    )


def _throughput(results: dict) -> list[str]:
    rows = []
    for model, curve in results["throughput"].items():
        for c in curve["in_process"]:
            ip, td, gw = curve["in_process"][c], curve["triton_direct"][c], curve["gateway"][c]
            rows.append(
                [
                    model, c, f"{ip['throughput_per_s']:.0f}", f"{td['throughput_per_s']:.0f}", f"{td['p50_ms']:.1f}",
                    _triton(td), f"{gw['throughput_per_s']:.0f}", f"{gw['p50_ms']:.1f}", _triton(gw),
                ]
            )  # fmt: skip
    header = [
        "model", "clients", "in-process img/s", "Triton img/s", "Triton p50 ms", "Triton: queue / compute / batch",
        "gateway img/s", "gateway p50 ms", "gateway's Triton: queue / compute / batch",
    ]  # fmt: skip
    intro = "In-process: that many threads; Triton and gateway: that many concurrent requests from one async client."
    title = f"Throughput by concurrency (one image a request, {results['load_seconds']:.0f} s a point)"
    return _section(title, header, rows, intro=intro)


def _event_loop(results: dict) -> list[str]:
    h = results["healthz_under_large_images"]
    return [
        "",
        "## The event loop while large images decode",
        "",
        f"Two clients send a {h['png_bytes']:,}-byte 4000x4000 PNG in a loop ({h['large_image_requests']['requests']} "
        f"classified, p50 {h['large_image_requests']['p50_ms']:.0f} ms each) while a third calls `/healthz`: "
        f"p50 {h['healthz']['p50_ms']:.2f} ms, p99 {h['healthz']['p99_ms']:.2f} ms, "
        f"max {h['healthz']['max_ms']:.1f} ms over {h['healthz']['requests']} calls.",
    ]


def _ensembles(results: dict) -> list[str]:
    rows = [
        [f"{label} (`{e['model']}`)", percent(e["top1"]), _ms(e["latency_c1"]), f"{e['throughput_c16']:.0f}"]
        for label, e in results["ensembles"].items()
    ]
    header = ["what", "top-1", "c=1 p50 / p99 / max ms", "img/s at 16 clients"]
    return _section("Ensembles through the gateway, against one student", header, rows)


def _teacher_over_student(results: dict) -> list[str]:
    rows = [
        [
            f"{key} ({r['image_size']}x{r['image_size']})",
            r["macs"] or "—",
            r["latency_p50"]["in_process"],
            r["latency_p50"]["triton_direct"],
            r["latency_p50"]["gateway"],
        ]
        for key, r in results["teacher_over_student"].items()
    ]
    header = ["input", "MACs ratio", "in-process p50 ratio", "Triton p50 ratio", "gateway p50 ratio"]
    lines = _section("Teacher / student: how much of the speed-up survives serving", header, rows)
    if "latency_c1_224" in results:
        rows = [
            [label, _ms(f["in_process"]), _ms(f["triton_direct"]), _ms(f["gateway"])]
            for label, f in results["latency_c1_224"].items()
        ]
        header = ["model", "in-process p50 / p99 / max ms", "Triton p50 / p99 / max ms", "gateway p50 / p99 / max ms"]
        lines += [
            "",
            "At 224x224 (untrained ResNet18 student vs ResNet50 teacher, from `python -m training timing-repo`), c=1:",
            "",
            markdown_table(header, rows),
        ]
    return lines


def _served_models(results: dict) -> list[str]:
    if "served_models" not in results:
        return []
    rows = [[name, f"{f['mean_ms']:.2f}", f"{f['p99_ms']:.2f}"] for name, f in results["served_models"].items()]
    intro = (
        "Mean / p99 ms of one-image requests at c=1, interleaved, cycling through the held-out digits. With "
        "accuracy, size and in-process cost: [pareto.md](pareto.md) (table and chart)."
    )
    return _section("Every served model through the gateway", ["model", "mean ms", "p99 ms"], rows, intro=intro)


def results_markdown(results: dict) -> str:
    sections = (_targets, _concurrency_1, _images_per_request, _throughput, _event_loop, _ensembles)
    lines = _header(results)
    for section in (*sections, _teacher_over_student, _served_models):
        lines += section(results)
    lines += ["", f"A call over {STALL_MS:.0f} ms at concurrency 1 counts as a stall in the first table."]
    return "\n".join(lines) + "\n"
