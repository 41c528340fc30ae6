"""Drift of every served model version, counted on the request path and judged off it (`kdcontract.drift`).

A request adds its answers to its model version's counts (a max, an argmax and a bincount: microseconds);
every `drift_interval_s` the counts are judged in a thread, and each version's evidence and verdict go to
the metrics (`kdserve_drift_*`: the Prometheus alert `KdserveDrift` and the dashboard's drift panel read
them) and to `GET /v1/drift`. A version's detection is latched for the life of the process: an anytime-valid
test that crossed its threshold once has rejected. Each replica tests its own traffic, at `drift_alpha`.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from gateway.telemetry.metrics import GatewayMetrics
from kdcontract.drift import UNSURE, DriftVerdict, VersionCounts, judge_drift
from kdcontract.manifest import DriftReference, ModelEntry
from kdcontract.names import versioned

log = logging.getLogger("kdserve.gateway")


class DriftMonitor:
    def __init__(
        self, metrics: GatewayMetrics, tolerance: float, alpha: float, interval_s: float, min_images: int = 0
    ) -> None:
        self.metrics, self.tolerance, self.alpha, self.interval_s = metrics, tolerance, alpha, interval_s
        self.min_images = min_images
        self._counts: dict[tuple[str, int], tuple[DriftReference, VersionCounts]] = {}
        self.verdicts: dict[str, dict] = {}
        self._detected: set[tuple[str, int]] = set()

    def observe(self, entry: ModelEntry, probabilities: np.ndarray) -> None:
        """One answer of `entry` (a model at one version); nothing for a version without a reference."""
        reference = entry.drift_reference
        if reference is None or probabilities.ndim != 2 or probabilities.shape[-1] != len(reference.class_shares):
            return
        key = (entry.name, entry.version)
        if key not in self._counts:
            self._counts[key] = (reference, VersionCounts())
        self._counts[key][1].add(probabilities, reference.unsure_below)

    def snapshot(self) -> list[tuple[tuple[str, int], DriftReference, VersionCounts]]:
        """The counts as they are now (on the event loop, which alone adds to them: a consistent copy)."""
        return [(key, reference, c.copy()) for key, (reference, c) in self._counts.items()]

    def judge(self, snapshot: list[tuple[tuple[str, int], DriftReference, VersionCounts]]) -> dict[str, dict]:
        """Every version's verdict on `snapshot`, shown on the metrics; what `GET /v1/drift` answers."""
        verdicts = {}
        for (name, version), reference, counts in snapshot:
            verdict = judge_drift(counts, reference, self.tolerance, self.alpha, self.min_images)
            verdicts[versioned(name, version)] = self._show(name, version, verdict)
        self.verdicts = verdicts
        return verdicts

    def _show(self, name: str, version: int, verdict: DriftVerdict) -> dict:
        labels = (name, str(version))
        if verdict.detected and (name, version) not in self._detected:
            self._detected.add((name, version))
            log.error(
                "drift: %s version %s after %d images (%s, log10 e-value %.2f >= %.2f)",
                name, version, verdict.images, verdict.strongest, verdict.evidence[verdict.strongest],
                verdict.threshold,
            )  # fmt: skip
        detected = (name, version) in self._detected
        m = self.metrics
        m.drift_detected.labels(*labels).set(int(detected))
        m.drift_images.labels(*labels).set(verdict.images)
        m.drift_evidence.labels(*labels, UNSURE).set(verdict.evidence[UNSURE])
        m.drift_evidence.labels(*labels, "class_share").set(max(v for s, v in verdict.evidence.items() if s != UNSURE))
        m.drift_threshold.labels(*labels).set(verdict.threshold)
        return {
            "model": name,
            "version": version,
            "images": verdict.images,
            "test_images": verdict.since,
            "detected": detected,
            "strongest": verdict.strongest,
            "threshold_log10": verdict.threshold,
            "evidence_log10": verdict.evidence,
        }

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            started = time.perf_counter()
            try:
                await asyncio.to_thread(self.judge, self.snapshot())
            except Exception:  # a judgement must never end the monitor; the next one tries again
                log.exception("drift judgement failed")
            self.metrics.drift_judge_seconds.observe(time.perf_counter() - started)
