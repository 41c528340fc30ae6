"""A short headless Locust (seconds) against the real gateway; its CSVs and the report it produces."""

import csv
import json

from gateway.process import GatewayProcess, free_port
from loadtest.report import write_report
from loadtest.run import run_load


def test_headless_locust_against_the_gateway_writes_csv_metrics_and_report(gateway, triton, tmp_path):
    out = tmp_path / "load"
    metrics_url = f"http://127.0.0.1:{triton.ports.metrics}/metrics"
    summary = run_load(
        gateway.url,
        "compare",
        users=2,
        duration="6s",
        out=out,
        triton_metrics=metrics_url,
        stages="3:1,3:2",
        triton_http=triton.http_url,
    )
    assert summary["locust_exit_code"] == 0, (out / "locust.log").read_text()[-2000:]
    assert summary["generator_cpu_seconds"] > 0 and summary["manifest_top1"]["student_kd"] is not None

    with (out / "locust_stats.csv").open() as fh:
        rows = {row["Name"]: row for row in csv.DictReader(fh)}
    assert int(rows["classify student"]["Request Count"]) > 0 and int(rows["classify teacher"]["Request Count"]) > 0
    assert rows["Aggregated"]["Failure Count"] == "0"
    assert (out / "locust_stats_history.csv").stat().st_size > 0
    for name in ("gateway_metrics_before.txt", "gateway_metrics_after.txt", "triton_metrics_after.txt"):
        assert (out / name).stat().st_size > 0, name
    assert "nv_inference_request_success" in (out / "triton_metrics_after.txt").read_text()
    accuracy = json.loads((out / "accuracy.json").read_text())
    assert accuracy["student_kd"]["total"] > 0 and accuracy["teacher"]["total"] > 0

    direct = summary["perf_analyzer"]["classify teacher"]
    # perf_analyzer ran against Triton: a measurement, or (on a loaded machine) a recorded unstable level.
    assert direct["model"] == "teacher"
    assert (direct["rows"] and direct["rows"][0]["throughput_per_s"] > 0) or direct["unstable"] == [1]
    report = write_report(out).read_text()
    assert "## Teacher vs student" in report and "| classify student |" in report
    assert "## Gateway overhead vs model time" in report
    for chart in ("latency.png", "throughput.png", "errors.png"):
        assert (out / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_stop_rule_ends_a_run_whose_requests_fail(tiny_repo, tmp_path):
    # A gateway whose Triton is down answers every request with 503: the run must stop early, non-zero.
    with GatewayProcess(tiny_repo, f"127.0.0.1:{free_port()}") as dead:
        summary = run_load(dead.url, "student", users=2, duration="40s", out=tmp_path / "failing", triton_metrics=None)
    assert summary["locust_exit_code"] == 3
    assert summary["wall_seconds"] < 30
    with (tmp_path / "failing" / "locust_stats.csv").open() as fh:
        aggregated = next(row for row in csv.DictReader(fh) if row["Name"] == "Aggregated")
    assert int(aggregated["Failure Count"]) >= 50
