"""Drift: are a model version's served answers still like its answers on held-out images?

Training records a reference per exported version (`DriftReference`, in the manifest): on the validation
split, the calibrated top-1 confidence below which the least sure 10% of images fall, and the share of
images predicted as each class. Serving counts, per model version, how many answered images fell below
that confidence and how many were predicted as each class. Drift is evidence that one of those shares now
exceeds its reference by more than a tolerance: more unsure answers (inputs the model was not trained on),
or one class taking far more of the answers than it did (a collapse onto a few classes).

Each share is judged by an anytime-valid test (a test supermartingale; Ville's inequality), so it may be
looked at after every image, for ever, and its false alarm rate stays at most alpha: for a Bernoulli rate
p, H0: p <= p0 + tolerance, the e-value is a mixture over alternatives q > p0 + tolerance of the likelihood
ratios (q / p0)^k ((1 - q) / (1 - p0))^(n - k), each a supermartingale under H0. It depends on the counts
only, so it is computed from them off the request path. The 1 + C shares are tested at alpha / (1 + C)
each (Bonferroni). Why not a library (Evidently on captured windows): its tests are fixed-sample, so
checking them every window without correction raises false alarms without bound, and windows delay
detection; this test is valid at every image and needs two counters per share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kdcontract.manifest import DriftReference

UNSURE_QUANTILE = 0.10  # the reference's least sure share of validation images
ALTERNATIVES = 64  # grid of alternative rates in the mixture (uniform weights)
UNSURE = "unsure"
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


def log_evidence(k: int, n: int, bound: float) -> float:
    """log of the mixture e-value against H0: rate <= `bound`, after `k` of `n` observations were hits.

    Alternatives are spread evenly over (bound, 1); for bound >= 1 nothing can exceed it (0)."""
    if n == 0 or bound >= 1:
        return 0.0
    bound = max(bound, 1e-9)
    q = bound + (1 - bound) * _STEPS
    terms = k * np.log(q / bound) + (n - k) * np.log((1 - q) / (1 - bound))
    top = terms.max()
    return float(top + np.log(np.exp(terms - top).sum()) - math.log(ALTERNATIVES))

@dataclass
class VersionCounts:
    """What one model version answered since counting began."""

    images: int = 0
    unsure: int = 0
    predicted: np.ndarray | None = None

    def add(self, probabilities: np.ndarray, unsure_below: float) -> None:
        confidence = probabilities.max(-1)
        counts = np.bincount(probabilities.argmax(-1), minlength=probabilities.shape[-1])
        self.predicted = counts if self.predicted is None else self.predicted + counts
        self.images += len(probabilities)
        self.unsure += int((confidence < unsure_below).sum())


@dataclass(frozen=True)
class DriftVerdict:
    detected: bool
    evidence: dict[str, float]  # signal -> log10 e-value (the unsure share, and each class's share)
    threshold: float  # log10 of what each signal's e-value must reach
    images: int

    @property
    def strongest(self) -> str:
        return max(self.evidence, key=self.evidence.get)


def judge_drift(counts: VersionCounts, reference: DriftReference, tolerance: float, alpha: float) -> DriftVerdict:
    """Every share against its reference plus `tolerance`, each at alpha / (1 + classes)."""
    classes = len(reference.class_shares)
    threshold = math.log10((1 + classes) / alpha)
    predicted = counts.predicted if counts.predicted is not None else np.zeros(classes, int)
    evidence = {UNSURE: log_evidence(counts.unsure, counts.images, reference.unsure_rate + tolerance) / math.log(10)}
    for c, share in enumerate(reference.class_shares):
        evidence[f"class_{c}"] = log_evidence(int(predicted[c]), counts.images, share + tolerance) / math.log(10)
    return DriftVerdict(max(evidence.values()) >= threshold, evidence, threshold, counts.images)
