"""Anytime-valid statistics for A/B experiments: intervals that may be read after every request.

A fixed-sample confidence interval read again and again as data arrives will sooner or later exclude
the truth (a z-test peeked after every 50 samples up to 2,000 calls an A/A test "different" about 1
time in 4 to 5). The intervals here are confidence *sequences*: with probability at least 1 - alpha
they hold at every sample size at once (Ville's inequality for a nonnegative martingale), so a verdict
read at any moment keeps its error rate.

Everything works on counts, because counts from several gateway replicas (Prometheus counters, or
each replica's /metrics) add up exactly:
- a proportion (agreement with the teacher, top-1 on feedback): successes out of trials, through the
  beta-binomial mixture martingale (Robbins 1970; Howard et al. 2021, "Time-uniform, nonparametric,
  nonasymptotic confidence sequences");
- the difference of two arms' proportions: both sequences at alpha / 2 (unpaired arms), or the shadow's
  paired comparison through its discordant pairs;
- a latency quantile: counts in histogram buckets, the order statistics around the quantile chosen by
  the proportion sequence of "an observation is below x" (Howard and Ramdas 2022, "Sequential
  estimation of quantiles"); the interval is widened to bucket edges, where the histogram's resolution
  ends.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

ALPHA = 0.05
# Beta(1/2, 1/2) (Jeffreys) mixing prior: the sequence is valid for any prior; this one spends its width
# evenly over rates near 0, 1 and in between.
PRIOR = 0.5
_EDGE_WAYS = 64  # rates tried per edge and round: each round narrows an edge 64-fold
_EDGE_ROUNDS = 9  # 64^-9 = 2^-54: far below any rate a count can show


_LGAMMA = np.frompyfunc(math.lgamma, 1, 1)  # numpy has no lgamma; frompyfunc calls it with the least overhead


def _log_beta(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    both = _LGAMMA(np.concatenate([np.ravel(a), np.ravel(b), np.ravel(a + b)])).astype(float)
    size = np.size(a)
    return (both[:size] + both[size : 2 * size] - both[2 * size :]).reshape(np.shape(a))


_LOG_BETA_PRIOR = math.lgamma(PRIOR) * 2 - math.lgamma(2 * PRIOR)


def _log_mixture(s: np.ndarray, n: np.ndarray) -> np.ndarray:
    f = n - s
    return _log_beta(PRIOR + s, PRIOR + f) - _LOG_BETA_PRIOR


def _rejected(s: np.ndarray, n: np.ndarray, p: np.ndarray, log_mixture: np.ndarray, alpha: float) -> np.ndarray:
    """Whether the rate p lies outside the sequence for s successes of n trials (elementwise)."""
    f = n - s
    with np.errstate(divide="ignore", invalid="ignore"):
        log_likelihood = np.where(s > 0, s * np.log(p), 0.0) + np.where(f > 0, f * np.log1p(-p), 0.0)
    return log_mixture - log_likelihood >= math.log(1 / alpha)


def proportion_cs(
    successes: np.ndarray | int, trials: np.ndarray | int, alpha: float = ALPHA
) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bounds of the rate behind `successes` out of `trials` (elementwise).

    The set of rates p whose mixture likelihood ratio B(a+S, b+F)/B(a, b) / (p^S (1-p)^F) stays below
    1/alpha: the ratio is a nonnegative martingale with mean 1 under the true p, so it crosses 1/alpha at
    any time with probability at most alpha. Its logarithm is convex in p, so the set is an interval
    around S/n, whose edges are searched on either side.
    """
    s = np.asarray(successes, dtype=float)
    n = np.asarray(trials, dtype=float)
    if np.any(s < 0) or np.any(s > n):
        raise ValueError("successes must lie between 0 and trials")
    # Both edges searched in one pass over the stacked arrays, _EDGE_WAYS rates per edge a round (9 rounds to
    # 2^-50 instead of 50 bisections): the numpy calls' overhead, not their arithmetic, is what a gate's
    # handful of counts costs, and GET /v1/experiment computes a dozen of these in a thread that shares the
    # GIL with the event loop.
    shape = s.shape
    s2, n2 = np.concatenate([s.ravel(), s.ravel()]), np.concatenate([n.ravel(), n.ravel()])
    log_mixture = _log_mixture(s2, n2)
    centre = np.where(n2 > 0, s2 / np.maximum(n2, 1), 0.5)
    far = np.repeat([0.0, 1.0], s.size)
    inside, out = centre.copy(), far.copy()
    steps = np.arange(1, _EDGE_WAYS) / _EDGE_WAYS  # strictly between the edge's inside and outside ends
    column = (slice(None), None)
    for _ in range(_EDGE_ROUNDS):
        rates = inside[column] + (out - inside)[column] * steps
        rejected = _rejected(s2[column], n2[column], rates, log_mixture[column], alpha)
        # Rejection is monotone from the centre outwards (the log ratio is convex in p): the first rejected
        # rate is the new outside end, the one before it the new inside end.
        first = np.where(rejected.any(axis=1), rejected.argmax(axis=1), len(steps))
        rows = np.arange(len(inside))
        out = np.where(first < len(steps), rates[rows, np.minimum(first, len(steps) - 1)], out)
        inside = np.where(first > 0, rates[rows, np.maximum(first - 1, 0)], inside)
    # The far end itself is in the set when nothing there is rejected (e.g. no failures yet: p = 1).
    edges = np.where(_rejected(s2, n2, far, log_mixture, alpha), inside, far)
    return edges[: s.size].reshape(shape), edges[s.size :].reshape(shape)


def difference_cs(
    successes_a: int, trials_a: int, successes_b: int, trials_b: int, alpha: float = ALPHA
) -> tuple[float, float]:
    """Bounds on rate(a) - rate(b) from two independent arms: each arm's sequence at alpha / 2 (a
    union bound, so the pair holds at every time with probability 1 - alpha)."""
    lo_a, hi_a = proportion_cs(successes_a, trials_a, alpha / 2)
    lo_b, hi_b = proportion_cs(successes_b, trials_b, alpha / 2)
    return float(lo_a - hi_b), float(hi_a - lo_b)


def paired_difference_cs(wins: int, losses: int, pairs: int, alpha: float = ALPHA) -> tuple[float, float]:
    """Bounds on rate(a) - rate(b) when both answered the same requests (the shadow): `wins` pairs only
    a got right, `losses` only b. The difference is P(discordant) x (2 P(a wins | discordant) - 1);
    each factor's sequence at alpha / 2, and the product's extremes over that box."""
    if wins + losses > pairs:
        raise ValueError("more discordant pairs than pairs")
    lo_d, hi_d = (float(x) for x in proportion_cs(wins + losses, pairs, alpha / 2))
    lo_q, hi_q = (float(x) for x in proportion_cs(wins, wins + losses, alpha / 2))
    corners = [d * (2 * q - 1) for d in (lo_d, hi_d) for q in (lo_q, hi_q)]
    return min(corners), max(corners)


def quantile_cs(
    upper_bounds: list[float], counts: list[int], quantile: float, alpha: float = ALPHA
) -> tuple[float, float]:
    """Bounds on the `quantile` (0.99: p99) of what a histogram counts.

    `upper_bounds` are the buckets' inclusive upper edges in increasing order (the last may be inf) and
    `counts` their (non-cumulative) counts. The k-th smallest observation bounds the quantile from below
    while the sequence for "a value is <= it" (k of n) still reaches `quantile`, and from above once it
    has passed it; those order statistics are then widened to their buckets' edges. An upper bound of
    inf means: not enough observations above the quantile yet.
    """
    if len(upper_bounds) != len(counts):
        raise ValueError("one count per bucket")
    n = int(sum(counts))
    if n == 0:
        return 0.0, math.inf
    # Both bounds grow with k, so the first rank where each crosses the quantile is bisected, not scanned
    # (evaluating every rank 0..n cost 0.8 s at n = 100k, on the event loop), and whether a bound has
    # crossed it is whether the quantile is inside the sequence at all: one test, no inner bisection. The
    # test is scalar `math` (~1 us) since it is asked ~40 times for one n: numpy's per-call overhead was
    # most of GET /v1/experiment's cost, in a thread sharing the GIL with the event loop.
    bar = math.log(1 / alpha)

    def covers(k: int) -> bool:
        return _covers_rate(k, n, quantile, bar)

    # Smallest k whose "k of n below" can still mean a rate >= quantile (upper bound >= quantile), and
    # smallest k that must exceed it (lower bound > quantile).
    lower_rank = min(n, _first_rank(lambda k: k >= quantile * n or covers(k), n))
    upper_rank = _first_rank(lambda k: k > quantile * n and not covers(k), n)
    cumulative = np.cumsum(counts)
    edges = [0.0, *upper_bounds]

    def bucket_of(rank: int) -> int:
        return int(np.searchsorted(cumulative, rank))  # first bucket holding the rank-th observation

    low = edges[bucket_of(lower_rank)] if lower_rank >= 1 else 0.0
    high = upper_bounds[bucket_of(upper_rank)] if upper_rank <= n else math.inf
    return float(low), float(high)


def _covers_rate(successes: int, trials: int, rate: float, bar: float) -> bool:
    """`_rejected`'s test, negated, for one count and one rate in plain floats: the rate is inside the
    sequence while the log mixture ratio stays below `bar` = log(1 / alpha)."""
    failures = trials - successes
    log_mixture = (
        math.lgamma(PRIOR + successes) + math.lgamma(PRIOR + failures) - math.lgamma(2 * PRIOR + trials)
    ) - _LOG_BETA_PRIOR
    log_likelihood = (successes * math.log(rate) if successes else 0.0) + (
        failures * math.log1p(-rate) if failures else 0.0
    )
    return log_mixture - log_likelihood < bar


def _first_rank(holds: Callable[[int], bool], n: int) -> int:
    """The smallest k in 0..n for which `holds` (monotone: once true, true for every larger k) is true;
    n + 1 when it holds nowhere. Bisected: a million ranks cost 21 evaluations."""
    low, high = 0, n + 1  # the answer lies in [low, high]; every rank below `low` fails
    while low < high:
        middle = (low + high) // 2
        if holds(middle):
            high = middle
        else:
            low = middle + 1
    return low


Status = Literal["pass", "fail", "pending"]


@dataclass(frozen=True)
class Verdict:
    """One gate read now: pass, fail, or pending (the interval still straddles the threshold, or too
    few samples or too little time yet)."""

    gate: str
    status: Status
    estimate: float | None
    interval: tuple[float, float]
    threshold: float
    samples: int
    reason: str

    def as_dict(self) -> dict:
        lo, hi = self.interval
        return {
            "gate": self.gate,
            "status": self.status,
            "estimate": self.estimate,
            "interval": [lo, None if math.isinf(hi) else hi],
            "threshold": self.threshold,
            "samples": self.samples,
            "reason": self.reason,
        }


def at_most(interval: tuple[float, float], threshold: float) -> Status:
    """A gate "value <= threshold": passes once the whole interval is below, fails once it is above."""
    lo, hi = interval
    return "pass" if hi <= threshold else "fail" if lo > threshold else "pending"


def at_least(interval: tuple[float, float], threshold: float) -> Status:
    lo, hi = interval
    return "pass" if lo >= threshold else "fail" if hi < threshold else "pending"
