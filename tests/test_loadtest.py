"""A short headless Locust (seconds) against the real gateway; its CSVs and the report it produces."""

import csv
import json

import pytest

from gateway.process import GatewayProcess, free_port
from loadtest.clients.report import write_report
from loadtest.clients.run import direct_targets, model_concurrency, run_load


@pytest.mark.slow
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

    direct = {d["model"]: d for d in summary["perf_analyzer"]}["teacher"]
    # perf_analyzer measured the teacher directly at the concurrency it saw through the gateway.
    assert direct["request"] == "classify teacher" and direct["share"] == 0.5
    assert direct["per_model_concurrency"] == [1] and not direct["unstable"], direct
    assert direct["rows"][0]["concurrency"] == 1 and direct["rows"][0]["throughput_per_s"] > 0, direct
    report = write_report(out).read_text()
    assert "## Teacher vs student" in report and "| classify student |" in report
    assert "## Gateway overhead vs model time" in report
    for chart in ("latency.png", "throughput.png", "errors.png"):
        assert (out / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_stop_rule_ends_a_run_whose_requests_fail(tiny_repo, tmp_path):
    # A gateway whose Triton is down answers every request with 503: the run must stop early, non-zero.
    with GatewayProcess(tiny_repo, f"127.0.0.1:{free_port()}") as dead:
        summary = run_load(dead.url, "student", users=2, duration="90s", out=tmp_path / "failing", triton_metrics=None)
    assert summary["locust_exit_code"] == 3
    assert summary["wall_seconds"] < 90  # ended by the stop rule, not by the clock
    with (tmp_path / "failing" / "locust_stats.csv").open() as fh:
        aggregated = next(row for row in csv.DictReader(fh) if row["Name"] == "Aggregated")
    assert int(aggregated["Failure Count"]) >= 50


def test_ab_traffic_is_compared_with_both_arms_and_the_ensemble_with_tritons():
    aliases = {
        "student": "student_kd",
        "teacher": "teacher",
        "ensemble": "ensemble",
        "ensemble_triton": "ensemble_fused",
    }
    ab = direct_targets("ab", aliases, {"student": 0.9, "teacher": 0.1})
    assert [(t["request"], t["model"], t["share"]) for t in ab] == [
        ("classify auto", "student_kd", 0.9),
        ("classify auto", "teacher", 0.1),
    ]
    assert [model_concurrency(20, t["share"]) for t in ab] == [18, 2]
    assert model_concurrency(4, 0.1) == 1  # an arm with any traffic is measured at least at concurrency 1
    (ensemble,) = direct_targets("ensemble", aliases, {"student": 1.0})
    assert ensemble["model"] == "ensemble_fused"  # not the gateway's own fusion, which Triton cannot run


def test_load_stages_parse_once_and_refuse_what_locust_could_not_run():
    from kdcontract.errors import UserError
    from loadtest.clients.stages import parse_stages

    assert parse_stages("20:1, 20:2,20:4") == [(20, 1), (20, 2), (20, 4)]
    assert parse_stages(None) == [] and parse_stages("") == []
    for bad in ("20", "20:x", "0:3", "20:0", "²:1"):
        with pytest.raises(UserError, match="stage"):
            parse_stages(bad)
