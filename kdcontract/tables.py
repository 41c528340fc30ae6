"""Markdown tables and report files: the one renderer and writer behind every report kdserve writes."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

_RULE = {"l": "---", "r": "---:", "c": ":---:"}


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str = "") -> str:
    """A GitHub-flavoured table; `align` is one letter a column (l, r, c; default: the first column left,
    the others right, as figures read best)."""
    letters = align.split() if align else ["l"] + ["r"] * (len(header) - 1)
    if len(letters) != len(header) or any(len(row) != len(header) for row in rows):
        raise ValueError("every row and the alignment need one entry per column")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(_RULE[a] for a in letters) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def percent(fraction: float | None) -> str:
    """A share as a percentage with two decimals, as every report prints one; an em dash where there is none."""
    return "—" if fraction is None else f"{fraction:.2%}"


def write_results(out: Path, results: dict, markdown: str) -> None:
    """A report's two files in `out`: results.json (every figure) and results.md (what a reader sees)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown)
