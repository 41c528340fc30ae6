"""What each A/B arm (and the shadow) answered, kept for a while so ground truth can be joined to it.

Behind a load balancer, the feedback for a request may reach another replica than the one that answered
it; so the answers live in a directory every replica reaches (a shared volume: a ReadWriteMany PVC in
Kubernetes, a named volume in Compose, a local directory for one machine), one small JSON file a
request, and the claim that a request's feedback was counted is a file created with O_EXCL beside it:
exactly one replica wins it, so no label is counted twice.

Bounded everywhere:
- memory: answers wait in a queue of `queue_size` records for the writer (a background task; file
  writes never run on the request path); when it is full the answer is dropped and counted;
- disk: records live in buckets of `ttl_s / BUCKETS` seconds, a bucket older than `ttl_s` is removed
  whole, and past `max_records` the oldest buckets go first; at `max_records` (the newest bucket, being
  written, is never removed) the writer keeps no more until the sweep has made room, and counts the drop.

A record is written whole or not at all (a temporary file renamed into place). The primary arm's answer
is written as soon as the response is sent; the shadow's, when the shadow has answered, into a file of
its own: feedback can come before the shadow has finished, and whichever of the two comes second
counts the pair (the pair has its own O_EXCL claim, so a race counts it once).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from gateway.files import create_once, write_whole

log = logging.getLogger("kdserve.gateway")

BUCKETS = 6  # buckets a record's lifetime spans: removal happens in steps of ttl / 6
WRITE_BATCH = 256  # records one writer pass takes from the queue
LABEL_SUFFIX = ".label"
RECORD_SUFFIX = ".json"
SHADOW_SUFFIX = ".shadow"
PAIR_SUFFIX = ".pair"


# A client's own request id is echoed in headers, logs and bodies: only short, plain ones are kept (else the
# gateway issues one).
CLIENT_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


def new_request_id(now: float | None = None) -> str:
    """32 hex digits like a UUID's, the first 12 the issuing time in milliseconds (as in a UUIDv7): a
    feedback for an id this gateway issued can tell "expired" from "never seen"."""
    ms = int((time.time() if now is None else now) * 1000)
    return f"{ms:012x}{secrets.token_hex(10)}"


# Replicas' clocks differ a little: an id from another replica may look this far ahead of ours.
MAX_CLOCK_SKEW_S = 5.0


def issued_at(request_id: str, now: float | None = None) -> float | None:
    """The time a gateway-issued id was issued, None for an id a client chose. An id that claims a time
    further ahead than the replicas' clock skew was never issued by a gateway: None too (trusting it made
    feedback wait for an answer "just issued" in the year 10889)."""
    if len(request_id) != 32 or not request_id.isascii():
        return None
    try:
        issued = int(request_id[:12], 16) / 1000
    except ValueError:
        return None
    return issued if issued <= (time.time() if now is None else now) + MAX_CLOCK_SKEW_S else None


@dataclass(frozen=True)
class Answer:
    """One A/B request: the arm that answered and its top-1 class per image; the arm shadowing it, if any."""

    arm: str
    model: str
    version: int | None
    top1: list[int]
    at: float
    shadow_arm: str | None = None
    # The API key id that made the request (`anonymous` without one): only it may label the request. None
    # in a record written before keys were recorded (joinable by anyone until it expires).
    key: str | None = None

    def to_json(self) -> str:
        return json.dumps(self.__dict__, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Answer:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class ShadowAnswer:
    """The shadow's top-1 per image for a request whose primary answer was given at `primary_at`."""

    top1: list[int]
    primary_at: float


@dataclass(frozen=True)
class Found:
    answer: Answer
    path: Path  # the record; the label, shadow and pair files sit beside it

    def beside(self, suffix: str) -> Path:
        return self.path.with_suffix(suffix)

    def shadow_top1(self) -> list[int] | None:
        try:
            return json.loads(self.beside(SHADOW_SUFFIX).read_text())["top1"]
        except FileNotFoundError:
            return None

    def label(self) -> str | None:
        try:
            return self.beside(LABEL_SUFFIX).read_text()
        except FileNotFoundError:
            return None


# Called (in the writer's thread) when a shadow's answer lands after the request's feedback.
LatePair = Callable[[Found, list[int], str], None]


class AnswerStore:
    def __init__(self, directory: Path, ttl_s: float, max_records: int, queue_size: int) -> None:
        self.directory, self.ttl_s, self.max_records = Path(directory), ttl_s, max_records
        self.bucket_s = max(ttl_s / BUCKETS, 1.0)
        self.queue: asyncio.Queue[tuple[str, Answer | ShadowAnswer]] = asyncio.Queue(queue_size)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.on_late_pair: LatePair | None = None
        self.on_dropped: Callable[[int], None] | None = None  # records not kept: the store was at its cap
        self._records = self._count()  # on the volume, as of the last sweep, plus what this writer added
        # A thread of its own: in the shared default pool, feedback waiting for a just-answered request's
        # record could hold every thread while that record waits for one.
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="answers")

    # -- the request path: never blocks --------------------------------------------------------------
    def remember(self, request_id: str, answer: Answer | ShadowAnswer) -> bool:
        """Queue an answer for the writer; False when the queue is full (the caller counts the drop)."""
        try:
            self.queue.put_nowait((request_id, answer))
        except asyncio.QueueFull:
            return False
        return True

    # -- the writer and the sweeper (background tasks) -----------------------------------------------
    async def run(self) -> None:
        sweep_at = 0.0
        while True:
            batch = [await self.queue.get()]
            while len(batch) < WRITE_BATCH and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(self._writer, self.write, batch)
                if time.monotonic() >= sweep_at:
                    await loop.run_in_executor(self._writer, self.sweep)
                    sweep_at = time.monotonic() + self.bucket_s
            except Exception:  # a full or lost volume must not end the writer: later batches may fit
                log.exception("writing %d A/B answers to %s failed", len(batch), self.directory)

    async def flush(self, timeout_s: float = 5.0) -> None:
        """Wait until every queued answer is on disk (tests, and shutdown)."""
        deadline = time.monotonic() + timeout_s
        while not self.queue.empty() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    def write(self, batch: list[tuple[str, Answer | ShadowAnswer]]) -> None:
        dropped = 0
        for request_id, answer in batch:
            if not isinstance(answer, ShadowAnswer):
                if self._records >= self.max_records:
                    dropped += 1
                    continue
                self._records += 1
            try:
                self._write_one(request_id, answer)
            except OSError:
                raise  # the volume: the batch's other records will not fare better
            except Exception:  # one record's pairing must not cost the batch
                log.exception("keeping the A/B answer of request %s failed", request_id)
        if dropped and self.on_dropped is not None:
            self.on_dropped(dropped)

    def _write_one(self, request_id: str, answer: Answer | ShadowAnswer) -> None:
        shadow = isinstance(answer, ShadowAnswer)
        bucket = self._bucket_dir(answer.primary_at if shadow else answer.at)
        bucket.mkdir(parents=True, exist_ok=True)
        path = bucket / (_key(request_id) + (SHADOW_SUFFIX if shadow else RECORD_SUFFIX))
        write_whole(path, json.dumps({"top1": answer.top1}) if shadow else answer.to_json())
        if shadow:
            self._pair_if_labelled(bucket / (_key(request_id) + RECORD_SUFFIX), answer.top1)

    def _pair_if_labelled(self, record: Path, shadow_top1: list[int]) -> None:
        """The shadow came after the feedback: its pair is counted here (written first, then the label
        read; the feedback claims the label first, then reads the shadow: one of the two sees the other)."""
        try:
            found = Found(Answer.from_json(record.read_text()), record)
        except FileNotFoundError:
            return
        label = found.label()
        if label is not None and self.on_late_pair is not None and self.claim(found, PAIR_SUFFIX):
            self.on_late_pair(found, shadow_top1, label)

    def sweep(self, now: float | None = None) -> int:
        """Remove buckets past the retention, then the oldest while there are more than `max_records`
        records. Returns the buckets removed. Safe with several replicas sweeping at once."""
        now = time.time() if now is None else now
        buckets = self._buckets()
        removed = 0
        kept = []
        for start, path in buckets:
            if start + self.bucket_s <= now - self.ttl_s:
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
            else:
                kept.append((start, path, _records_in(path)))
        total = sum(count for *_, count in kept)
        for _, path, count in kept[:-1]:  # the newest bucket stays: it is being written
            if total <= self.max_records:
                break
            shutil.rmtree(path, ignore_errors=True)
            total -= count
            removed += 1
        self._records = total
        return removed

    def _count(self) -> int:
        return sum(_records_in(path) for _, path in self._buckets())

    # -- the feedback path (called in a thread) ------------------------------------------------------
    def find(self, request_id: str) -> Found | None:
        """The answer recorded for `request_id` in any live bucket (newest first), or None."""
        name = _key(request_id)
        for _, bucket in reversed(self._buckets()):
            try:
                text = (bucket / (name + RECORD_SUFFIX)).read_text()
            except (FileNotFoundError, NotADirectoryError):
                continue
            return Found(Answer.from_json(text), bucket / (name + RECORD_SUFFIX))
        return None

    def erase(self, request_id: str) -> int:
        """Remove what is kept of `request_id` (its answer, the shadow's, its label and pair claims) from
        every bucket; returns the answers removed."""
        name, removed = _key(request_id), 0
        for _, bucket in self._buckets():
            for suffix in (RECORD_SUFFIX, SHADOW_SUFFIX, LABEL_SUFFIX, PAIR_SUFFIX):
                with contextlib.suppress(FileNotFoundError):
                    (bucket / (name + suffix)).unlink()
                    removed += suffix == RECORD_SUFFIX
        return removed

    def erase_keys(self, keys: frozenset[str]) -> int:
        """Remove what is kept of every request one of the API key ids `keys` made (each record names its key;
        one written before keys were recorded names none and stays); returns the answers removed."""
        removed = 0
        for _, bucket in self._buckets():
            records: list[Path] = []
            with contextlib.suppress(FileNotFoundError):  # a bucket past its retention, removed meanwhile
                records = [Path(e.path) for e in os.scandir(bucket) if e.name.endswith(RECORD_SUFFIX)]
            for record in records:
                try:
                    answer = Answer.from_json(record.read_text())
                except (FileNotFoundError, ValueError, TypeError):
                    continue  # gone meanwhile, or not a record this code wrote: not this key's to judge
                if answer.key in keys:
                    for suffix in (SHADOW_SUFFIX, LABEL_SUFFIX, PAIR_SUFFIX, RECORD_SUFFIX):
                        with contextlib.suppress(FileNotFoundError):
                            record.with_suffix(suffix).unlink()
                    removed += 1
        return removed

    @staticmethod
    def claim(found: Found, suffix: str, content: str = "") -> bool:
        """True for the one caller (on any replica) that creates this file beside the record: the label
        (LABEL_SUFFIX, its content the label) or the pair's count (PAIR_SUFFIX). The file appears with
        its content (written aside, then hard-linked into place: a link, like O_EXCL, fails when the
        name exists), so a reader never sees it empty."""
        return create_once(found.beside(suffix), content)

    def _bucket_dir(self, at: float) -> Path:
        return self.directory / str(int(at // self.bucket_s * self.bucket_s))

    def _buckets(self) -> list[tuple[int, Path]]:
        found = []
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.directory):
                if entry.is_dir() and entry.name.isdigit():
                    found.append((int(entry.name), Path(entry.path)))
        return sorted(found)


def _key(request_id: str) -> str:
    """A file name for any id a client may send (ids are kept short and plain, but never trusted)."""
    return hashlib.sha256(request_id.encode()).hexdigest()[:32]


def _records_in(bucket: Path) -> int:
    with contextlib.suppress(FileNotFoundError):
        return sum(1 for entry in os.scandir(bucket) if entry.name.endswith(RECORD_SUFFIX))
    return 0
