"""Timing primitives of the bench: latency summaries, interleaved timing, concurrent load, Triton's statistics.

Paths compared in one figure are timed interleaved (a block of each in turn), so drift on a shared
2-core machine lands on every path alike instead of on whichever ran last.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import aiohttp
import numpy as np

from kdcontract.stats import percentiles

STALL_MS = 100.0  # a call slower than this at concurrency 1 is a stall (the queue-policy bug took ~500 ms)


def summarize(samples_ms: list[float]) -> dict[str, float]:
    values = np.asarray(samples_ms, dtype=np.float64)
    p = percentiles(values, (50, 99))
    return {
        "requests": int(values.size),
        "p50_ms": p["p50"],
        "p99_ms": p["p99"],
        "max_ms": round(float(values.max()), 3),
        "mean_ms": round(float(values.mean()), 3),
        "over_100ms": int((values > STALL_MS).sum()),
    }


@dataclass
class TritonStats:
    """Cumulative statistics of one model, from Triton's `/v2/models/<m>/stats`."""

    requests: int = 0
    queue_ns: int = 0
    compute_ns: int = 0
    inferences: int = 0
    executions: int = 0

    @classmethod
    def read(cls, triton_http: str, model: str) -> TritonStats:
        with urllib.request.urlopen(f"http://{triton_http}/v2/models/{model}/stats", timeout=10) as response:
            stats = json.load(response)["model_stats"][0]
        inference = stats["inference_stats"]
        compute = sum(int(inference[k]["ns"]) for k in ("compute_input", "compute_infer", "compute_output"))
        return cls(
            requests=int(inference["success"]["count"]),
            queue_ns=int(inference["queue"]["ns"]),
            compute_ns=compute,
            inferences=int(stats["inference_count"]),
            executions=int(stats["execution_count"]),
        )

    def __sub__(self, earlier: TritonStats) -> TritonStats:
        return TritonStats(*(a - b for a, b in zip(self.__dict__.values(), earlier.__dict__.values(), strict=True)))

    def __add__(self, other: TritonStats) -> TritonStats:
        return TritonStats(*(a + b for a, b in zip(self.__dict__.values(), other.__dict__.values(), strict=True)))

    def figures(self) -> dict[str, float | None]:
        """Mean queue and compute time per request and the mean batch Triton formed (images per execution)."""
        if self.requests == 0:
            return {"queue_ms": None, "compute_ms": None, "mean_batch": None}
        return {
            "queue_ms": round(self.queue_ns / self.requests / 1e6, 3),
            "compute_ms": round(self.compute_ns / self.requests / 1e6, 3),
            "mean_batch": round(self.inferences / self.executions, 2) if self.executions else None,
        }


def time_interleaved(
    calls: dict[str, Callable[[], object]],
    requests: int,
    block: int = 50,
    warmup: int = 20,
    around_block: Callable[[str], AbstractContextManager] | None = None,
) -> dict[str, list[float]]:
    """Each call `requests` times, in alternating blocks of `block`; milliseconds per call.

    `around_block(name)` wraps each block (outside the timed calls), e.g. to read server statistics.
    """
    for call in calls.values():
        for _ in range(warmup):
            call()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    while any(len(s) < requests for s in samples.values()):
        for name, call in calls.items():
            with around_block(name) if around_block else nullcontext():
                for _ in range(min(block, requests - len(samples[name]))):
                    start = time.perf_counter()
                    call()
                    samples[name].append((time.perf_counter() - start) * 1000)
    return samples


def metric_value(metrics_text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """One sample of a Prometheus text exposition (0.0 when the series does not exist yet)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == name and sample.labels == (labels or {}):
                return float(sample.value)
    return 0.0


def load_threads(call: Callable[[], object], concurrency: int, seconds: float) -> dict[str, float]:
    """`concurrency` threads calling in a loop for `seconds` (in-process ONNX Runtime releases the GIL)."""
    deadline = time.perf_counter() + seconds

    def loop() -> list[float]:
        done = []
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            call()
            done.append((time.perf_counter() - start) * 1000)
        return done

    with ThreadPoolExecutor(concurrency) as pool:
        samples = [s for part in pool.map(lambda _: loop(), range(concurrency)) for s in part]
    return {"throughput_per_s": round(len(samples) / seconds, 1), **summarize(samples)}


def load_client(concurrency: int) -> aiohttp.ClientSession:
    """The load generator's HTTP client. aiohttp, not httpx: against the same Triton on this machine
    httpx's AsyncClient delivered 544 req/s at 16 clients and 172 at 64, aiohttp 1,510 and 2,787, so
    httpx measured itself rather than the server."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency), timeout=aiohttp.ClientTimeout(total=60)
    )


REFUSED, LOST = "refused", "lost"


async def post_images(
    client: aiohttp.ClientSession, url: str, images: list[tuple[str, bytes]], headers: dict[str, str] | None = None
) -> str:
    """POST `images` (filename, PNG bytes) as the multipart `images` field; the status code as text,
    REFUSED when no connection could be made, LOST when one broke or timed out without an answer."""
    data = aiohttp.FormData()
    for name, payload in images:
        data.add_field("images", payload, filename=name, content_type="image/png")
    try:
        async with client.post(url, data=data, headers=headers) as resp:
            await resp.read()
            return str(resp.status)
    except aiohttp.ClientConnectorError:
        return REFUSED
    except (TimeoutError, aiohttp.ClientError):
        return LOST


def load_async(
    call: Callable[[aiohttp.ClientSession], Awaitable[object]], concurrency: int, seconds: float
) -> dict[str, float]:
    """`concurrency` coroutines calling in a loop for `seconds` on one event loop, sharing one client."""

    async def run() -> list[float]:
        samples: list[float] = []
        async with load_client(concurrency) as client:
            deadline = time.perf_counter() + seconds

            async def loop() -> None:
                while time.perf_counter() < deadline:
                    start = time.perf_counter()
                    await call(client)
                    samples.append((time.perf_counter() - start) * 1000)

            await asyncio.gather(*(loop() for _ in range(concurrency)))
        return samples

    samples = asyncio.run(run())
    return {"throughput_per_s": round(len(samples) / seconds, 1), **summarize(samples)}
