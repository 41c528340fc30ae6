"""Prometheus metrics of the gateway, on a registry of its own (one per app, so tests stay isolated)."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

# Milliseconds matter here: a student answers in a few ms, a teacher in tens.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._request_series(self.registry)
        self._triton_series(self.registry)
        self._experiment_series(self.registry)
        self._store_series(self.registry)
        self._drift_series(self.registry)

    def _request_series(self, r: CollectorRegistry) -> None:
        """Latency and counts of requests, by route, model, arm and status; errors by kind; per key."""
        self.request_seconds = Histogram(
            "kdserve_request_duration_seconds",
            "Gateway request latency",
            ["route", "model", "arm", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.decode_seconds = Histogram(
            "kdserve_decode_duration_seconds",
            "Decoding and resizing the images of one request",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter("kdserve_requests_total", "Requests", ["route", "model", "arm", "status"], registry=r)
        self.errors = Counter("kdserve_errors_total", "Errors by kind", ["kind"], registry=r)
        # Read with the gates' counters: a new value says the replica restarted (its counters began at 0 then).
        self.started_at = Gauge(
            "kdserve_started_at_seconds", "When this gateway process started (unix time)", registry=r
        )
        self.started_at.set(time.time())
        # Label values: configured key ids, `anonymous` and `invalid` only (never a key): bounded by configuration.
        self.key_requests = Counter(
            "kdserve_api_key_requests_total", "Requests by API key id and outcome", ["key", "outcome"], registry=r
        )
        self.in_flight = Gauge("kdserve_in_flight_requests", "Requests being served", registry=r)
        self.images = Counter("kdserve_images_total", "Images classified", ["model"], registry=r)

    def _triton_series(self, r: CollectorRegistry) -> None:
        """Triton's calls, and what the gateway does around them: fusion, cascade, admission, manifests."""
        self.triton_seconds = Histogram(
            "kdserve_triton_call_duration_seconds",
            "One Triton inference call",
            ["model", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.triton_call_images = Histogram(
            "kdserve_triton_call_images",
            "Images in one Triton call (concurrent requests for a model share calls)",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.fusion_seconds = Histogram(
            "kdserve_fusion_duration_seconds",
            "Fusing ensemble outputs",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.degraded = Counter("kdserve_ensemble_degraded_total", "Ensemble answers missing a member", registry=r)
        self.admitted_images = Gauge(
            "kdserve_admitted_images",
            "Images in flight to each Triton model (admission control)",
            ["model"],
            registry=r,
        )
        self.admission_rejected = Counter(
            "kdserve_admission_rejected_total",
            "Requests shed by admission control (503) because a model was at its in-flight bound",
            ["model"],
            registry=r,
        )
        self.cascade_escalations = Counter(
            "kdserve_cascade_escalations_total",
            "Images the cascade's student was unsure of and passed to the teacher, by whether it answered",
            ["outcome"],
            registry=r,
        )
        self.manifest_reloads = Counter(
            "kdserve_manifest_reloads_total",
            "Polls that found a re-exported manifest: switched, waiting (Triton lacks its versions), refused",
            ["outcome"],
            registry=r,
        )

    def _experiment_series(self, r: CollectorRegistry) -> None:
        """What the gates judge (shadow agreement, feedback top-1 and pairs) and the experiment's state."""
        self.shadow = Counter(
            "kdserve_shadow_requests_total",
            "Shadow requests by arm and whether top-1 agreed",
            ["arm", "agreed"],
            registry=r,
        )
        # Ground truth joined to the A/B answers; counters, so replicas add up exactly in Prometheus.
        self.feedback = Counter(
            "kdserve_feedback_total",
            "Feedback items by outcome: accepted, unknown, expired, duplicate, invalid_label",
            ["outcome"],
            registry=r,
        )
        self.feedback_top1 = Counter(
            "kdserve_feedback_top1_total",
            "Labelled images by the A/B arm that answered them and whether its top-1 was right",
            ["arm", "correct"],
            registry=r,
        )
        # Label values: configured key ids and `anonymous` (bounded by configuration, as the key metrics are).
        self.feedback_key_labels = Counter(
            "kdserve_feedback_key_labels_total",
            "Accepted labels by the API key that sent them and whether they agree with the answer's top-1",
            ["key", "agrees"],
            registry=r,
        )
        self.feedback_pairs = Counter(
            "kdserve_feedback_pairs_total",
            "Labelled images both an arm and its shadow answered, by whether each was right",
            ["primary", "shadow", "primary_correct", "shadow_correct"],
            registry=r,
        )
        self.rollout_phase = Gauge(
            "kdserve_rollout_phase", "The experiment's rollout phase (1 for the current one)", ["phase"], registry=r
        )
        self.rollout_step = Gauge("kdserve_rollout_step", "The rollout's current step (-1: not started)", registry=r)
        # The configured split, next to the observed one: the A/B drift alert compares the two.
        self.ab_weight = Gauge("kdserve_ab_weight", "Configured share of A/B traffic per arm", ["arm"], registry=r)

    def _drift_series(self, r: CollectorRegistry) -> None:
        """Each served version's answers against its validation reference (gateway/serving/drift.py)."""
        self.drift_evidence = Gauge(
            "kdserve_drift_evidence_log10",
            "log10 e-value that a served version's answers drifted from its validation reference, by signal "
            "(unsure: more answers below the reference's confidence; class_share: the most over-predicted class)",
            ["model", "version", "signal"],
            registry=r,
        )
        self.drift_threshold = Gauge(
            "kdserve_drift_threshold_log10", "log10 e-value a signal must reach", ["model", "version"], registry=r
        )
        self.drift_detected = Gauge(
            "kdserve_drift_detected",
            "1 once a version's drift test rejected (latched)",
            ["model", "version"],
            registry=r,
        )
        self.drift_images = Gauge(
            "kdserve_drift_images", "Answers a version's drift test has counted", ["model", "version"], registry=r
        )
        self.drift_judge_seconds = Histogram(
            "kdserve_drift_judge_seconds", "Judging every version's drift (off the event loop)", registry=r
        )

    def _store_series(self, r: CollectorRegistry) -> None:
        """The answer store's and the capture's own counts."""
        self.answers_dropped = Counter(
            "kdserve_answers_dropped_total",
            "A/B answers not kept for feedback: the writer's queue was full, or the store at its record cap",
            registry=r,
        )
        self.capture_images = Counter("kdserve_capture_images_total", "Images written to the capture", registry=r)
        self.capture_segments = Counter(
            "kdserve_capture_segments_total", "Capture segment files written, by kind", ["kind"], registry=r
        )
        self.capture_dropped = Counter(
            "kdserve_capture_dropped_total",
            "Images sampled for the capture but not kept: queue_full (the writer is behind), write_failed",
            ["reason"],
            registry=r,
        )

    def child(self, metric: MetricWrapperBase, *values: str) -> Any:
        """`metric.labels(*values)`, remembered: prometheus_client validates the values and takes a lock on
        every `labels()` call, ~9 of them a request (review of 61e1da7). The request path's label values
        are bounded sets (routes, served models, arms, statuses, key ids), as the series themselves are."""
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def start_at_zero(
        self, ab_weights: dict[str, float], triton_models: list[str], error_kinds: list[str], cascade: bool
    ) -> None:
        """Export every series a dashboard or alert reads from the first scrape on, at 0.

        A labelled series appears only when first incremented: until then `rate()` over it is empty,
        not 0, so a panel says "No data" and a ratio alert cannot be evaluated.
        """
        for arm, weight in ab_weights.items():
            self.ab_weight.labels(arm).set(weight)
        for model in triton_models:
            self.admitted_images.labels(model).set(0)
            self.admission_rejected.labels(model)
        for kind in error_kinds:
            self.errors.labels(kind)
        for outcome in ("accepted", "unknown", "expired", "duplicate", "invalid_label"):
            self.feedback.labels(outcome)
        for reason in ("queue_full", "write_failed"):
            self.capture_dropped.labels(reason)
        if cascade:
            for outcome in ("answered", "failed"):
                self.cascade_escalations.labels(outcome)
