"""Served traffic kept as distillation data: a sampled share of classified images, and feedback labels.

Opt-in (`KDSERVE_CAPTURE_FRACTION`, 0 by default): images can be personal data. Off the request path:
a request only puts references on a bounded queue (`KDSERVE_CAPTURE_QUEUE`); when it is full the images
are dropped and counted (`kdserve_capture_dropped_total`), the request is never slowed or failed. A
background task gathers rows into segments (`KDSERVE_CAPTURE_SEGMENT_IMAGES` rows, or
`KDSERVE_CAPTURE_SEGMENT_S` seconds, whichever comes first) and writes each whole or not at all in a
thread of its own (temporary file, then rename), in the format `kdcontract.capture` defines and training
reads. Retention (`KDSERVE_CAPTURE_RETENTION_S`) and a size cap (`KDSERVE_CAPTURE_MAX_BYTES`, oldest
segments first) are enforced on every write. The segments go to a directory (`KDSERVE_CAPTURE_DIR`, a
volume every replica may share) or to S3-compatible object storage (`KDSERVE_CAPTURE_URL`,
`s3://bucket/prefix`), where one PUT is one whole object.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from gateway.capture.sinks import LocalSink, ObjectStoreSink
from gateway.telemetry.metrics import GatewayMetrics
from kdcontract.capture import (
    CapturedImage,
    LabelItem,
    encode_images,
    encode_labels,
    segment_name,
)

log = logging.getLogger("kdserve.gateway")


@dataclass
class _Pending:
    request_id: str
    images: np.ndarray
    originals: list[bytes] | None
    model: str
    version: int | None
    probabilities: np.ndarray
    at: float
    key: str  # the API key id that made the request: what erasure by key finds


class Capture:
    def __init__(
        self,
        sink: LocalSink | ObjectStoreSink,
        fraction: float,
        class_names: list[str],
        metrics: GatewayMetrics,
        queue_size: int,
        segment_images: int,
        segment_s: float,
        originals: bool,
    ) -> None:
        self.sink, self.fraction, self.class_names, self.metrics = sink, fraction, class_names, metrics
        self.segment_images, self.segment_s, self.keep_originals = segment_images, segment_s, originals
        self.queue: asyncio.Queue[_Pending | tuple[str, list[str], float]] = asyncio.Queue(queue_size)
        self.writer_id = secrets.token_hex(4)  # one gateway process: segment names never collide
        self._seq = 0
        self._random = random.Random()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="capture")
        self._open_rows: list[CapturedImage] = []  # the segments being gathered
        self._open_labels: list[LabelItem] = []

    # -- the request path: O(1), never waits --------------------------------------------------------
    def sample(self) -> bool:
        return self.fraction > 0 and self._random.random() < self.fraction

    def images(self, request_id: str, images: np.ndarray, originals: list[bytes], outcome, key: str) -> None:
        item = _Pending(
            request_id,
            images,
            originals if self.keep_originals else None,
            outcome.model,
            outcome.version,
            outcome.probabilities,
            time.time(),
            key,
        )
        self._put(item, len(images))

    def labels(self, request_id: str, labels: list[str], key: str) -> None:
        """Feedback labels joined to a captured request, with the API key id that sent them (training judges
        each key's labels against the others' before it trusts them)."""
        self._put(LabelItem(request_id, labels, time.time(), key), 0)

    def _put(self, item, images: int) -> None:
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.metrics.capture_dropped.labels("queue_full").inc(max(images, 1))

    # -- the writer ---------------------------------------------------------------------------------
    async def run(self) -> None:
        opened = time.monotonic()
        while True:
            waiting = self._open_rows or self._open_labels
            timeout = max(0.0, self.segment_s - (time.monotonic() - opened)) if waiting else None
            try:
                self._take(await asyncio.wait_for(self.queue.get(), timeout=timeout))
            except TimeoutError:
                pass  # the open segment is old enough
            else:
                if not waiting:
                    opened = time.monotonic()
                if max(len(self._open_rows), len(self._open_labels)) < self.segment_images:
                    continue
            await self._write_open()
            opened = time.monotonic()

    async def flush(self) -> None:
        """Shutdown (after `run` is cancelled): the open segment and what is queued, written whole."""
        while not self.queue.empty():
            self._take(self.queue.get_nowait())
        await self._write_open()

    def _take(self, item: _Pending | LabelItem) -> None:
        if isinstance(item, _Pending):
            self._open_rows.extend(self._rows(item))
        else:
            self._open_labels.append(item)

    async def _write_open(self) -> None:
        rows, labels = self._open_rows, self._open_labels
        self._open_rows, self._open_labels = [], []
        if rows or labels:
            await self._write(rows, labels)

    def _rows(self, item: _Pending) -> list[CapturedImage]:
        top1 = item.probabilities.argmax(-1)
        return [
            CapturedImage(
                item.request_id,
                i,
                item.images[i],
                item.model,
                item.version or 0,
                int(top1[i]),
                item.probabilities[i],
                item.at,
                item.originals[i] if item.originals else None,
                item.key,
            )
            for i in range(len(item.images))
        ]

    async def _write(self, rows: list[CapturedImage], labels: list) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._writer, self._write_segments, rows, labels)
        except Exception:  # a full or lost volume must not end the writer: the next segment may fit
            log.exception("writing a capture segment of %d images failed", len(rows))
            self.metrics.capture_dropped.labels("write_failed").inc(max(len(rows), 1))

    def _write_segments(self, rows: list[CapturedImage], labels: list) -> None:
        now = time.time()
        if rows:
            self._seq += 1
            self.sink.put(segment_name("images", now, self.writer_id, self._seq), encode_images(rows, self.class_names))
            self.metrics.capture_images.inc(len(rows))
            self.metrics.capture_segments.labels("images").inc()
        if labels:
            self._seq += 1
            self.sink.put(segment_name("labels", now, self.writer_id, self._seq), encode_labels(labels))
            self.metrics.capture_segments.labels("labels").inc()
        self.sink.enforce(now)
