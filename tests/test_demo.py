"""`make demo`'s path: the plain student served first; the teacher and the KD student, then the rest of the
recipe, exported while it serves."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest

from gateway.process import answers, free_port
from gateway.readiness import wait_until_ready
from kdcontract.digits import digit_png_bytes
from tests.conftest import ROOT, TINY_OVERRIDES, override_args, run_training


def makefile_words(variable: str) -> list[str]:
    """A Makefile variable's words, so that this test runs what `make demo` runs."""
    makefile = (ROOT / "Makefile").read_text()
    definition = re.search(rf"^{variable} := ((?:.*\\\n)*.*)$", makefile, re.MULTILINE)
    assert definition, f"{variable} is not defined in the Makefile"
    return shlex.split(definition.group(1).replace("\\\n", " "))


@pytest.mark.slow
def test_the_demo_serves_the_plain_student_first_then_what_each_later_export_adds(tiny_run, tmp_path):
    run, repo = tmp_path / "run", tmp_path / "repo"
    # The run's graphs, which exporting `tiny_repo` wrote, come along: the same weights' graphs are kept,
    # not exported again (what this tests is the demo, not export).
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("export_report.*"))
    # `make demo`'s command (TRAIN_EXPORT), the suite's recipe settings in place of the recipe's.
    all_export = ["all", "--out", str(run), "--export", str(repo), *override_args(TINY_OVERRIDES)]
    train_export = [sys.executable, "-m", "training", *all_export]
    first = run_training(*all_export, *makefile_words("DEMO_FIRST"))
    assert first.returncode == 0, first.stderr[-2000:]
    assert set(json.loads((repo / "manifest.json").read_text())["models"]) == {"student_plain"}
    latch = tmp_path / "first-stage-checked"
    # The first command waits until this test has looked at what the first stage serves.
    then = [f"while [ ! -e {latch} ]; do sleep 0.2; done; {shlex.join([*train_export, *makefile_words('DEMO_CORE')])}"]
    then.append(shlex.join(train_export))
    ports = [free_port() for _ in range(4)]
    started, timing, log = time.time(), tmp_path / "demo_timing.json", tmp_path / "demo.log"
    command = [sys.executable, "-m", "loadtest", "demo", "--repo", str(repo), "--once",
               "--then", then[0], "--then", then[1],
               "--port", ports[0], "--http-port", ports[1], "--grpc-port", ports[2], "--metrics-port", ports[3],
               "--started-at", started, "--record", timing, "--rollout", "--state", tmp_path / "state"]  # fmt: skip
    with log.open("w") as out_file:
        # A session of its own: after a failed check, Ctrl-C reaches the demo (which stops its Triton and
        # gateway on the way out) and its `--then` shell alike.
        demo = subprocess.Popen(
            [str(c) for c in command], cwd=ROOT, stdout=out_file, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            url = f"http://127.0.0.1:{ports[0]}"
            state = wait_until_ready(lambda: answers(f"{url}/readyz"), lambda: demo.poll() is not None, 300)
            assert state == "ready", f"the demo's gateway: {state}\n{log.read_text()[-3000:]}"
            # The first stage: the plain student alone, all A/B traffic on it; the student is not served yet.
            assert [m["name"] for m in httpx.get(f"{url}/v1/models").json()["models"]] == ["student_plain"]
            png = {"content": digit_png_bytes(0), "headers": {"Content-Type": "image/png"}}
            auto = httpx.post(f"{url}/v1/classify?model=auto", **png)
            assert auto.status_code == 200 and auto.json()["arm"] == "student_plain", auto.text
            student = httpx.post(f"{url}/v1/classify?model=student", **png)
            assert student.status_code == 404 and student.json()["error"]["kind"] == "unknown_model", student.text
            latch.touch()
            demo.wait(timeout=900)
        finally:
            if demo.poll() is None:
                os.killpg(demo.pid, signal.SIGINT)
                try:
                    demo.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(demo.pid, signal.SIGKILL)
    out = log.read_text()
    assert demo.returncode == 0, out[-3000:]
    # The clock: the page served first, then the student and the teacher, then everything, on a named CPU.
    recorded = json.loads(timing.read_text())
    seconds = recorded["seconds_after_start"]
    assert 0 < seconds["page_serving"] < seconds["student_and_teacher_served"] < seconds["everything_served"]
    assert seconds["everything_served"] < time.time() - started
    assert re.search(r"\S, \d+ cores?$", recorded["cpu"]), recorded["cpu"]  # "1 core" under taskset -c 0
    # The page's address comes first; then one table per stage, each with the models it added.
    assert out.index("Web page http://") < out.index("served top-1"), out
    tables = served_tables(out)
    assert len(tables) == 3, out
    first_rows, core_rows, rest_rows = tables
    assert set(first_rows) == {"student_plain"}, out
    assert {"student", "teacher", "cascade"} <= set(core_rows) and "ensemble" not in core_rows, out
    assert {"ensemble", "student_pruned"} <= set(rest_rows) and "student" not in rest_rows, out
    assert "the A/B split is now student 90%, teacher 10%" in out, out
    # Every served model answered the held-out digits far above chance.
    assert all(top1 > 0.85 for table in tables for top1 in table.values()), out
    # Then the rollout under Locust: each step shown, the student at 100%, no request failed.
    rollout = json.loads((tmp_path / "state" / "rollout" / "rollout.json").read_text())
    assert [e["event"] for e in rollout["events"]] == ["started", "advanced", "promoted"], rollout["events"]
    assert rollout["phase"] == "promoted" and rollout["locust"]["failures"] == 0, rollout
    assert "Rollout promoted" in out and "make rollout BROKEN=1" in out


def served_tables(out: str) -> list[dict[str, float]]:
    """Each "served top-1" table the demo printed, as {model: served top-1}."""
    tables, rows = [], None
    for line in out.splitlines():
        if "served top-1" in line:
            rows = {}
            tables.append(rows)
        elif rows is not None and line.strip() and not line.startswith("("):
            model, _version, served = line.split()[:3]
            rows[model] = float(served.rstrip("%")) / 100
        else:
            rows = None
    return tables
