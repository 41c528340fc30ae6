"""`make demo`'s path: the core of the recipe served first, the rest exported while it serves."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from gateway.process import free_port
from tests.conftest import ROOT, TINY_OVERRIDES, override_args, run_training


def demo_core_overrides() -> list[str]:
    """The Makefile's DEMO_CORE, so that this test runs what `make demo` runs."""
    makefile = (ROOT / "Makefile").read_text()
    definition = re.search(r"^DEMO_CORE := ((?:.*\\\n)*.*)$", makefile, re.MULTILINE)
    assert definition, "DEMO_CORE is not defined in the Makefile"
    words = shlex.split(definition.group(1).replace("\\\n", " "))
    return [value for flag, value in zip(words[::2], words[1::2], strict=True) if flag == "--set"]


@pytest.mark.slow
def test_the_demo_serves_its_core_then_shows_what_the_rest_of_the_recipe_exports(tiny_run, tiny_repo, tmp_path):
    run, repo = tmp_path / "run", tmp_path / "repo"
    # The run's graphs, which exporting `tiny_repo` wrote, come along: the same weights' graphs are kept,
    # not exported again (what this tests is the demo, not export).
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("export_report.*"))
    core = run_training("all", "--out", str(run), *override_args([*TINY_OVERRIDES, *demo_core_overrides()]))
    assert core.returncode == 0, core.stderr[-2000:]
    assert run_training("export", "--run", str(run), "--repo", str(repo)).returncode == 0
    python = shlex.quote(sys.executable)
    rest = (
        f"{python} -m training all --out {run} {shlex.join(override_args(TINY_OVERRIDES))} && "
        f"{python} -m training export --run {run} --repo {repo}"
    )
    ports = [str(free_port()) for _ in range(4)]
    started, timing = time.time(), tmp_path / "demo_timing.json"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest", "demo", "--repo", str(repo), "--once", "--then", rest,
         "--port", ports[0], "--http-port", ports[1], "--grpc-port", ports[2], "--metrics-port", ports[3],
         "--started-at", str(started), "--record", str(timing), "--rollout", "--state", str(tmp_path / "state")],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The clock: the page served before everything was, both within this test's own time, on a named CPU.
    recorded = json.loads(timing.read_text())
    seconds = recorded["seconds_after_start"]
    assert 0 < seconds["page_serving"] < seconds["everything_served"] < time.time() - started
    assert re.search(r"\S, \d+ cores?$", recorded["cpu"]), recorded["cpu"]  # "1 core" under taskset -c 0
    out = proc.stdout
    # The page's address comes first; the core's table has no ensemble; the rest's table adds it.
    assert out.index("Web page http://") < out.index("served top-1"), out
    tables = served_tables(out)
    assert len(tables) == 2, out
    core_rows, rest_rows = tables
    assert {"student", "teacher", "cascade"} <= set(core_rows) and "ensemble" not in core_rows, out
    assert {"ensemble", "student_pruned"} <= set(rest_rows) and "student" not in rest_rows, out
    # Every served model answered the held-out digits far above chance.
    assert all(top1 > 0.85 for top1 in [*core_rows.values(), *rest_rows.values()]), out
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
            model, served = line.split()[:2]
            rows[model] = float(served.rstrip("%")) / 100
        else:
            rows = None
    return tables
