"""The accuracy-cost report: every served model's test accuracy against what it costs to run.

Rows join three records: training's `results.json` (accuracy, ECE, params, MACs), export's report (ONNX
file size, in-process ONNX Runtime latency of one image, INT8 accuracy) and, when `make bench` ran, the
gateway's latency per model. Written as a table and a chart (`pareto.md`, `pareto.png`) and as a
section of the run's `results.md`. Both sides write it (export with in-process figures, the bench with
served ones), so it lives in the contract package; matplotlib is imported only to draw.
"""

from __future__ import annotations

from pathlib import Path

from kdcontract.names import CASCADE, INT8_SUFFIX, trained_result_name

SECTION = "## Accuracy vs. cost"


def pareto_rows(results: dict, export_report: dict, served_ms: dict[str, float] | None = None) -> list[dict]:
    """One row per served model, plus the cascade (its cost is the student's plus the escalated share
    of the teacher's, as measured on the test split)."""
    trained, exported = results["models"], export_report["models"]
    rows = []
    for name, report in exported.items():
        if "latency_ms_batch1" not in report:
            continue
        base = trained[trained_result_name(name)]
        if name.endswith(INT8_SUFFIX):
            quality = {"top1": report["int8_top1"], "ece": report["int8_ece"]}
            precision = "int8"
        else:
            quality = {"top1": base["top1"], "ece": base["ece"]}
            precision = "fp32"
        rows.append(
            {
                "model": name,
                "precision": precision,
                **quality,
                "params": base["params"],
                "macs": base["macs"],
                "file_bytes": report["onnx_bytes"],
                "in_process_ms": report["latency_ms_batch1"],
            }
        )
    cascade = trained.get(CASCADE)
    if cascade is not None:
        student, teacher = cascade["members"]
        by_name = {r["model"]: r for r in rows}
        if student in by_name and teacher in by_name:
            rate = cascade["escalation_rate"]
            rows.append(
                {
                    "model": CASCADE,
                    "precision": "fp32",
                    "top1": cascade["top1"],
                    "ece": cascade["ece"],
                    "params": cascade["params"],
                    "macs": cascade["macs"],
                    "file_bytes": by_name[student]["file_bytes"] + by_name[teacher]["file_bytes"],
                    "in_process_ms": by_name[student]["in_process_ms"] + rate * by_name[teacher]["in_process_ms"],
                    "escalation_rate": rate,
                }
            )
    for row in rows:
        row["served_ms"] = (served_ms or {}).get(row["model"])
    return sorted(rows, key=lambda r: r["in_process_ms"])


def frontier(rows: list[dict]) -> set[str]:
    """Models no other model beats on both accuracy and in-process latency."""
    best, on_frontier = -1.0, set()
    for row in sorted(rows, key=lambda r: (r["in_process_ms"], -r["top1"])):
        if row["top1"] > best:
            best = row["top1"]
            on_frontier.add(row["model"])
    return on_frontier


def pareto_markdown(rows: list[dict], chart: str, note: str) -> str:
    front = frontier(rows)
    lines = [
        SECTION,
        "",
        note,
        "",
        "| model | precision | top-1 | ECE | params | MACs/image | file | in-process ms | served ms | frontier |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in rows:
        served = f"{r['served_ms']:.2f}" if r["served_ms"] is not None else "—"
        name = r["model"] + (f" ({r['escalation_rate']:.0%} escalated)" if "escalation_rate" in r else "")
        lines.append(
            f"| {name} | {r['precision']} | {100 * r['top1']:.2f}% | {100 * r['ece']:.2f}% | {r['params'] / 1e6:.2f} M "
            f"| {r['macs'] / 1e6:.1f} M | {r['file_bytes'] / 2**20:.1f} MiB | {r['in_process_ms']:.2f} | {served} "
            f"| {'*' if r['model'] in front else ''} |"
        )
    lines += ["", f"![accuracy vs. latency]({chart})", ""]
    return "\n".join(lines)


def pareto_chart(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front = frontier(rows)
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    same_accuracy: dict[float, int] = {}  # models with equal top-1 get their labels stacked, not overprinted
    for r in rows:
        colour = "tab:green" if r["precision"] == "int8" else "tab:blue"
        if r["model"] == CASCADE:
            colour = "tab:red"
        point = (r["in_process_ms"], 100 * r["top1"])
        ax.scatter(*point, s=30 + r["file_bytes"] / 2**20 * 2, color=colour, alpha=0.7)  # area grows with file size
        k = same_accuracy.get(round(r["top1"], 4), 0)
        same_accuracy[round(r["top1"], 4)] = k + 1
        ax.annotate(r["model"], point, fontsize=8, xytext=(6, 4 - 10 * k), textcoords="offset points")
    line = sorted((r for r in rows if r["model"] in front), key=lambda r: r["in_process_ms"])
    ax.step([r["in_process_ms"] for r in line], [100 * r["top1"] for r in line], where="post", color="grey", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("in-process latency, one image (ms, ONNX Runtime, log scale)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_pareto(
    rows: list[dict], out_dir: Path, title: str, note: str, results_md: Path | None = None
) -> tuple[Path, Path]:
    """`pareto.md` and `pareto.png` in `out_dir`; the section also replaces its old self in `results_md`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    chart = out_dir / "pareto.png"
    pareto_chart(rows, chart, title)
    section = pareto_markdown(rows, chart.name, note)
    table = out_dir / "pareto.md"
    table.write_text(section)
    if results_md is not None and results_md.exists():
        before = results_md.read_text().split("\n" + SECTION)[0].rstrip("\n")
        results_md.write_text(before + "\n\n" + section)
    return table, chart
