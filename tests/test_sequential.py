"""The A/B statistics are honest: simulated streams (fast, seeded), peeked the way a dashboard is."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gateway.sequential import (
    at_least,
    at_most,
    difference_cs,
    paired_difference_cs,
    proportion_cs,
    quantile_cs,
)

EXPERIMENTS = 1000
PEEK_EVERY = 50
SAMPLES = 2000  # per arm: 40 peeks


def _peeked_streams(rng: np.random.Generator, rate: float) -> np.ndarray:
    """Successes counted at every peek: [experiments, peeks]."""
    draws = rng.random((EXPERIMENTS, SAMPLES)) < rate
    return np.cumsum(draws, axis=1)[:, PEEK_EVERY - 1 :: PEEK_EVERY]


def _naive_interval(s: np.ndarray, n: np.ndarray, z: float = 1.96) -> tuple[np.ndarray, np.ndarray]:
    p = s / n
    half = z * np.sqrt(np.maximum(p * (1 - p), 1e-12) / n)
    return p - half, p + half


def test_a_a_experiments_peeked_every_50_samples_call_a_difference_at_most_5_percent_of_the_time():
    rng = np.random.default_rng(0)
    a, b = _peeked_streams(rng, 0.9), _peeked_streams(rng, 0.9)
    n = np.arange(PEEK_EVERY, SAMPLES + 1, PEEK_EVERY)
    sequential_alarm = np.zeros(EXPERIMENTS, bool)
    naive_alarm = np.zeros(EXPERIMENTS, bool)
    for peek, trials in enumerate(n):
        lo_a, hi_a = proportion_cs(a[:, peek], np.full(EXPERIMENTS, trials), 0.025)
        lo_b, hi_b = proportion_cs(b[:, peek], np.full(EXPERIMENTS, trials), 0.025)
        sequential_alarm |= (lo_a - hi_b > 0) | (hi_a - lo_b < 0)
        # The naive reading: a two-sample z-test at 95%, repeated at every peek.
        diff = (a[:, peek] - b[:, peek]) / trials
        pooled = (a[:, peek] + b[:, peek]) / (2 * trials)
        se = np.sqrt(np.maximum(2 * pooled * (1 - pooled) / trials, 1e-12))
        naive_alarm |= np.abs(diff) > 1.96 * se
    assert sequential_alarm.mean() <= 0.05, sequential_alarm.mean()
    assert naive_alarm.mean() > 3 * max(sequential_alarm.mean(), 0.05), naive_alarm.mean()


@pytest.mark.parametrize("rate", [0.5, 0.9, 0.98])
def test_the_sequence_covers_the_rate_at_every_peek_at_least_as_often_as_promised(rate):
    rng = np.random.default_rng(1)
    counts = _peeked_streams(rng, rate)
    n = np.arange(PEEK_EVERY, SAMPLES + 1, PEEK_EVERY)
    always = np.ones(EXPERIMENTS, bool)
    naive_always = np.ones(EXPERIMENTS, bool)
    for peek, trials in enumerate(n):
        lo, hi = proportion_cs(counts[:, peek], np.full(EXPERIMENTS, trials), 0.05)
        always &= (lo <= rate) & (rate <= hi)
        nlo, nhi = _naive_interval(counts[:, peek], trials)
        naive_always &= (nlo <= rate) & (rate <= nhi)
    # Time-uniform coverage: nominal 95%, within 2 points below it (a mixture sequence is conservative).
    assert always.mean() >= 0.93, always.mean()
    # The fixed-sample interval read 40 times covers at every peek far less often.
    assert naive_always.mean() < always.mean() - 0.1, (naive_always.mean(), always.mean())


def test_a_two_point_top1_gap_is_detected_within_the_documented_samples():
    # Student 96% vs teacher 98% on labelled feedback: 8,000 labels an arm suffice (5,000: found in 54% of runs).
    rng = np.random.default_rng(2)
    runs, labels = 200, 8000
    student = np.cumsum(rng.random((runs, labels)) < 0.96, axis=1)
    teacher = np.cumsum(rng.random((runs, labels)) < 0.98, axis=1)
    detected = np.array(
        [difference_cs(int(student[r, -1]), labels, int(teacher[r, -1]), labels)[1] < 0 for r in range(runs)]
    )
    assert detected.mean() >= 0.8, detected.mean()


def test_the_paired_shadow_comparison_sees_a_gap_with_fewer_labels_and_holds_when_there_is_none():
    # Same requests, both models, 2,000 labelled: 0.5% only the student right, 2.5% only the teacher right
    # (a gap of 2 points) -> found with a quarter of the labels the unpaired arms need.
    rng = np.random.default_rng(3)
    outcome = rng.choice(3, size=2000, p=[0.97, 0.005, 0.025])  # 0: same, 1: student wins, 2: teacher wins
    lo, hi = paired_difference_cs(int((outcome == 1).sum()), int((outcome == 2).sum()), len(outcome))
    assert lo < -0.02 < hi < 0
    # No gap: discordant pairs split evenly; the interval holds 0.
    lo, hi = paired_difference_cs(30, 30, 2000)
    assert lo < 0 < hi


def test_quantile_bounds_from_histogram_buckets_cover_the_true_p99():
    rng = np.random.default_rng(4)
    edges = [0.5 * 1.05**i for i in range(140)] + [math.inf]  # ms, 5% apart, as the gateway's buckets
    true_p99 = float(np.exp(np.log(5.0) + 0.4 * 2.3263478740408408))  # lognormal(log 5 ms, 0.4)
    covered, widths = 0, []
    for _ in range(200):
        samples = np.exp(rng.normal(np.log(5.0), 0.4, 4000))
        counts = np.bincount(np.searchsorted(edges, samples), minlength=len(edges))[: len(edges)]
        lo, hi = quantile_cs(edges, counts.tolist(), 0.99)
        covered += lo <= true_p99 <= hi
        widths.append(hi / lo)
    assert covered / 200 >= 0.95
    assert np.median(widths) < 1.4  # 4,000 requests pin p99 to within ~30%


def test_too_few_observations_leave_the_upper_quantile_bound_open():
    lo, hi = quantile_cs([1.0, 2.0, math.inf], [10, 5, 0], 0.99)
    assert lo >= 0 and math.isinf(hi)


def test_gates_read_pass_fail_or_pending_from_the_interval():
    assert at_most((1.0, 2.0), 3.0) == "pass"
    assert at_most((3.5, 4.0), 3.0) == "fail"
    assert at_most((2.0, 4.0), 3.0) == "pending"
    assert at_least((0.96, 0.99), 0.95) == "pass"
    assert at_least((0.90, 0.94), 0.95) == "fail"
    assert at_least((0.93, 0.97), 0.95) == "pending"


def test_a_proportion_with_no_failures_reaches_one_and_bad_counts_are_refused():
    lo, hi = proportion_cs(100, 100)
    assert float(hi) == 1.0 and 0.9 < float(lo) < 1.0
    lo, hi = proportion_cs(0, 0)
    assert float(lo) == 0.0 and float(hi) == 1.0
    with pytest.raises(ValueError):
        proportion_cs(5, 3)
