"""The layering contracts (import-linter, [tool.importlinter] in pyproject.toml) hold, and catch a breach."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.conftest import ROOT

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
PACKAGES = ("kdcontract", "training", "gateway", "loadtest")


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def copy_of_the_packages(tmp_path: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def test_the_contracts_hold_on_the_tree(tmp_path):
    proc = lint_imports(copy_of_the_packages(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "9 kept, 0 broken" in proc.stdout


def test_an_import_of_training_from_the_gateway_breaks_the_build(tmp_path):
    tree = copy_of_the_packages(tmp_path)
    routes = tree / "gateway" / "http" / "classify.py"
    routes.write_text(routes.read_text() + "\nfrom training.models import build_classifier  # noqa\n")
    torch_in_contract = tree / "kdcontract" / "fusion.py"
    torch_in_contract.write_text(torch_in_contract.read_text() + "\nimport torch  # noqa\n")
    data_in_stages = tree / "training" / "stages.py"  # training.data imports torch
    data_in_stages.write_text(data_in_stages.read_text() + "\nfrom training.data import load_data  # noqa\n")
    proc = lint_imports(tree)
    assert proc.returncode != 0
    assert "The gateway imports neither training nor torch BROKEN" in proc.stdout
    assert "The contract package imports no torch and none of the packages built on it BROKEN" in proc.stdout
    assert "gateway.http.classify -> training.models" in proc.stdout
    assert "training.stages -> training.data" in proc.stdout  # the recipe and stage planning contract


def _append(tree: Path, module: str, line: str) -> None:
    path = tree / (module.replace(".", "/") + ".py")
    path.write_text(path.read_text() + f"\n{line}  # noqa\n")


def test_a_breach_of_the_gateways_layers_breaks_the_build(tmp_path):
    """Each of the gateway's own contracts, broken once on purpose: the serving core importing a protocol,
    one protocol importing the other, the core importing a web framework, the experiments (the rollout
    controller's package) importing Triton's client, and a load client importing a whole stack."""
    tree = copy_of_the_packages(tmp_path)
    _append(tree, "gateway.serving.inference", "from gateway.http.reading import read_body_limited")
    _append(tree, "gateway.grpc.servicer", "from gateway.http.v2 import router")
    _append(tree, "gateway.feedback.join", "import starlette.requests")
    _append(tree, "gateway.experiments.gates", "from gateway.triton.client import TritonClient")
    _append(tree, "loadtest.clients.measure", "from loadtest.stacks.demo import run_demo")
    proc = lint_imports(tree)
    assert proc.returncode != 0
    out = " ".join(proc.stdout.split())  # lint-imports wraps long contract names
    assert "5 kept, 4 broken" in out, out[-3000:]
    assert "gateway.serving.inference -> gateway.http.reading" in out
    assert "gateway.grpc.servicer -> gateway.http.v2" in out
    assert "gateway.feedback.join -> starlette" in out
    assert "gateway.experiments.gates -> gateway.triton.client" in out
    assert "loadtest.clients.measure -> loadtest.stacks.demo" in out


# What the load tools may use of the gateway: its process API, Triton's server and REST wire format, and a
# pure helper (the whole-file writes the demo shares); the statistics the rollout study checks are kdcontract's. The
# contract in pyproject.toml lists the rest, packages or modules, so a new gateway module must be covered
# there or allowed here.
LOADTEST_MAY_IMPORT = {
    "gateway.__main__",
    "gateway.files",
    "gateway.process",
    "gateway.readiness",
    "gateway.triton.rest",
    "gateway.triton.server",
}


def gateway_modules() -> set[str]:
    return {
        ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for p in (ROOT / "gateway").rglob("*.py")
        if p.stem != "__init__"
    }


def test_every_gateway_module_is_either_forbidden_to_the_load_tools_or_allowed_on_purpose():
    contract = next(
        c
        for c in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
        if c["name"].startswith("The load tools reach the gateway only through its process API")
    )
    forbidden = contract["forbidden_modules"]

    def covered(module: str) -> bool:
        return module in LOADTEST_MAY_IMPORT or any(module == f or module.startswith(f + ".") for f in forbidden)

    assert "gateway.serving.service" in gateway_modules()  # the walk reaches into the packages
    unlisted = sorted(m for m in gateway_modules() if not covered(m))
    assert not unlisted, f"gateway modules neither forbidden to loadtest nor allowed on purpose: {unlisted}"
    assert not [m for m in LOADTEST_MAY_IMPORT if any(m.startswith(f) for f in forbidden)], "allowed and forbidden"
