"""Calls to Triton as the gateway needs them: one deadline per call, errors mapped to domain errors.

The wire protocol is `gateway.triton.rest` (chosen by measurement, see there). Triton's own error text
goes to the log and never to a client.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from gateway.errors import BadRequest, Unavailable, UpstreamError, UpstreamTimeout
from gateway.telemetry import tracing
from gateway.telemetry.metrics import GatewayMetrics
from gateway.triton.coalesce import Coalescer
from gateway.triton.rest import TritonHTTP, TritonHTTPError, model_path

log = logging.getLogger("kdserve.gateway")

# Triton's words for a model that is not loaded (unloaded, failed, or a newer version still loading):
# a server-side condition that passes, so a 503, not the client's fault.
NOT_SERVING = ("unknown model", "no available versions", "not ready", "is not found")
# How long a probe's readiness answer is reused: probes (open to anyone, and a load balancer's every second)
# share one Triton call per path in this window. Every readiness call goes over a connection of its own,
# so a probe flood never takes the connections inference waits for (review of 61e1da7: 504s under a flood
# of /readyz). The manifest follower asks afresh: a version that just became READY must be seen at once.
READY_TTL_S = 0.25


class TritonClient:
    def __init__(
        self,
        url: str,
        timeout_s: float,
        connections: int,
        retry_after_s: int,
        metrics: GatewayMetrics,
        calls_in_flight: int,
        max_images: int,
    ):
        self.url, self.timeout_s, self.retry_after = url, timeout_s, str(retry_after_s)
        self.metrics = metrics
        self._http = TritonHTTP(url, connections)
        self.probes = TritonHTTP(url, 1)
        self._readiness: dict[str, tuple[float, asyncio.Future[bool]]] = {}
        self._coalescer = Coalescer(self._call, calls_in_flight, max_images, timeout_s, self._count_images)

    async def close(self) -> None:
        await self._http.close()
        await self.probes.close()

    def _unavailable(self, why: str) -> Unavailable:
        return Unavailable(why, headers={"Retry-After": self.retry_after})

    def _map_triton_error(self, model: str, exc: TritonHTTPError) -> tuple[str, Exception]:
        if any(phrase in exc.message.lower() for phrase in NOT_SERVING) or exc.status == 503:
            return "unavailable", self._unavailable(f"model {model} is not available")
        if exc.status == 400:
            return "rejected", BadRequest(f"model {model} rejected the input")
        # INTERNAL and anything unknown: the model failed on this input; retrying will not help.
        return "failed", UpstreamError(f"model {model} failed to run")

    async def infer(
        self,
        model: str,
        images: np.ndarray,
        output: str = "logits",
        version: int | None = None,
        slice_images: int | None = None,
    ) -> np.ndarray:
        """The named output for `images`; concurrent calls for the same model may share one Triton
        request (`gateway.triton.coalesce`). The caller waits at most the deadline of one call.
        `slice_images`: sent that many at a time, one slice after another, each with a call's deadline (while
        other callers' small requests share the model: theirs wait for a slice, not for the whole batch)."""
        key = (model, version, output, images.shape[1:], images.dtype.str)
        try:
            if slice_images and len(images) > slice_images:
                slices = [images[i : i + slice_images] for i in range(0, len(images), slice_images)]
                return np.concatenate([await self._coalescer.run(key, part) for part in slices])
            return await self._coalescer.run(key, images)
        except TimeoutError as exc:  # waited for a shared call past the deadline (a call's own is mapped in _call)
            raise UpstreamTimeout(f"model {model} did not answer within {self.timeout_s:.2f}s") from exc

    def _count_images(self, key: tuple, images: int) -> None:
        self.metrics.child(self.metrics.triton_call_images, key[0]).observe(images)

    async def _call(self, key: tuple, images: np.ndarray) -> np.ndarray:
        """One Triton request, timed and counted, its errors mapped to domain errors."""
        model, version, output = key[:3]
        start = time.perf_counter()
        outcome = "cancelled"  # unless set below: the gateway stopped while it was under way
        try:
            with tracing.client_span("triton.infer", model=model, images=len(images)):
                async with asyncio.timeout(self.timeout_s):
                    answer = await self._http.infer(model, images, output, version, tracing.traceparent())
            outcome = "ok"
            return answer
        except TimeoutError as exc:
            outcome = "timeout"
            raise UpstreamTimeout(f"model {model} did not answer within {self.timeout_s:.2f}s") from exc
        except TritonHTTPError as exc:
            # Triton's own text goes to the log, never to the client.
            log.warning("triton refused a request to %s: %s", model, exc)
            outcome, error = self._map_triton_error(model, exc)
            raise error from exc
        except OSError as exc:  # refused, reset or closed: ConnectionError is an OSError
            outcome = "unreachable"
            log.warning("triton unreachable at %s: %r", self.url, exc)
            raise self._unavailable("inference server unreachable") from exc
        finally:
            self.metrics.child(self.metrics.triton_seconds, model, outcome).observe(time.perf_counter() - start)

    async def _ready(self, path: str, shared: bool) -> bool:
        """Triton's answer for a readiness `path`; `shared`: asked at most once per READY_TTL_S however many
        ask (the paths are Triton's health and the manifest's models: a bounded set)."""
        if not shared:
            return await self._probe(path)
        now = time.monotonic()
        known = self._readiness.get(path)
        if known is None or (known[1].done() and now - known[0] > READY_TTL_S):
            known = (now, asyncio.ensure_future(self._probe(path)))
            self._readiness[path] = known
        return await asyncio.shield(known[1])  # a caller that gives up leaves the call to the others

    async def _probe(self, path: str) -> bool:
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self.probes.ready(path)
        except (TimeoutError, OSError):
            return False

    async def server_ready(self, shared: bool = True) -> bool:
        return await self._ready("/v2/health/ready", shared)

    async def server_live(self, shared: bool = True) -> bool:
        return await self._ready("/v2/health/live", shared)

    async def model_ready(self, model: str, version: int | None = None, shared: bool = True) -> bool:
        """`shared` (probes): an answer up to READY_TTL_S old may be reused; else Triton is asked now."""
        return await self._ready(f"{model_path(model, version)}/ready", shared)
