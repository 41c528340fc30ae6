"""`python -m loadtest report <run dir>`: report.md and PNG charts from a `loadtest run`.

Latency percentiles, throughput and error rate per model at each offered load (Locust's
user-count steps), the teacher-vs-student comparison with the manifest's accuracy beside it, and
the load generator's CPU use.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

from loadtest.clients.run import model_concurrency

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt


def _number(value: str) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def load_steps(run: Path) -> dict[str, dict[int, dict[str, float]]]:
    """{request name: {users: {p50, p95, p99, rps, fail_ratio}}} from Locust's full stats history."""
    rows: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    with (run / "locust_stats_history.csv").open() as fh:
        for row in csv.DictReader(fh):
            users = int(row["User Count"])
            if row["Name"] == "Aggregated" or users == 0 or _number(row["50%"]) is None:
                continue
            rows[row["Name"]][users].append(row)
    steps: dict[str, dict[int, dict[str, float]]] = {}
    for name, by_users in rows.items():
        steps[name] = {}
        for users, samples in sorted(by_users.items()):
            # History percentiles are over a recent window; the median over the step smooths them.
            def med(column: str, samples=samples) -> float:
                values = [v for v in (_number(s[column]) for s in samples) if v is not None]
                return statistics.median(values) if values else 0.0

            rps = med("Requests/s")
            steps[name][users] = {
                "p50": med("50%"),
                "p95": med("95%"),
                "p99": med("99%"),
                "rps": rps,
                "fail_ratio": med("Failures/s") / rps if rps else 0.0,
            }
    return steps


def load_totals(run: Path) -> dict[str, dict]:
    with (run / "locust_stats.csv").open() as fh:
        return {row["Name"]: row for row in csv.DictReader(fh)}


def _chart(steps: dict, metric_sets: list[tuple[str, str]], ylabel: str, title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, by_users in steps.items():
        users = sorted(by_users)
        for key, style in metric_sets:
            ax.plot(users, [by_users[u][key] for u in users], style, marker="o", label=f"{name} {key}")
    ax.set_xlabel("offered load (concurrent users)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(run: Path) -> Path:
    summary = json.loads((run / "run.json").read_text())
    steps = load_steps(run)
    totals = load_totals(run)
    accuracy = json.loads((run / "accuracy.json").read_text()) if (run / "accuracy.json").exists() else {}
    _chart(steps, [("p50", "-"), ("p99", "--")], "latency (ms)", "Latency vs load", run / "latency.png")
    _chart(steps, [("rps", "-")], "requests / s", "Throughput vs load", run / "throughput.png")
    _chart(steps, [("fail_ratio", "-")], "failure ratio", "Errors vs load", run / "errors.png")

    agg = totals.get("Aggregated", {})
    lines = [
        f"# Load test: scenario `{summary['scenario']}`",
        "",
        f"Host {summary['host']}; user classes {', '.join(summary['user_classes'])}; "
        f"{'stages ' + summary['stages'] if summary['stages'] else str(summary['users']) + ' users'}; "
        f"{summary['seconds']} s. Requests {agg.get('Request Count', '?')}, failures {agg.get('Failure Count', '?')}, "
        f"p50 {agg.get('50%', '?')} ms, p99 {agg.get('99%', '?')} ms, {float(agg.get('Requests/s', 0)):.1f} req/s.",
        "",
        f"Load generator CPU: {summary['generator_cpu_seconds']} s over {summary['wall_seconds']} s wall = "
        f"{100 * summary['generator_cpu_share_of_one_core']:.0f}% of one core (the machine has {summary['cores']}); "
        "the gateway, Triton and the generator share these cores.",
        "",
        "![latency](latency.png) ![throughput](throughput.png) ![errors](errors.png)",
        "",
        "## Per model and load step",
        "",
        "Percentiles are Locust's rolling-window figures, the median over each step's samples.",
        "",
        "| request | users | p50 ms | p95 ms | p99 ms | req/s | failure ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, by_users in steps.items():
        for users, s in by_users.items():
            lines.append(
                f"| {name} | {users} | {s['p50']:.1f} | {s['p95']:.1f} | {s['p99']:.1f} | {s['rps']:.1f} | "
                f"{s['fail_ratio']:.3f} |"
            )
    student, teacher = steps.get("classify student"), steps.get("classify teacher")
    if student and teacher:
        top1 = summary["manifest_top1"]
        lines += [
            "",
            "## Teacher vs student",
            "",
            f"Test-split top-1 from the manifest: student {100 * (top1.get('student_kd') or 0):.2f}%, "
            f"teacher {100 * (top1.get('teacher') or 0):.2f}%.",
            "",
            "| users | student p50 / p99 ms | teacher p50 / p99 ms | p50 ratio | p99 ratio |",
            "|---:|---:|---:|---:|---:|",
        ]
        for users in sorted(set(student) & set(teacher)):
            s, t = student[users], teacher[users]
            lines.append(
                f"| {users} | {s['p50']:.1f} / {s['p99']:.1f} | {t['p50']:.1f} / {t['p99']:.1f} | "
                f"x{t['p50'] / s['p50']:.2f} | x{t['p99'] / s['p99']:.2f} |"
            )
    direct = summary.get("perf_analyzer") or []
    if direct:
        lines += [
            "",
            "## Gateway overhead vs model time (perf_analyzer on Triton directly, same models and concurrency)",
            "",
            "Each request's Triton models at the concurrency they saw: A/B traffic reaches both arms in proportion",
            "to their weights, so both arms are measured.",
            "",
            "| request | Triton model (share of users) | users | its concurrency | gateway p50 ms (Locust) | "
            "Triton p50 ms (perf_analyzer) | Triton server compute ms | gateway overhead p50 ms |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for d in direct:
            target = f"{d['model']} ({100 * d['share']:.0f}%)"
            if d.get("unstable"):
                lines.append(
                    f"| {d['request']} | {target} | — | {d['unstable']} | — | perf_analyzer found no stable "
                    "measurement (machine too loaded) | — | — |"
                )
            by_level = {row["concurrency"]: row for row in d["rows"]}
            for users, s in steps.get(d["request"], {}).items():
                row = by_level.get(model_concurrency(users, d["share"]))
                if row:
                    lines.append(
                        f"| {d['request']} | {target} | {users} | {row['concurrency']} | {s['p50']:.1f} | "
                        f"{row['p50_ms']:.1f} | {row['server_compute_ms']:.1f} | {s['p50'] - row['p50_ms']:.1f} |"
                    )
    if accuracy:
        lines += [
            "",
            "## Accuracy of the answers under load",
            "",
            "| model | correct / answered | top-1 |",
            "|---|---:|---:|",
        ]
        for model, a in accuracy.items():
            lines.append(f"| {model} | {a['correct']} / {a['total']} | {100 * (a['top1'] or 0):.2f}% |")
    report = run / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
