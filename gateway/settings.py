"""Gateway settings from environment variables (prefix KDSERVE_), validated at start-up.

A bad configuration (A/B weights that do not add up, an unknown arm, a shadow fraction outside
[0, 1]) stops the gateway before it serves a single request.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gateway.auth.keys import ApiKey
from kdcontract.fusion import FusionMethod
from kdcontract.names import DEFAULT_AB_WEIGHTS

# The most images any request may carry, whatever the settings say: the request schemas declare it.
MAX_IMAGES_PER_REQUEST = 1024


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KDSERVE_", env_nested_delimiter="__", extra="forbid")

    repo: Path = Field(Path("model_repository"), description="the Triton model repository (reads manifest.json)")
    host: str = "127.0.0.1"
    port: int = 8080

    # Triton: an external server, or the embedded one the gateway starts and supervises.
    triton_url: str = Field("127.0.0.1:8000", description="Triton HTTP host:port", pattern=r"^[^:/\s]+:[0-9]{1,5}$")
    embedded_triton: bool = False
    triton_grpc_port: int = 8001
    triton_metrics_port: int = 8002
    triton_log: Path | None = Field(
        None, description="the embedded Triton's log file (default: triton.log beside the repository)"
    )
    triton_timeout_s: float = Field(5.0, gt=0, description="deadline of one Triton call")
    triton_connections: int = Field(32, ge=1, description="pooled HTTP connections to Triton")
    triton_calls_in_flight: int = Field(
        2, ge=1, description="Triton calls under way per model before concurrent requests share the next one"
    )
    retry_after_s: int = Field(2, ge=1, description="Retry-After sent with 503s")
    # Not 0: a request whose bytes are still arriving when the signal lands has no request cycle in
    # uvicorn yet, and stopping at once resets its connection (measured: 1 of 6 batch requests sent 30 ms
    # before SIGTERM on a slower CPU). A second of drain reads and answers every request already started.
    drain_s: float = Field(
        1.0, ge=0, description="on SIGTERM: seconds /readyz reports 503 while requests are still served"
    )
    shutdown_grace_s: float = Field(20.0, gt=0, description="then: how long in-flight requests may take to finish")
    manifest_poll_s: float = Field(
        2.0, ge=0, description="seconds between checks for a re-exported manifest.json (0: never re-read)"
    )

    # Admission control: images in flight to one Triton model; past it, an immediate 503 + Retry-After.
    # The default keeps a full bound of teacher work (~150 img/s here) well inside the 5 s deadline.
    admission_max_images: int = Field(256, ge=1, description="images in flight per Triton model")
    # While another caller's small requests use the same model, a larger request goes to Triton this many
    # images at a time, so the small ones wait for a slice, not a whole batch (gateway/serving/admission.py).
    triton_slice_images: int = Field(
        8,
        ge=0,
        description="images per Triton call for a large request while other callers' small ones share "
        "its model (0: never sliced)",
    )
    decode_threads: int = Field(os.cpu_count() or 1, ge=1, description="threads decoding large images")

    # Slow clients: a request's headers, and then its body, must arrive within these (a socket that
    # trickles or stalls holds a descriptor and a coroutine; a 408 or a closed connection ends it).
    header_timeout_s: float = Field(10.0, gt=0, description="to send a request's headers")
    body_timeout_s: float = Field(30.0, gt=0, description="to send a request's body (408 past it)")

    # Input limits, enforced before decoding.
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(4096 * 4096, ge=64)
    # The images of one request together: with 64 images at the per-image limit, one request could make the
    # gateway decode 1 G pixels (16 x 4096^2 PNGs peaked it at 1.5 GB, review of 61e1da7).
    max_request_pixels: int = Field(4096 * 4096, ge=64, description="pixels of all images in one request")
    max_images: int = Field(64, ge=1, le=MAX_IMAGES_PER_REQUEST, description="images per request")
    allowed_formats: list[str] = ["PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"]

    # Ensemble fusion.
    fusion: FusionMethod = "mean_prob"
    fusion_weights: dict[str, float] = Field(default_factory=dict, description="member -> weight ('weighted')")
    ensemble_quorum: int = Field(2, ge=1, description="members that must answer; fewer is a 503")

    # A/B test between the student and teacher arms.
    ab_weights: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_AB_WEIGHTS))
    ab_key_header: str = "X-Client-Key"
    shadow_fraction: float = Field(0.0, ge=0, le=1, description="share of requests mirrored to the other arm")
    ab_window: int = Field(10_000, ge=100, description="latencies kept per arm for /v1/ab/summary")
    # The experiment every replica follows (arms, weights, shadow, gates, rollout); without the file, the
    # three settings above. Changed with PUT /v1/experiment, which needs the admin bearer token.
    experiment_file: Path | None = Field(None, description="the experiment's JSON file, shared by every replica")
    experiment_poll_s: float = Field(2.0, gt=0, description="seconds between checks of the experiment file")
    admin_token_sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$", description="sha256 (hex) of the admin bearer token; unset: no admin API"
    )

    # Drift of each served version against its validation reference (gateway/serving/drift.py).
    drift_tolerance: float = Field(
        0.05, ge=0, lt=1, description="a share (unsure answers, one class's answers) may exceed its reference by this"
    )
    drift_alpha: float = Field(0.05, gt=0, lt=1, description="false alarm rate of each version's drift test")
    drift_interval_s: float = Field(5.0, gt=0, description="seconds between drift judgements")
    drift_min_images: int = Field(
        100, ge=0, description="answers of a version before its drift test may flag it (a warm-up repeats images)"
    )

    # Who may call (gateway/auth/gate.py): API keys by their sha256, with scopes and per-key quotas.
    default_key_max_in_flight: int | None = Field(
        64, ge=1, description="requests under way at once for a key that sets no max_in_flight (none: unlimited)"
    )
    default_key_bytes_per_s: float | None = Field(
        64 * 2**20,
        gt=0,
        description="request bytes per second for a key that sets no bytes_per_s, a burst of max_body_bytes "
        "(none: unlimited)",
    )
    api_keys: list[ApiKey] = Field(default_factory=list, description="API keys (JSON list), e.g. from a Secret")
    api_keys_file: Path | None = Field(None, description="a JSON file of API keys, re-read when it changes")
    allow_anonymous: bool = Field(
        False, description="classify without keys on a non-loopback address when no classify key is configured"
    )

    # The Open Inference Protocol over gRPC (gateway/grpc/servicer.py), beside HTTP.
    grpc_port: int = Field(8081, ge=0, le=65535, description="the gateway's gRPC port (0: no gRPC)")

    # OpenTelemetry traces (gateway/telemetry/tracing.py): off at 0.
    trace_sample_ratio: float = Field(0.0, ge=0, le=1, description="share of requests traced (0: tracing off)")
    otlp_endpoint: str | None = Field(
        None, pattern=r"^https?://", description="OTLP/HTTP collector base URL (spans go to <url>/v1/traces)"
    )

    # Ground truth for the A/B arms: what each A/B request's arms answered, kept in a directory every
    # replica reaches, so feedback joins on any replica (gateway/feedback/answers.py). Unset: no feedback.
    answers_dir: Path | None = Field(None, description="shared directory of A/B answers awaiting feedback")
    answers_ttl_s: float = Field(3600.0, ge=1, description="how long an answer waits for its feedback")
    answers_max_records: int = Field(1_000_000, ge=100, description="answers kept on disk at most (oldest go first)")
    answers_queue: int = Field(10_000, ge=1, description="answers waiting for the writer; beyond, dropped and counted")
    # Joining a label costs the replica's CPU (answer files looked up and claimed, counters): without a
    # bound, one key's closed loop of 1,000-item batches kept two join threads busy and the interpreter
    # lock away from every other caller's requests (their p99 x3.5-x4.3, `make faults`). An honest labeller
    # sends a batch now and then; the bucket holds one full batch (1,000 items) above the rate.
    feedback_items_per_s: float = Field(
        1000.0, gt=0, description="feedback items one API key may send to one replica per second (429 past it)"
    )

    # Served traffic kept as distillation data (gateway/capture/recorder.py): opt-in, images can be personal data.
    capture_fraction: float = Field(0.0, ge=0, le=1, description="share of classified requests captured (0: off)")
    capture_dir: Path | None = Field(None, description="directory the capture's segments are written to")
    capture_url: str | None = Field(
        None,
        pattern=r"^s3://[^/]+(/.*)?$",
        description="or s3://bucket/prefix in S3-compatible storage (endpoint: AWS_ENDPOINT_URL; credentials: "
        "the AWS variables or the pod's role)",
    )
    capture_originals: bool = Field(False, description="keep each image's original bytes too")
    capture_segment_images: int = Field(512, ge=1, description="images a segment file holds at most")
    capture_segment_s: float = Field(30.0, gt=0, description="seconds a segment stays open at most")
    capture_retention_s: float = Field(7 * 24 * 3600.0, gt=0, description="segments older than this are removed")
    capture_max_bytes: int = Field(10 * 2**30, ge=2**20, description="the capture's size cap (oldest removed first)")
    capture_queue: int = Field(10_000, ge=1, description="requests waiting for the writer; beyond, dropped and counted")

    @field_validator("ab_weights")
    @classmethod
    def _weights_are_a_distribution(cls, weights: dict[str, float]) -> dict[str, float]:
        if not weights:
            raise ValueError("ab_weights needs at least one arm")
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"ab_weights must be non-negative with a positive sum, got {weights}")
        total = sum(weights.values())
        return {arm: w / total for arm, w in weights.items()}

    @field_validator("allowed_formats")
    @classmethod
    def _upper(cls, formats: list[str]) -> list[str]:
        return [f.upper() for f in formats]

    @model_validator(mode="after")
    def _consistent(self) -> GatewaySettings:
        if self.shadow_fraction > 0 and len(self.ab_weights) < 2:
            raise ValueError("shadow_fraction > 0 needs two A/B arms to mirror between")
        if self.max_request_pixels < self.max_image_pixels:
            raise ValueError(
                f"max_request_pixels ({self.max_request_pixels}) must admit one image of max_image_pixels "
                f"({self.max_image_pixels})"
            )
        if self.admission_max_images < self.max_images:
            raise ValueError(
                f"admission_max_images ({self.admission_max_images}) must admit one full request "
                f"of max_images ({self.max_images})"
            )
        if self.capture_fraction > 0 and (self.capture_dir is None) == (self.capture_url is None):
            raise ValueError(
                "capture_fraction > 0 needs exactly one of capture_dir (KDSERVE_CAPTURE_DIR) and capture_url "
                "(KDSERVE_CAPTURE_URL)"
            )
        if any(w <= 0 for w in self.fusion_weights.values()):
            raise ValueError(f"fusion_weights must be positive, got {self.fusion_weights}")
        return self
