"""`python -m loadtest dashboard`: the Grafana dashboard's panels, drawn from a real Prometheus.

The demo repository is served by the embedded Triton and the gateway (A/B split 70/30, 20% shadowed),
Debian's Prometheus scrapes both with the project's scrape jobs and rules every 2 s, mixed traffic
flows for a few minutes; then every panel's queries are read back over that window and drawn with
matplotlib (Grafana itself is not packaged for this machine: the chart stands in for its screenshot),
with the last value of each series in a markdown table.
"""

from __future__ import annotations

import asyncio
import json
import re
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

from gateway.process import serving
from loadtest.benchmarks.soak import mixed_traffic, traffic_models
from loadtest.stacks.monitoring import DASHBOARD, PanelQuery, PrometheusServer, dashboard_queries, local_config

SCRAPE = "2s"
USERS_PER_CLIENT = 50  # 200 A/B users with 4 clients: the split can approach the configured 70/30
STEP_S = 4.0
# Grafana units -> (scale, axis label) for the chart.
UNITS = {"s": (1000.0, "ms"), "percentunit": (100.0, "%"), "reqps": (1.0, "per s"), "bytes": (2**-20, "MiB")}


def panel_units() -> dict[str, str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return {p["title"]: p["fieldConfig"]["defaults"].get("unit", "short") for p in panels if p["type"] != "row"}


def legend(query: PanelQuery, labels: dict[str, str]) -> str:
    """Grafana's legendFormat: {{label}} replaced by the series' label value."""
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), query.legend) or query.expr


def collect(repo: Path, minutes: float, clients: int) -> dict:
    env = {
        "KDSERVE_AB_WEIGHTS": '{"student": 0.7, "teacher": 0.3}',
        "KDSERVE_SHADOW_FRACTION": "0.2",
        "KDSERVE_ENSEMBLE_QUORUM": "1",
    }
    work = Path(tempfile.mkdtemp(prefix="kdserve-dashboard-"))
    queries = [q for q in dashboard_queries() if not q.gpu_only]
    with serving(repo, env) as (triton, gateway):
        targets = {"kdserve-gateway": f"127.0.0.1:{gateway.port}", "triton": f"127.0.0.1:{triton.ports.metrics}"}
        with PrometheusServer(local_config(work, targets, interval=SCRAPE)) as prometheus:
            prometheus.wait_for(lambda: all(prometheus.targets_up().values()), 30, "both targets up")
            start = time.time()
            log: list = []
            stop = time.monotonic() + minutes * 60
            asyncio.run(mixed_traffic(gateway.url, traffic_models(repo), stop, clients, log, USERS_PER_CLIENT))
            time.sleep(3 * float(SCRAPE.rstrip("s")))  # the last scrapes and rule evaluations
            end = time.time()
            series = {q: prometheus.query_range(q.expr, start, end, STEP_S) for q in queries}
    statuses = Counter("lost" if s < 0 else ("expected" if s == e else f"unexpected {s}") for _, _, s, e in log)
    return {"start": start, "end": end, "series": series, "requests": len(log), "outcomes": dict(statuses)}


def chart(collected: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    units = panel_units()
    panels: dict[str, list[PanelQuery]] = defaultdict(list)
    for query in collected["series"]:
        panels[query.panel].append(query)
    cols = 3
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.2 * rows), squeeze=False)
    for ax, (title, queries) in zip(axes.flat, panels.items(), strict=False):
        scale, unit = UNITS.get(units[title], (1.0, ""))
        for query in queries:
            for result in collected["series"][query]:
                points = [(float(t) - collected["start"], float(v) * scale) for t, v in result["values"]]
                ax.plot(*zip(*points, strict=True), label=legend(query, result["metric"]), linewidth=1.2)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(unit, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="upper left", ncol=2)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.supxlabel("seconds since traffic started", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def markdown(collected: dict, machine: str, minutes: float, clients: int) -> str:
    lines = [
        "# Dashboard panels from a real Prometheus",
        "",
        f"Machine: {machine}. `python -m loadtest dashboard`: the demo repository served by the embedded Triton",
        f"and the gateway, Debian's Prometheus scraping both every {SCRAPE} with deploy/monitoring's rules,",
        f"{minutes:g} min of mixed traffic from {clients} clients ({collected['requests']:,} requests, outcomes",
        f"{collected['outcomes']}). Every query of every panel of `deploy/monitoring/grafana/dashboards/",
        "kdserve.json` except the two GPU-only ones, read back over the traffic window: ![](dashboard.png)",
        "",
        "| panel | series | last value |",
        "|---|---|---|",
    ]
    for query, results in collected["series"].items():
        for result in results:
            value = float(result["values"][-1][1]) if result["values"] else float("nan")
            lines.append(f"| {query.panel} | {legend(query, result['metric'])} | {value:.4g} |")
    return "\n".join(lines) + "\n"


def run_dashboard(repo: Path, minutes: float, clients: int, out_dir: Path, machine: str) -> Path:
    collected = collect(repo, minutes, clients)
    out_dir.mkdir(parents=True, exist_ok=True)
    chart(collected, out_dir / "dashboard.png")
    path = out_dir / "dashboard.md"
    path.write_text(markdown(collected, machine, minutes, clients))
    return path
