"""`python -m loadtest statistics`: how honest the A/B statistics are, on simulated streams (seeded).

The gates read their intervals after every request, so what matters is how they behave when read
again and again: an A/A test (no difference) peeked every 50 samples, the coverage of an interval
over every peek, and how many labels a real 2-point top-1 gap needs to be seen, beside the naive
fixed-sample reading for contrast. The suite asserts the same functions (tests/test_sequential.py);
this writes their figures to statistics.md and statistics.json.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from kdcontract.sequential import ALPHA, difference_cs, paired_difference_cs, proportion_cs, quantile_cs
from kdcontract.tables import markdown_table

EXPERIMENTS = 1000
PEEK_EVERY = 50
SAMPLES = 2000  # per arm: 40 peeks
Z95 = 1.959963984540054


def _peeked(rng: np.random.Generator, rate: float, experiments: int = EXPERIMENTS) -> np.ndarray:
    """Successes counted at every peek: [experiments, peeks]."""
    draws = rng.random((experiments, SAMPLES)) < rate
    return np.cumsum(draws, axis=1)[:, PEEK_EVERY - 1 :: PEEK_EVERY]


def _peeks() -> np.ndarray:
    return np.arange(PEEK_EVERY, SAMPLES + 1, PEEK_EVERY)


def aa_false_alarms(seed: int = 0, rate: float = 0.9) -> tuple[float, float]:
    """Share of A/A experiments ever called "different" over 40 peeks: (confidence sequences, a naive
    two-sample z-test at 95% repeated at every peek)."""
    rng = np.random.default_rng(seed)
    a, b = _peeked(rng, rate), _peeked(rng, rate)
    sequential = np.zeros(EXPERIMENTS, bool)
    naive = np.zeros(EXPERIMENTS, bool)
    for peek, trials in enumerate(_peeks()):
        lo_a, hi_a = proportion_cs(a[:, peek], np.full(EXPERIMENTS, trials), ALPHA / 2)
        lo_b, hi_b = proportion_cs(b[:, peek], np.full(EXPERIMENTS, trials), ALPHA / 2)
        sequential |= (lo_a - hi_b > 0) | (hi_a - lo_b < 0)
        diff = (a[:, peek] - b[:, peek]) / trials
        pooled = (a[:, peek] + b[:, peek]) / (2 * trials)
        se = np.sqrt(np.maximum(2 * pooled * (1 - pooled) / trials, 1e-12))
        naive |= np.abs(diff) > Z95 * se
    return float(sequential.mean()), float(naive.mean())


def coverage(rate: float, seed: int = 1) -> tuple[float, float]:
    """Share of experiments whose interval held the true rate at every one of 40 peeks: (confidence
    sequence at 95%, the fixed-sample 95% Wald interval)."""
    counts = _peeked(np.random.default_rng(seed), rate)
    always = np.ones(EXPERIMENTS, bool)
    naive = np.ones(EXPERIMENTS, bool)
    for peek, trials in enumerate(_peeks()):
        lo, hi = proportion_cs(counts[:, peek], np.full(EXPERIMENTS, trials), ALPHA)
        always &= (lo <= rate) & (rate <= hi)
        p = counts[:, peek] / trials
        half = Z95 * np.sqrt(np.maximum(p * (1 - p), 1e-12) / trials)
        naive &= (p - half <= rate) & (rate <= p + half)
    return float(always.mean()), float(naive.mean())


def unpaired_detection(labels: int, seed: int = 2, runs: int = 200) -> float:
    """Share of runs in which a student at 96% is found below a teacher at 98% (separate arms, `labels`
    labelled answers each)."""
    rng = np.random.default_rng(seed)
    student = (rng.random((runs, labels)) < 0.96).sum(axis=1)
    teacher = (rng.random((runs, labels)) < 0.98).sum(axis=1)
    return float(
        np.mean([difference_cs(int(s), labels, int(t), labels)[1] < 0 for s, t in zip(student, teacher, strict=True)])
    )


def paired_detection(pairs: int, seed: int = 3, runs: int = 200) -> float:
    """The same gap seen through the shadow (both models on the same requests): 0.5% of images only the
    student gets right, 2.5% only the teacher."""
    rng = np.random.default_rng(seed)
    found = 0
    for _ in range(runs):
        outcome = rng.choice(3, size=pairs, p=[0.97, 0.005, 0.025])
        found += paired_difference_cs(int((outcome == 1).sum()), int((outcome == 2).sum()), pairs)[1] < 0
    return found / runs


def quantile_coverage(seed: int = 4, runs: int = 200, requests: int = 4000) -> tuple[float, float]:
    """p99 of lognormal latencies (median 5 ms) from histogram buckets 5% apart: (share of runs whose
    interval held the true p99, median ratio of the interval's ends)."""
    rng = np.random.default_rng(seed)
    edges = [0.5 * 1.05**i for i in range(140)] + [math.inf]
    true_p99 = float(np.exp(np.log(5.0) + 0.4 * 2.3263478740408408))
    covered, widths = 0, []
    for _ in range(runs):
        samples = np.exp(rng.normal(np.log(5.0), 0.4, requests))
        counts = np.bincount(np.searchsorted(edges, samples), minlength=len(edges))[: len(edges)]
        lo, hi = quantile_cs(edges, counts.tolist(), 0.99)
        covered += lo <= true_p99 <= hi
        widths.append(hi / lo)
    return covered / runs, float(np.median(widths))


def run_study(out: Path) -> dict:
    sequential, naive = aa_false_alarms()
    results = {
        "alpha": ALPHA,
        "aa_false_alarm": {"confidence_sequences": sequential, "naive_z_test": naive},
        "coverage_at_every_peek": {
            str(r): dict(zip(("sequence", "naive"), coverage(r), strict=True)) for r in (0.5, 0.9, 0.98)
        },
        "two_point_gap_detected": {
            "unpaired_labels_per_arm": {str(n): unpaired_detection(n) for n in (2000, 5000, 8000)},
            "paired_labels": {str(n): paired_detection(n) for n in (1000, 2000, 4000)},
        },
        "p99_from_histogram": dict(zip(("coverage", "median_high_over_low"), quantile_coverage(), strict=True)),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "statistics.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "statistics.md").write_text(markdown(results))
    return results


def markdown(r: dict) -> str:
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    cover = r["coverage_at_every_peek"]
    gap = r["two_point_gap_detected"]
    return "\n".join([
        "# The A/B statistics, peeked the way a dashboard is",
        "",
        f"Simulated, seeded streams; {EXPERIMENTS} experiments, {SAMPLES} samples an arm, read every "
        f"{PEEK_EVERY} samples (40 peeks); alpha {r['alpha']}. `python -m loadtest statistics`; the suite "
        "asserts the same functions (tests/test_sequential.py).",
        "",
        markdown_table(
            ["question", "confidence sequences (the gates)", "naive fixed-sample reading"],
            [
                ["A/A experiments ever called different", pct(r["aa_false_alarm"]["confidence_sequences"]),
                 pct(r["aa_false_alarm"]["naive_z_test"])],
                *[[f"interval holds the true rate {rate} at every peek", pct(c["sequence"]), pct(c["naive"])]
                  for rate, c in cover.items()],
            ],
        ),
        "",
        "A true 2-point top-1 gap (student 96%, teacher 98%), share of 200 runs in which the interval "
        "excludes 0:",
        "",
        markdown_table(
            ["labels (per arm / pairs)", "separate arms", "paired through the shadow"],
            [[f"{u} / {p}", pct(gap["unpaired_labels_per_arm"][u]), pct(gap["paired_labels"][p])]
             for u, p in zip(gap["unpaired_labels_per_arm"], gap["paired_labels"], strict=True)],
        ),
        "",
        f"p99 from histogram buckets 5% apart (4,000 requests): the interval held the true p99 in "
        f"{pct(r['p99_from_histogram']['coverage'])} of runs; its ends were a median "
        f"{r['p99_from_histogram']['median_high_over_low']:.2f}x apart.",
        "",
    ])  # fmt: skip
