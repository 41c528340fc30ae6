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
    assert "5 kept, 0 broken" in proc.stdout


def test_an_import_of_training_from_the_gateway_breaks_the_build(tmp_path):
    tree = copy_of_the_packages(tmp_path)
    routes = tree / "gateway" / "routes.py"
    routes.write_text(routes.read_text() + "\nfrom training.models import build_classifier  # noqa\n")
    torch_in_contract = tree / "kdcontract" / "fusion.py"
    torch_in_contract.write_text(torch_in_contract.read_text() + "\nimport torch  # noqa\n")
    data_in_stages = tree / "training" / "stages.py"  # training.data imports torch
    data_in_stages.write_text(data_in_stages.read_text() + "\nfrom training.data import load_data  # noqa\n")
    proc = lint_imports(tree)
    assert proc.returncode != 0
    assert "The gateway imports neither training nor torch BROKEN" in proc.stdout
    assert "The contract package imports no torch and none of the packages built on it BROKEN" in proc.stdout
    assert "gateway.routes -> training.models" in proc.stdout
    assert "training.stages -> training.data" in proc.stdout  # the recipe and stage planning contract


# What the load tools may use of the gateway: its process API, its wire clients, and two pure helpers (the
# statistics the rollout study checks, the whole-file writes the demo shares). The contract in pyproject.toml
# lists the rest by name, so a new gateway module must be listed there or here.
LOADTEST_MAY_IMPORT = {
    "gateway.__main__",
    "gateway.capture",
    "gateway.files",
    "gateway.process",
    "gateway.readiness",
    "gateway.sequential",
    "gateway.triton_http",
    "gateway.triton_server",
}


def test_every_gateway_module_is_either_forbidden_to_the_load_tools_or_allowed_on_purpose():
    contract = next(
        c
        for c in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
        if c["name"].startswith("The load tools reach the gateway only through its process API")
    )
    modules = {f"gateway.{p.stem}" for p in (ROOT / "gateway").glob("*.py") if p.stem != "__init__"}
    unlisted = modules - set(contract["forbidden_modules"]) - LOADTEST_MAY_IMPORT
    assert not unlisted, f"gateway modules neither forbidden to loadtest nor allowed on purpose: {sorted(unlisted)}"
