"""Asynchronous calls to Triton: pooled connections, per-call deadlines, errors mapped to domain errors."""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
import tritonclient.http.aio as aiohttpclient
from tritonclient.utils import InferenceServerException

from gateway.errors import BadRequest, Unavailable, UpstreamTimeout
from gateway.metrics import GatewayMetrics

log = logging.getLogger("kdserve.gateway")


class TritonClient:
    def __init__(self, url: str, timeout_s: float, connections: int, retry_after_s: int, metrics: GatewayMetrics):
        self.url, self.timeout_s, self.retry_after = url, timeout_s, str(retry_after_s)
        self.metrics = metrics
        self._client = aiohttpclient.InferenceServerClient(url, conn_limit=connections, conn_timeout=timeout_s)

    async def close(self) -> None:
        await self._client.close()

    def _unavailable(self, why: str) -> Unavailable:
        return Unavailable(why, headers={"Retry-After": self.retry_after})

    async def infer(
        self, model: str, images: np.ndarray, output: str = "logits", timeout_s: float | None = None
    ) -> np.ndarray:
        tensor = aiohttpclient.InferInput("images", list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images, binary_data=True)  # raw bytes on the wire, never JSON numbers
        requested = [aiohttpclient.InferRequestedOutput(output, binary_data=True)]
        start = time.perf_counter()
        outcome = "ok"
        try:
            result = await asyncio.wait_for(
                self._client.infer(model, [tensor], outputs=requested), timeout_s or self.timeout_s
            )
            return result.as_numpy(output)
        except TimeoutError as exc:
            outcome = "timeout"
            raise UpstreamTimeout(f"model {model} did not answer within {timeout_s or self.timeout_s:.2f}s") from exc
        except InferenceServerException as exc:
            # Triton's own text goes to the log, never to the client.
            log.warning("triton rejected a request to %s: %s", model, exc)
            status = str(exc.status() or "")
            if status in ("400", "StatusCode.INVALID_ARGUMENT"):
                outcome = "rejected"
                raise BadRequest(f"model {model} rejected the input") from exc
            outcome = "unavailable"
            raise self._unavailable(f"model {model} is not available") from exc
        except (OSError, Exception) as exc:
            if isinstance(exc, (BadRequest, Unavailable, UpstreamTimeout)):
                raise
            outcome = "unreachable"
            log.warning("triton unreachable at %s: %r", self.url, exc)
            raise self._unavailable("inference server unreachable") from exc
        finally:
            self.metrics.triton_seconds.labels(model, outcome).observe(time.perf_counter() - start)

    async def server_ready(self) -> bool:
        try:
            return await asyncio.wait_for(self._client.is_server_ready(), self.timeout_s)
        except Exception:
            return False

    async def model_ready(self, model: str) -> bool:
        try:
            return await asyncio.wait_for(self._client.is_model_ready(model), self.timeout_s)
        except Exception:
            return False
