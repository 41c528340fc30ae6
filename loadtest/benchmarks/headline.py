"""The README's headline table, generated from the committed benchmark files (never typed by hand).

`python -m loadtest headline` rewrites the block between the README's headline markers from
`benchmarks/results.json` (`make bench`), `benchmarks/served_accuracy.json` (`make bench` / served-accuracy)
and `benchmarks/fewlabels/cascade.json` (`make fewlabels`); a test fails when the block and the files
disagree, so a README figure always has its source.
"""

from __future__ import annotations

import json
from pathlib import Path

from kdcontract.names import CASCADE, ENSEMBLE, STUDENT, TEACHER
from kdcontract.tables import markdown_table

START, END = "<!-- headline:start (python -m loadtest headline) -->", "<!-- headline:end -->"


def _pct(fraction: float) -> str:
    return f"{100 * fraction:.2f}%"


def headline_rows(benchmarks: Path) -> list[list[str]]:
    bench = json.loads((benchmarks / "results.json").read_text())
    served = json.loads((benchmarks / "served_accuracy.json").read_text())
    cascade = json.loads((benchmarks / "fewlabels" / "cascade.json").read_text())
    student, teacher = bench["latency_c1"][STUDENT], bench["latency_c1"][TEACHER]
    c16 = bench["throughput"][student["model"]]
    direct, gateway = c16["triton_direct"]["16"], c16["gateway"]["16"]
    drops = served["largest_drop_points"]
    rows = [
        [
            "test top-1, student / teacher (digits, 270 held-out images)",
            f"{_pct(student['top1'])} / {_pct(teacher['top1'])}",
            "results.md",
        ],
        [
            "gateway p50 at concurrency 1, student / teacher",
            f"{student['gateway']['p50_ms']:.2f} / {teacher['gateway']['p50_ms']:.2f} ms",
            "results.md",
        ],
        [
            "gateway's cost over Triton direct, p50 at concurrency 1 (student)",
            f"{student['gateway']['p50_ms'] - student['triton_direct']['p50_ms']:.2f} ms",
            "results.md",
        ],
        [
            "student throughput at 16 clients, gateway / Triton direct",
            f"{gateway['throughput_per_s']:.0f} / {direct['throughput_per_s']:.0f} img/s",
            "results.md",
        ],
        [
            "largest drop from native 8x8 over 13 client forms (student / teacher / ensemble)",
            " / ".join(f"{drops[m]:.2f}" for m in (STUDENT, TEACHER, ENSEMBLE)) + " points",
            "served_accuracy.md",
        ],
        [
            "few labels: served top-1, KD student / teacher / cascade",
            " / ".join(_pct(cascade["top1"][m]) for m in (STUDENT, TEACHER, CASCADE))
            + f" ({_pct(cascade['escalated_share'])} escalated)",
            "fewlabels/cascade.md",
        ],
    ]
    return [[what, value, f"[{source}](benchmarks/{source})"] for what, value, source in rows]


def headline_block(benchmarks: Path) -> str:
    machine = json.loads((benchmarks / "results.json").read_text())["machine"]
    table = markdown_table(["what", "measured", "from"], headline_rows(benchmarks), align="l l l")
    cpu = f"{machine['cpu']} ({', '.join(machine['simd'])}), {machine['cores']} cores, no GPU"
    return f"{START}\n{table}\nServing figures measured on {cpu}; each file records the machine of its own run.\n{END}"


def write_headline(readme: Path, benchmarks: Path) -> bool:
    """Rewrite the README's headline block; True if it changed."""
    text = readme.read_text()
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    new = before + headline_block(benchmarks) + after
    readme.write_text(new)
    return new != text
