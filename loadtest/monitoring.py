"""kdserve's monitoring, run for real: Debian's Prometheus with the project's scrape jobs and rules,
scraping a real gateway and Triton; the Grafana dashboard's and prometheus-adapter's queries asked of it.

The tests use it to prove that every recording rule, every panel and every HPA metric returns data and
that alerts fire; `python -m loadtest dashboard` uses it to chart the dashboard's panels (Grafana itself
is not packaged for this machine, so the chart draws the same queries with matplotlib).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from gateway.process import free_port

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
MONITORING = DEPLOY / "monitoring"
RULES = MONITORING / "prometheus" / "rules.yml"
SCRAPE_CONFIG = MONITORING / "prometheus" / "prometheus.yml"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "kdserve.json"
ADAPTER_CONFIG = MONITORING / "prometheus-adapter" / "config.yaml"

# What a PodMonitor/ServiceMonitor attaches to every series in Kubernetes. The local targets carry the
# same labels, so prometheus-adapter's per-pod queries run here exactly as they would in a cluster.
NAMESPACE = "kdserve"
POD_OF_JOB = {"kdserve-gateway": "kdserve-gateway-0", "triton": "triton-0"}
# Series only a Triton with a GPU exports (--allow-gpu-metrics); their panels are empty on the CPU.
GPU_ONLY_METRICS = ("nv_gpu_utilization", "nv_gpu_memory_used_bytes")
# A metric name as written in PromQL (not the tail of a recording rule's `level:metric:op` name).
METRIC_NAME = re.compile(r"(?<![:\w])(?:kdserve|nv)_[a-z0-9_]+\b")


@dataclass(frozen=True)
class PanelQuery:
    panel: str
    ref: str
    expr: str
    legend: str

    @property
    def gpu_only(self) -> bool:
        return any(name in self.expr for name in GPU_ONLY_METRICS)


def dashboard_queries(path: Path = DASHBOARD) -> list[PanelQuery]:
    dashboard = json.loads(path.read_text())
    return [
        PanelQuery(panel["title"], target["refId"], target["expr"], target.get("legendFormat", ""))
        for panel in dashboard["panels"]
        if panel["type"] != "row"
        for target in panel["targets"]
    ]


def rule_groups(path: Path = RULES) -> list[dict]:
    return yaml.safe_load(path.read_text())["groups"]


def recording_rules(path: Path = RULES) -> list[str]:
    return sorted({rule["record"] for group in rule_groups(path) for rule in group["rules"] if "record" in rule})


def adapter_queries(pods: dict[str, str], namespace: str = NAMESPACE) -> dict[str, str]:
    """prometheus-adapter's queries as it sends them for one pod per custom metric: `pods` maps the
    metric (`name.as`) to the pod the HPA asks about."""
    queries = {}
    for rule in yaml.safe_load(ADAPTER_CONFIG.read_text())["rules"]:
        metric = rule["name"]["as"]
        matchers = f'namespace="{namespace}",pod=~"{pods[metric]}"'
        queries[metric] = rule["metricsQuery"].replace("<<.LabelMatchers>>", matchers).replace("<<.GroupBy>>", "pod")
    return queries


def referenced_metrics(text: str) -> set[str]:
    """Metric names (kdserve_*, nv_*) a rules file, dashboard or adapter config reads."""
    return set(METRIC_NAME.findall(text))


def local_config(out_dir: Path, targets: dict[str, str], interval: str = "1s", alerts_at_once: bool = False) -> Path:
    """The project's scrape configuration and rules, pointed at local `targets` (job -> host:port).

    `alerts_at_once`: every alert's `for` set to 0s, so a test sees the condition itself fire within
    seconds; the `for` durations are covered by `promtool test rules`.
    """
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    config["global"] = {"scrape_interval": interval, "evaluation_interval": interval}
    for job in config["scrape_configs"]:
        name = job["job_name"]
        job["static_configs"] = [
            {"targets": [targets[name]], "labels": {"namespace": NAMESPACE, "pod": POD_OF_JOB[name]}}
        ]
    groups = rule_groups()
    if alerts_at_once:
        for rule in (r for group in groups for r in group["rules"] if "alert" in r):
            rule["for"] = "0s"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "rules.yml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    config["rule_files"] = ["rules.yml"]
    path = out_dir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if not found:
        raise RuntimeError("the prometheus binary is missing: `make setup` installs Debian's prometheus package")
    return found


class PrometheusServer:
    """A Prometheus process on a free loopback port with its own temporary storage."""

    def __init__(self, config: Path, start_timeout: float = 60.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._dir = Path(tempfile.mkdtemp(prefix="kdserve-prometheus-"))
        self.log_path = self._dir / "prometheus.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [
                    prometheus_binary(),
                    f"--config.file={config}",
                    f"--storage.tsdb.path={self._dir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "GOMAXPROCS": "1"},
            )
        self.client = httpx.Client(base_url=self.url, timeout=30)
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log_path.read_text()[-2000:]}")
            try:
                if self.client.get("/-/ready").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"prometheus not ready after {start_timeout:.0f}s")

    def _get(self, path: str, **params) -> dict | list:
        body = self.client.get(path, params=params).json()
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus {path} {params}: {body.get('error', body)}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self._get("/api/v1/query", query=expr)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        return self._get("/api/v1/query_range", query=expr, start=start, end=end, step=step)["result"]

    def metric_names(self) -> set[str]:
        return set(self._get("/api/v1/label/__name__/values"))

    def targets_up(self) -> dict[str, bool]:
        return {t["labels"]["job"]: t["health"] == "up" for t in self._get("/api/v1/targets")["activeTargets"]}

    def firing(self) -> set[tuple[str, str]]:
        """(alert name, its `model`/`arm` label or "") of every alert now firing."""
        return {
            (a["labels"]["alertname"], a["labels"].get("model") or a["labels"].get("arm", ""))
            for a in self._get("/api/v1/alerts")["alerts"]
            if a["state"] == "firing"
        }

    def wait_for(self, check, timeout: float, what: str):
        """Poll `check()` (returns a truthy value when done) every half second for up to `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            result = check()
            if result or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if not result:
            raise TimeoutError(f"prometheus: {what} not seen within {timeout:.0f}s")
        return result

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> PrometheusServer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
