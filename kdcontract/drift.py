"""Drift: are a model version's served answers still like its answers on held-out images?

Training records a reference per exported version (`DriftReference`, in the manifest): on the validation
split, the calibrated top-1 confidence below which the least sure 10% of images fall, and the share of
images predicted as each class. Serving counts, per model version, how many answered images fell below
that confidence and how many were predicted as each class. Drift is evidence that one of those shares now
exceeds its reference by more than a tolerance: more unsure answers (inputs the model was not trained on),
or one class taking far more of the answers than it did (a collapse onto a few classes).

Each share is judged by an anytime-valid test (a test supermartingale; Ville's inequality), so it may be
looked at after every image, for ever, and its false alarm rate stays at most its level: for a Bernoulli
rate p, H0: p <= p0 + tolerance, the e-value is a mixture over alternatives q > p0 + tolerance of the
likelihood ratios (q / p0)^k ((1 - q) / (1 - p0))^(n - k), each a supermartingale under H0. It depends on the
counts only, so it is computed from them off the request path. The 1 + C shares are tested at
level / (1 + C) each (Bonferroni).

A change after a long quiet history must not wait for the history to be outweighed, so a new test begins
every BLOCK answers (an e-detector): the j-th at level alpha / (j (j + 1)), which sum to alpha, so the
chance of any false alarm, over all tests and all time, stays at most alpha, while the threshold of a test
begun after n answers grows only as log(n^2). The tests begun in the last STARTS_KEPT blocks are looked at
(not looking at older ones only costs power). A verdict waits for a minimum of answers in its test
(`drift_min_images`): the test assumes answers drawn independently, and the first few of a version are
often not (a client's warm-up sends one picture five times, which alone would cross the threshold).

Why not a library (Evidently on captured windows): its tests are fixed-sample, so checking them every
window without correction raises false alarms without bound, and windows delay detection; this test is
valid at every image and needs two counters per share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from kdcontract.manifest import DriftReference

UNSURE_QUANTILE = 0.10  # the reference's least sure share of validation images
ALTERNATIVES = 64  # grid of alternative rates in the mixture (uniform weights)
UNSURE = "unsure"
BLOCK = 250  # answers between the starts of two tests
STARTS_KEPT = 64  # tests looked at: those begun in the last 64 blocks (16,000 answers)
_STEPS = np.arange(1, ALTERNATIVES + 1) / (ALTERNATIVES + 1)  # alternatives, as shares of the way from bound to 1


def reference_from(probabilities: np.ndarray) -> DriftReference:
    """The reference of calibrated probabilities [N, C] on validation images."""
    confidence = probabilities.max(-1)
    below = float(np.quantile(confidence, UNSURE_QUANTILE))
    predicted = np.bincount(probabilities.argmax(-1), minlength=probabilities.shape[-1])
    return DriftReference(
        images=len(probabilities),
        unsure_below=below,
        unsure_rate=float((confidence < below).mean()),
        class_shares=(predicted / len(probabilities)).tolist(),
    )


def log_evidence(k, n, bound):
    """log of the mixture e-value against H0: rate <= `bound`, after `k` of `n` observations were hits
    (numbers, or arrays that broadcast: many tests and shares at once).

    Alternatives are spread evenly over (bound, 1); for bound >= 1 nothing can exceed it (0)."""
    k, n, bound = np.broadcast_arrays(np.asarray(k, float), np.asarray(n, float), np.asarray(bound, float))
    b = np.clip(bound, 1e-9, 1 - 1e-9)[..., None]
    q = b + (1 - b) * _STEPS
    terms = k[..., None] * np.log(q / b) + (n - k)[..., None] * np.log((1 - q) / (1 - b))
    top = terms.max(-1)
    value = top + np.log(np.exp(terms - top[..., None]).sum(-1)) - math.log(ALTERNATIVES)
    value = np.where((n == 0) | (bound >= 1), 0.0, value)
    return float(value) if value.ndim == 0 else value


@dataclass
class VersionCounts:
    """What one model version answered: totals, and the totals at each test's start (every BLOCK answers)."""

    images: int = 0
    unsure: int = 0
    predicted: np.ndarray | None = None
    # (j, images, unsure, predicted) when the j-th test began (j = 1: counting began); the last STARTS_KEPT
    starts: list[tuple[int, int, int, np.ndarray | None]] = field(default_factory=lambda: [(1, 0, 0, None)])

    def add(self, probabilities: np.ndarray, unsure_below: float) -> None:
        confidence = probabilities.max(-1)
        counts = np.bincount(probabilities.argmax(-1), minlength=probabilities.shape[-1])
        self.predicted = counts if self.predicted is None else self.predicted + counts
        self.images += len(probabilities)
        self.unsure += int((confidence < unsure_below).sum())
        following = self.starts[-1][0] + 1
        if self.images >= (following - 1) * BLOCK:
            self.starts.append((following, self.images, self.unsure, self.predicted.copy()))
            del self.starts[:-STARTS_KEPT]

    def copy(self) -> VersionCounts:
        predicted = None if self.predicted is None else self.predicted.copy()
        return VersionCounts(self.images, self.unsure, predicted, list(self.starts))


@dataclass(frozen=True)
class DriftVerdict:
    detected: bool
    evidence: dict[str, float]  # signal -> log10 e-value (the unsure share, each class's share), best test
    threshold: float  # log10 of what the best test's signals must reach
    images: int  # answers counted
    since: int  # answers the best test has seen (it began `images - since` answers in)

    @property
    def strongest(self) -> str:
        return max(self.evidence, key=self.evidence.get)


def judge_drift(
    counts: VersionCounts, reference: DriftReference, tolerance: float, alpha: float, min_images: int = 0
) -> DriftVerdict:
    """Every kept test (the j-th at alpha / (j (j + 1)), its shares at that / (1 + classes) each), on the answers
    since it began; the one nearest its threshold is reported. A test flags nothing before `min_images`."""
    classes = len(reference.class_shares)
    total = counts.predicted if counts.predicted is not None else np.zeros(classes, int)
    j = np.array([start[0] for start in counts.starts], float)
    n = counts.images - np.array([start[1] for start in counts.starts], float)
    hits = np.column_stack([
        counts.unsure - np.array([start[2] for start in counts.starts], float),
        np.stack([total - (start[3] if start[3] is not None else 0) for start in counts.starts]),
    ])  # fmt: skip
    bounds = np.array([reference.unsure_rate, *reference.class_shares]) + tolerance
    evidence = log_evidence(hits, n[:, None], bounds[None, :]) / math.log(10)  # [tests, signals]
    thresholds = np.log10((1 + classes) * j * (j + 1) / alpha)
    best = int(np.argmax(evidence.max(1) - thresholds))
    names = [UNSURE, *(f"class_{c}" for c in range(classes))]
    detected = bool(n[best] >= min_images and evidence[best].max() >= thresholds[best])
    # a test that has not seen `min_images` may be nearest its threshold while another one has crossed
    crossed = (n >= min_images) & (evidence.max(1) >= thresholds)
    if crossed.any() and not detected:
        best, detected = int(np.flatnonzero(crossed)[0]), True
    return DriftVerdict(
        detected,
        dict(zip(names, evidence[best].tolist(), strict=True)),
        float(thresholds[best]),
        counts.images,
        int(n[best]),
    )
