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
import os
import random
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gateway.files import write_whole
from gateway.metrics import GatewayMetrics
from kdcontract.capture import (
    CapturedImage,
    bucket_and_prefix,
    encode_images,
    encode_labels,
    object_store_client,
    object_store_listing,
    segment_name,
)

log = logging.getLogger("kdserve.gateway")
STALE_TEMPORARY_S = 600.0  # no segment takes this long to write: its temporary file was left by a crash


class LocalSink:
    """Segments in a local (or mounted) directory."""

    def __init__(self, directory: Path, retention_s: float, max_bytes: int) -> None:
        self.directory, self.retention_s, self.max_bytes = Path(directory), retention_s, max_bytes
        self.directory.mkdir(parents=True, exist_ok=True)

    def put(self, name: str, data: bytes) -> None:
        write_whole(self.directory / name, data)

    def delete(self, name: str) -> None:
        (self.directory / name).unlink(missing_ok=True)

    def enforce(self, now: float) -> int:
        """Remove segments past the retention, then the oldest while the capture is over its size cap;
        and the temporary files of a writer killed mid-write (any replica's, once they are stale)."""
        entries = [entry for entry in os.scandir(self.directory) if entry.is_file()]
        for entry in entries:
            if entry.name.startswith(".") and entry.stat().st_mtime < now - STALE_TEMPORARY_S:
                Path(entry.path).unlink(missing_ok=True)
        segments = sorted(
            (entry.stat().st_mtime, entry.stat().st_size, entry.path)
            for entry in entries
            if not entry.name.startswith(".")
        )
        doomed = _over_limits(segments, now, self.retention_s, self.max_bytes)
        for path in doomed:
            Path(path).unlink(missing_ok=True)
        return len(doomed)


def _over_limits(segments: list[tuple[float, int, str]], now: float, retention_s: float, max_bytes: int) -> list[str]:
    """Of (time, size, name) oldest first: those past the retention, then the oldest while over the cap."""
    doomed, total = [], sum(size for _, size, _ in segments)
    for at, size, name in segments:
        if at >= now - retention_s and total <= max_bytes:
            break
        doomed.append(name)
        total -= size
    return doomed


class ObjectStoreSink:
    """Segments as objects under `s3://bucket/prefix` in S3-compatible storage. A PUT stores an object
    whole or not at all, so no temporary name is needed; retention and the cap list the prefix."""

    def __init__(self, url: str, retention_s: float, max_bytes: int) -> None:
        self.url, self.retention_s, self.max_bytes = url, retention_s, max_bytes
        self.bucket, self.prefix = bucket_and_prefix(url)
        self.client = object_store_client()
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:  # serving goes on; each failed write is counted (write_failed)
            log.error("capture bucket %s is not reachable (%s); segments will fail until it is", self.bucket, exc)

    def put(self, name: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=data)

    def delete(self, name: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.prefix + name)

    def enforce(self, now: float) -> int:
        segments = [(at, size, name) for name, size, at in object_store_listing(self.client, self.url)]
        doomed = _over_limits(segments, now, self.retention_s, self.max_bytes)
        for start in range(0, len(doomed), 1000):  # DeleteObjects takes at most 1,000 keys
            keys = [{"Key": self.prefix + name} for name in doomed[start : start + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})
        return len(doomed)


@dataclass
class _Pending:
    request_id: str
    images: np.ndarray
    originals: list[bytes] | None
    model: str
    version: int | None
    probabilities: np.ndarray
    at: float


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
        self._open_labels: list[tuple[str, list[str], float]] = []

    # -- the request path: O(1), never waits --------------------------------------------------------
    def sample(self) -> bool:
        return self.fraction > 0 and self._random.random() < self.fraction

    def images(self, request_id: str, images: np.ndarray, originals: list[bytes], outcome) -> None:
        item = _Pending(
            request_id,
            images,
            originals if self.keep_originals else None,
            outcome.model,
            outcome.version,
            outcome.probabilities,
            time.time(),
        )
        self._put(item, len(images))

    def labels(self, request_id: str, labels: list[str]) -> None:
        self._put((request_id, labels, time.time()), 0)

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

    def _take(self, item: _Pending | tuple[str, list[str], float]) -> None:
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
