"""A re-exported repository while serving: the gateway keeps weights and calibration together.

Its own Triton and repository (the test kills Triton), holding the student and the teacher of the
session's tiny run. "Re-exporting" adds version 2 of the student with another temperature, so every
answer shows which manifest entry produced it.
"""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest

from gateway.process import GatewayProcess, free_port
from gateway.triton.server import EmbeddedTriton, TritonPorts
from kdcontract.digits import digit_png_bytes
from kdcontract.manifest import read_manifest, write_manifest
from kdcontract.versions import config_loading, replace_file
from loadtest.clients.measure import metric_value

PNG = {"content": digit_png_bytes(1700), "headers": {"Content-Type": "image/png"}}


def student_answer(gateway: GatewayProcess) -> tuple[int, dict]:
    resp = gateway.client.post("/v1/classify?model=student_kd&top_k=1", **PNG)
    return resp.status_code, resp.json()


def reloads(gateway: GatewayProcess, outcome: str) -> float:
    text = gateway.client.get("/metrics").text
    return metric_value(text, "kdserve_manifest_reloads_total", {"outcome": outcome})


@pytest.fixture
def small_repo(tiny_repo, tmp_path):
    repo = tmp_path / "repo"
    for name in ("student_kd", "teacher"):
        shutil.copytree(tiny_repo / name, repo / name)
    manifest = read_manifest(tiny_repo)
    manifest.models = {n: manifest.models[n] for n in ("student_kd", "teacher")}
    write_manifest(repo, manifest)
    return repo


def test_gateway_switches_to_a_reexported_version_once_triton_serves_it(small_repo, tmp_path):
    ports = TritonPorts(free_port(), free_port(), free_port())
    with EmbeddedTriton(small_repo, ports, log_file=tmp_path / "triton.log") as triton:
        gateway = GatewayProcess(small_repo, triton.http_url, env={"KDSERVE_MANIFEST_POLL_S": "0.2"})
        try:
            status, before = student_answer(gateway)
            assert status == 200 and before["version"] == 1
            p_before = before["predictions"][0]["top_k"][0]["probability"]

            # Re-export: version 2 (same weights, three times the temperature) and its manifest.
            shutil.copytree(small_repo / "student_kd" / "1", small_repo / "student_kd" / "2")
            config = small_repo / "student_kd" / "config.pbtxt"
            replace_file(config, config_loading(config, [2]))  # as an export writes it: Triton loads version 2
            manifest = read_manifest(small_repo)
            manifest.models["student_kd"].version = 2
            manifest.models["student_kd"].temperature *= 3
            write_manifest(small_repo, manifest)

            # Triton has not loaded version 2: the gateway keeps serving version 1, calibrated as version 1.
            deadline = time.monotonic() + 10
            while reloads(gateway, "waiting") == 0 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert reloads(gateway, "waiting") > 0
            status, still = student_answer(gateway)
            assert status == 200 and still["version"] == 1
            assert still["predictions"][0]["top_k"][0]["probability"] == pytest.approx(p_before)

            # Triton restarts (killed; the supervisor brings it back) and loads the newest version only.
            killed = time.monotonic()
            os.kill(triton.pid, signal.SIGKILL)
            answers = []
            while time.monotonic() - killed < 30:
                status, body = student_answer(gateway)
                answers.append(status)
                if status == 200 and body["version"] == 2:
                    break
                assert status in (503, 504), body  # never a 200 from a version the manifest does not describe
                time.sleep(0.1)
            recovered = time.monotonic() - killed
            assert status == 200 and body["version"] == 2, answers[-5:]
            p_after = body["predictions"][0]["top_k"][0]["probability"]
            assert p_after < p_before  # the hotter temperature of version 2's entry: its calibration
            assert recovered < 10, recovered
            assert reloads(gateway, "switched") == 1
            assert gateway.client.get("/readyz").json()["versions"]["student_kd"] == 2
            print(f"recovered in {recovered:.1f}s; statuses while switching: {sorted(set(answers))}")
        finally:
            gateway.stop()


def test_a_broken_manifest_is_refused_and_the_gateway_keeps_serving(small_repo, tmp_path):
    ports = TritonPorts(free_port(), free_port(), free_port())
    with EmbeddedTriton(small_repo, ports, log_file=tmp_path / "triton.log") as triton:
        gateway = GatewayProcess(small_repo, triton.http_url, env={"KDSERVE_MANIFEST_POLL_S": "0.2"})
        try:
            broken = small_repo / "manifest.tmp"
            broken.write_text('{"schema_version": 3, "models": "half-written')
            broken.replace(small_repo / "manifest.json")
            deadline = time.monotonic() + 10
            while reloads(gateway, "refused") == 0 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert reloads(gateway, "refused") == 1
            status, body = student_answer(gateway)
            assert status == 200 and body["version"] == 1
        finally:
            gateway.stop()
