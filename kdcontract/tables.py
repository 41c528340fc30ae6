"""Markdown tables: the one renderer behind every report kdserve writes."""

from __future__ import annotations

from collections.abc import Sequence

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
