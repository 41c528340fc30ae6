"""`python -m loadtest demo`: Triton + gateway up, held-out digits classified over HTTP, side by side.

Starts the embedded Triton and the gateway (uvicorn, as `python -m gateway serve` runs it), sends
the digits test split as PNG files through HTTP to the student, the teacher and the ensemble,
prints a handful of predictions with latencies and each model's served accuracy next to the
accuracy training measured, then keeps serving (or exits with --once).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import httpx

from gateway.process import GatewayProcess
from gateway.triton_server import EmbeddedTriton, TritonPorts
from kdcontract.digits import digit_png_bytes, digits_gray, held_out_indices
from kdcontract.manifest import read_manifest
from kdcontract.names import available, trained_entry


def classify_all(client: httpx.Client, model: str, indices, batch: int = 32) -> tuple[list[dict], list[dict]]:
    """Every index through HTTP in multipart batches; returns per-image top-1 and per-request latencies."""
    predictions, latencies = [], []
    for start in range(0, len(indices), batch):
        chunk = indices[start : start + batch]
        files = [("images", (f"{i}.png", digit_png_bytes(int(i)), "image/png")) for i in chunk]
        resp = client.post("/v1/classify", params={"model": model, "top_k": 1}, files=files)
        resp.raise_for_status()
        body = resp.json()
        predictions += [p["top_k"][0] for p in body["predictions"]]
        latencies.append(body["latency"])
    return predictions, latencies


def run_demo(repo: Path, gateway_port: int, ports: TritonPorts, once: bool) -> int:
    manifest = read_manifest(repo)
    labels = digits_gray()[1]
    test = held_out_indices(manifest.split)
    triton_log = repo.resolve().parent / "triton.log"
    with (
        EmbeddedTriton(repo, ports, log_file=triton_log) as triton,
        GatewayProcess(repo, triton.http_url, port=gateway_port, ready_path="/readyz") as gateway,
    ):
        url = gateway.url
        models = available(manifest)
        results = {m: classify_all(gateway.client, m, test) for m in models}
        # One image per request, for latencies a single user sees.
        single = {m: [classify_all(gateway.client, m, [i])[1][0] for i in test[:20]] for m in models}
        _print_side_by_side(test, labels, results, single, manifest)
        print(f"\nWeb page {url}/  (draw a digit or drop a photo: student, teacher and ensemble side by side)")
        print(f"Gateway  {url}  (docs {url}/docs, metrics {url}/metrics, A/B {url}/v1/ab/summary)")
        print(
            f"Triton   http://{triton.http_url}  grpc {triton.grpc_url}  "
            f"metrics http://127.0.0.1:{ports.metrics}/metrics"
        )
        print(f"Try:     curl -s -F images=@some_digit.png '{url}/v1/classify?model=student'")
        if not once:
            print("Serving; Ctrl-C stops.", flush=True)
            stop = threading.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.set())
            stop.wait()
    return 0


def _print_side_by_side(test, labels, results, single, manifest) -> None:
    models = list(results)
    show = test[:: max(1, len(test) // 8)][:8]
    position = {int(i): k for k, i in enumerate(test)}
    print("\nHeld-out digits through HTTP (top-1 and its calibrated probability)\n")
    print(f"{'digit #':>8} {'true':>5} " + " ".join(f"{m:>16}" for m in models))
    for i in show:
        top1 = [results[m][0][position[int(i)]] for m in models]
        cells = [f"{p['label']:>6} ({p['probability']:.3f})" for p in top1]
        print(f"{int(i):>8} {labels[i]:>5} " + " ".join(f"{c:>16}" for c in cells))
    print(
        f"\n{'model':>14} {'served top-1':>13} {'trained top-1':>14} {'p50 ms/req (1 img)':>19} "
        f"{'inference ms':>13} {'decode ms':>10} {'fusion ms':>10}"
    )
    for m in models:
        served = sum(int(p["label"]) == labels[i] for p, i in zip(results[m][0], test, strict=True)) / len(test)
        entry = trained_entry(manifest, m)
        trained = f"{100 * entry.metrics['top1']:.2f}%" if entry and "top1" in entry.metrics else "—"
        lat = sorted(single[m], key=lambda x: x["total_ms"])
        mid = lat[len(lat) // 2]
        print(
            f"{m:>14} {100 * served:>12.2f}% {trained:>14} {mid['total_ms']:>19.2f} {mid['inference_ms']:>13.2f} "
            f"{mid['decode_ms']:>10.2f} {mid['fusion_ms']:>10.2f}"
        )
    print(f"({len(test)} held-out test digits; latencies are the median of 20 single-image requests)")
