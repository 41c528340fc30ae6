"""`python -m loadtest cascade`: the confidence cascade served, next to its student and teacher.

In one run against the real Triton and gateway: top-1 of each over the held-out test digits, the share
of images the cascade escalated (the gateway's own counter), and mean latency of one-image requests at
concurrency 1, interleaved and cycling through the held-out digits (the cascade's cost depends on which
images its student is unsure of). The checks are the issue's: accuracy within 0.5 point of the teacher,
mean latency closer to the student's than to the teacher's.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from gateway.process import serving
from kdcontract.client_forms import ClientForm
from kdcontract.errors import UserError
from kdcontract.names import CASCADE, STUDENT, TEACHER
from kdcontract.tables import markdown_table
from loadtest.benchmarks.bench import Served, machine, served_latency
from loadtest.clients.measure import metric_value
from loadtest.clients.served_accuracy import held_out, top1_through_gateway

MAX_ACCURACY_GAP = 0.005


def check_cascade(repo: Path, requests: int = 300) -> dict:
    with serving(repo) as (triton, gateway):
        served = Served(repo, triton, gateway)
        cascade = served.manifest.cascade
        if cascade is None:
            raise UserError(f"{repo} serves no cascade (train with cascade.enabled and export)")
        models = {STUDENT: cascade.student, TEACHER: cascade.teacher, CASCADE: CASCADE}
        digits, labels = held_out(served.manifest.split)
        form = ClientForm(size=served.manifest.preprocessing.image_size)
        with httpx.Client(base_url=gateway.url, timeout=120) as client:
            before = client.get("/metrics").text
            top1 = {k: top1_through_gateway(client, m, form, digits, labels) for k, m in models.items()}
            after = client.get("/metrics").text
        answered = ("kdserve_cascade_escalations_total", {"outcome": "answered"})
        escalated = metric_value(after, *answered) - metric_value(before, *answered)
        latency = served_latency(served, list(models.values()), requests)
        results = {
            "machine": machine(served.triton_http),
            "repo": str(repo),
            "recipe": served.manifest.recipe,
            "images": len(digits),
            "threshold": cascade.threshold,
            "escalated_share": escalated / len(digits),
            "top1": top1,
            "mean_ms": {k: latency[m]["mean_ms"] for k, m in models.items()},
            "latency": {k: latency[m] for k, m in models.items()},
            "trained": cascade.metrics,
        }
        served.close()
    ms = results["mean_ms"]
    results["checks"] = {
        "accuracy_within_half_point_of_teacher": top1[CASCADE] >= top1[TEACHER] - MAX_ACCURACY_GAP - 1e-9,
        "latency_closer_to_student": ms[CASCADE] - ms[STUDENT] < ms[TEACHER] - ms[CASCADE],
    }
    return results


def markdown(results: dict) -> str:
    top1, ms = results["top1"], results["mean_ms"]
    lines = [
        f"# Confidence cascade, served (`{results['recipe']}`)",
        "",
        f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, GPU: "
        f"{results['machine']['gpu'] or 'none'}. The "
        f"{results['images']} held-out test digits through the gateway (8x8 PNG); latency: one-image requests at "
        "concurrency 1, interleaved, cycling through the held-out digits (`python -m loadtest cascade`).",
        "",
    ]
    rows = [
        [k, f"{100 * top1[k]:.2f}%", f"{ms[k]:.2f}", f"{f['p50_ms']:.2f}", f"{f['p99_ms']:.2f}"]
        for k, f in ((k, results["latency"][k]) for k in (STUDENT, CASCADE, TEACHER))
    ]
    lines.append(markdown_table(["model", "served top-1", "mean ms", "p50 ms", "p99 ms"], rows))
    checks = {k: "yes" if v else "no" for k, v in results["checks"].items()}
    lines += [
        "",
        f"Threshold {results['threshold']:.3f} (fitted on validation); the cascade sent "
        f"{results['escalated_share']:.1%} of the images to the teacher (the gateway's "
        "`kdserve_cascade_escalations_total`).",
        "",
        f"- accuracy within 0.5 point of the teacher: **{checks['accuracy_within_half_point_of_teacher']}**"
        f" ({100 * (top1['cascade'] - top1['teacher']):+.2f} pt)",
        f"- mean latency closer to the student's than the teacher's: "
        f"**{checks['latency_closer_to_student']}** (student {ms['student']:.2f}, cascade "
        f"{ms['cascade']:.2f}, teacher {ms['teacher']:.2f} ms)",
    ]
    return "\n".join(lines) + "\n"


def write(results: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "cascade.json").write_text(json.dumps(results, indent=2) + "\n")
    path = out_dir / "cascade.md"
    path.write_text(markdown(results))
    return path
