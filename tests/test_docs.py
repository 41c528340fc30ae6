"""The README is a front door whose figures come from the committed benchmark files."""

from loadtest.headline import END, START, headline_block
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

    from loadtest.bench import results_markdown

    # One renderer for the report: the committed pair must agree (a hand edit of either fails here).
    results = json.loads((ROOT / "benchmarks" / "results.json").read_text())
    assert results_markdown(results) == (ROOT / "benchmarks" / "results.md").read_text()
