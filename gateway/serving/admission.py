"""Admission control: a bound on the images in flight to each Triton model; past it, shed at once.

Triton's own queue cannot be bounded safely here (a queue policy stalls the pinned Triton, see
`training.triton_repo`), so the bound lives in the gateway: a request that would take a model past
`limit` images in flight gets an immediate 503 with Retry-After instead of a place in a queue whose
wait would outlast its deadline. Counting images, not requests, keeps one 64-image request from
hiding behind the bound of 64 one-image ones.

The bound is shared between callers (API keys; the anonymous caller is one): a caller's first request
is admitted whenever the model has room, further ones only within its share: the bound divided by two
more than the other callers holding images of that model now. A caller alone holds at most half; with
others busy, less; so whoever comes next always finds room (one key sending 64-image requests on 100
connections got 1,125 x 503 and 263 x 200, and another key's classifies 503 on 12 of 24, on 61e1da7).

It runs on the event loop only (no awaits between check and update), so no lock is needed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

from gateway.errors import Overloaded, OverShare
from gateway.telemetry.metrics import GatewayMetrics

ANYONE = "anonymous"


class AdmissionControl:
    def __init__(self, limit: int, retry_after_s: int, metrics: GatewayMetrics):
        self.limit, self.retry_after, self.metrics = limit, str(retry_after_s), metrics
        self._in_flight: dict[str, int] = defaultdict(int)
        self._by_caller: dict[str, dict[str, int]] = defaultdict(dict)  # model -> caller -> images

    def _refusal(self, model: str, images: int, caller: str) -> Overloaded | None:
        """Why `caller` may not add `images` to `model` now (None: it may): the model full (503), or the
        caller over its share (429)."""
        retry = {"Retry-After": self.retry_after}
        if self._in_flight[model] + images > self.limit:
            return Overloaded(f"model {model} is at its bound of {self.limit} images in flight; retry shortly", retry)
        held, share = self._share(model, caller)
        if held and held + images > share:
            return OverShare(f"model {model}: this caller holds {held} of its {share} images in flight", retry)
        return None

    def _share(self, model: str, caller: str) -> tuple[int, int]:
        """(images `caller` holds of `model`, its share): the bound over two more than the other holders,
        room kept for one more caller than are busy now."""
        holders = self._by_caller[model]
        held = holders.get(caller, 0)
        return held, self.limit // (len(holders) - (caller in holders) + 2)

    def check_share(self, models: list[str], caller: str) -> None:
        """Raise OverShare when `caller` already holds its whole share of one of `models`: checked before a
        request's body is read, so a caller flooding a model is refused without parsing what it sent (100
        connections of 64-image requests cost the gateway its event loop in parsing alone, `make faults`)."""
        for model in models:
            held, share = self._share(model, caller)
            if held and held >= share:
                self.metrics.admission_rejected.labels(model).inc()
                raise OverShare(
                    f"model {model}: this caller holds {held} of its {share} images in flight",
                    {"Retry-After": self.retry_after},
                )

    @contextmanager
    def admit(self, models: list[str], images: int, caller: str = ANYONE) -> Iterator[None]:
        """Hold `images` against every model in `models` for the block, or raise Overloaded for all of them."""
        refusals = [(m, error) for m in models if (error := self._refusal(m, images, caller)) is not None]
        if refusals:
            for model, _ in refusals:
                self.metrics.admission_rejected.labels(model).inc()
            raise refusals[0][1]
        for model in models:
            self._in_flight[model] += images
            self._by_caller[model][caller] = self._by_caller[model].get(caller, 0) + images
            self.metrics.child(self.metrics.admitted_images, model).set(self._in_flight[model])
        try:
            yield
        finally:
            for model in models:
                self._in_flight[model] -= images
                left = self._by_caller[model][caller] - images
                if left:
                    self._by_caller[model][caller] = left
                else:
                    del self._by_caller[model][caller]
                self.metrics.child(self.metrics.admitted_images, model).set(self._in_flight[model])
