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

While another caller sends small requests to a model (at most `slice_images` images, now or within the last
`SHARED_S`), a larger request's images go to Triton in slices of that many (`KDSERVE_TRITON_SLICE_IMAGES`,
`gateway.triton.client`): a share bounds how many images a caller holds, not how long another waits behind
them, and a one-image request queued behind 64-image executions waited for two of them (neighbour p99
x7.5-x9.4 of quiet while a key sent 64-image JSON tensors, x2.6-x2.8 sliced; `make faults`). Only for small
requests: a caller alone keeps whole batches (unchanged throughput), and so do two callers that both send
batches (slicing them cost 43% of the student's throughput and bought neither anything).

It runs on the event loop only (no awaits between check and update), so no lock is needed.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

from gateway.errors import Overloaded, OverShare
from gateway.telemetry.metrics import GatewayMetrics

ANYONE = "anonymous"
SHARED_S = 1.0  # small requests of another caller this recent still slice a large one


class AdmissionControl:
    def __init__(self, limit: int, retry_after_s: int, metrics: GatewayMetrics, slice_images: int = 0):
        self.limit, self.retry_after_s, self.metrics = limit, retry_after_s, metrics
        self.slice_images = slice_images  # 0: never sliced
        self._in_flight: dict[str, int] = defaultdict(int)
        self._by_caller: dict[str, dict[str, int]] = defaultdict(dict)  # model -> caller -> images
        # model -> caller -> when it last sent or was answered a small request (monotonic); callers are key
        # ids and `anonymous`: a bounded set.
        self._last_small: dict[str, dict[str, float]] = defaultdict(dict)

    def _refusal(self, model: str, images: int, caller: str) -> Overloaded | None:
        """Why `caller` may not add `images` to `model` now (None: it may): the model full (503), or the
        caller over its share (429)."""
        if self._in_flight[model] + images > self.limit:
            return Overloaded(
                f"model {model} is at its bound of {self.limit} images in flight; retry shortly",
                {"Retry-After": str(self.retry_after_s)},
            )
        held, share = self._share(model, caller)
        if held and held + images > share:
            return self._over_share(model, caller, held, share)
        return None

    def _share(self, model: str, caller: str) -> tuple[int, int]:
        """(images `caller` holds of `model`, its share): the bound over two more than the other holders,
        room kept for one more caller than are busy now."""
        holders = self._by_caller[model]
        held = holders.get(caller, 0)
        return held, self.limit // (len(holders) - (caller in holders) + 2)

    def _over_share(self, model: str, caller: str, held: int, share: int) -> OverShare:
        message = f"model {model}: this caller holds {held} of its {share} images in flight"
        return OverShare(message, caller, self.retry_after_s)

    def slice_for(self, model: str, caller: str) -> int | None:
        """Images per Triton call for `caller`'s requests to `model`: `slice_images` while another caller's
        small requests use it (admitted or answered within SHARED_S: one request at a time leaves the
        model between its calls), else None (whole)."""
        if not self.slice_images:
            return None
        since = time.monotonic() - SHARED_S
        others = (at > since for other, at in self._last_small[model].items() if other != caller)
        return self.slice_images if any(others) else None

    def _seen(self, models: list[str], images: int, caller: str) -> None:
        if images <= self.slice_images:
            now = time.monotonic()
            for model in models:
                self._last_small[model][caller] = now

    def check_share(self, models: list[str], caller: str) -> None:
        """Raise OverShare when `caller` already holds its whole share of one of `models`: checked before a
        request's body is read, so a caller flooding a model is refused without parsing what it sent (100
        connections of 64-image requests cost the gateway its event loop in parsing alone, `make faults`)."""
        for model in models:
            held, share = self._share(model, caller)
            if held and held >= share:
                self.metrics.admission_rejected.labels(model).inc()
                raise self._over_share(model, caller, held, share)

    @contextmanager
    def admit(self, models: list[str], images: int, caller: str = ANYONE) -> Iterator[None]:
        """Hold `images` against every model in `models` for the block, or raise Overloaded for all of them."""
        refusals = [(m, error) for m in models if (error := self._refusal(m, images, caller)) is not None]
        if refusals:
            for model, _ in refusals:
                self.metrics.admission_rejected.labels(model).inc()
            raise refusals[0][1]
        self._seen(models, images, caller)
        for model in models:
            self._in_flight[model] += images
            self._by_caller[model][caller] = self._by_caller[model].get(caller, 0) + images
            self.metrics.child(self.metrics.admitted_images, model).set(self._in_flight[model])
        try:
            yield
        finally:
            self._seen(models, images, caller)
            for model in models:
                self._in_flight[model] -= images
                left = self._by_caller[model][caller] - images
                if left:
                    self._by_caller[model][caller] = left
                else:
                    del self._by_caller[model][caller]
                self.metrics.child(self.metrics.admitted_images, model).set(self._in_flight[model])
