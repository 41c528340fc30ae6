"""The README is a front door whose figures come from the committed benchmark files."""

import shutil
import subprocess
import sys
from pathlib import Path

from loadtest.benchmarks.headline import END, START, headline_block
from tests.conftest import ROOT

README = ROOT / "README.md"


def test_the_readme_is_short_and_gives_the_two_set_up_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    assert "make demo" in text and "make test" in text


def test_the_readme_headline_table_is_the_one_generated_from_the_benchmark_files():
    text = README.read_text()
    block = text[text.index(START) : text.index(END) + len(END)]
    # A figure typed by hand, or a benchmark rerun without `python -m loadtest headline`, fails here.
    assert block == headline_block(ROOT / "benchmarks")
    assert "| gateway p50 at concurrency 1, student / teacher |" in block


def test_the_committed_bench_report_is_what_its_json_renders_to():
    import json

    from loadtest.benchmarks.bench import results_markdown

    # One renderer for the report: the committed pair must agree (a hand edit of either fails here).
    results = json.loads((ROOT / "benchmarks" / "results.json").read_text())
    assert results_markdown(results) == (ROOT / "benchmarks" / "results.md").read_text()


def _docs_check_command() -> list[str]:
    """The docs check `make test` runs, read from the Makefile: a test of another command would prove nothing."""
    line = next(
        line for line in (ROOT / "Makefile").read_text().splitlines() if "mkdocs build" in line and "\t" in line
    )
    return line.split("#")[0].replace("$(VENV)/bin/", "").split()


def test_the_docs_check_fails_on_a_broken_link(tmp_path):
    """Review finding 21: `mkdocs build --strict --quiet` hid the warnings strict mode counts, so a broken link
    passed. The site is copied, built as `make test` builds it (green), then one link is broken on purpose."""
    command = _docs_check_command()
    assert "--quiet" not in command and "-q" not in command and "--strict" in command
    for part in ("mkdocs.yml", "docs", "benchmarks", "deploy/README.md", "model_repository/README.md"):
        source, target = ROOT / part, tmp_path / part
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
    mkdocs = [str(Path(sys.executable).parent / command[0]), *command[1:]]
    built = subprocess.run(mkdocs, cwd=tmp_path, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    page = tmp_path / "docs" / "serving.md"
    page.write_text(page.read_text() + "\nSee [the missing page](no-such-page.md).\n")
    broken = subprocess.run(mkdocs, cwd=tmp_path, capture_output=True, text=True)
    assert broken.returncode != 0 and "no-such-page.md" in broken.stderr
