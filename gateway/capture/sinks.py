"""Where capture segments are kept: a directory, or S3-compatible object storage; each enforces retention and a
size cap on every write."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from gateway.files import write_whole
from kdcontract.capture import (
    bucket_and_prefix,
    object_store_client,
    object_store_listing,
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
