"""Admission control: a bound on the images in flight to each Triton model; past it, shed at once.

Triton's own queue cannot be bounded safely here (a queue policy stalls the pinned Triton, see
`training.triton_repo`), so the bound lives in the gateway: a request that would take a model past
`limit` images in flight gets an immediate 503 with Retry-After instead of a place in a queue whose
wait would outlast its deadline. Counting images, not requests, keeps one 64-image request from
hiding behind the bound of 64 one-image ones.

It runs on the event loop only (no awaits between check and update), so no lock is needed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

from gateway.errors import Overloaded
from gateway.metrics import GatewayMetrics


class AdmissionControl:
    def __init__(self, limit: int, retry_after_s: int, metrics: GatewayMetrics):
        self.limit, self.retry_after, self.metrics = limit, str(retry_after_s), metrics
        self._in_flight: dict[str, int] = defaultdict(int)

    @contextmanager
    def admit(self, models: list[str], images: int) -> Iterator[None]:
        """Hold `images` against every model in `models` for the block, or raise Overloaded for all of them."""
        full = [m for m in models if self._in_flight[m] + images > self.limit]
        if full:
            for model in full:
                self.metrics.admission_rejected.labels(model).inc()
            raise Overloaded(
                f"model {full[0]} is at its bound of {self.limit} images in flight; retry shortly",
                headers={"Retry-After": self.retry_after},
            )
        for model in models:
            self._in_flight[model] += images
            self.metrics.admitted_images.labels(model).set(self._in_flight[model])
        try:
            yield
        finally:
            for model in models:
                self._in_flight[model] -= images
                self.metrics.admitted_images.labels(model).set(self._in_flight[model])
