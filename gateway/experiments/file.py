"""The experiment file every replica follows: written whole or not at all, re-read when it changes, and
written by one writer at a time (a PUT on any replica, or the rollout controller's transition): each
writer holds the file's lock while it compares what it read with what is there and writes, so no write
is lost and none lands on top of one it did not see."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import ValidationError

from gateway.errors import GatewayError
from gateway.experiments.spec import Experiment, parse_experiment
from gateway.files import file_stamp, write_whole

log = logging.getLogger("kdserve.gateway")
LOCK_STALE_S = 30.0  # no write holds the lock this long: an older lock was left by a writer that died


class ExperimentBusy(GatewayError):
    """Another writer holds the experiment file (the rollout controller mid-transition, or another PUT)."""

    status_code, kind = 409, "experiment_busy"


class ExperimentChanged(GatewayError):
    """The experiment file is no longer the version the writer read (`If-Match`)."""

    status_code, kind = 412, "experiment_changed"


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """The right to write `path`, alone: a lock file beside it, created exclusively (atomic on a local disk
    and on NFS, where the replicas share the file). Busy: ExperimentBusy at once, never a wait. A lock
    older than LOCK_STALE_S is a dead writer's and is taken over."""
    lock = path.with_name(path.name + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(2):
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
            break
        except FileExistsError:
            try:
                stale = time.time() - lock.stat().st_mtime > LOCK_STALE_S
            except FileNotFoundError:
                continue  # released meanwhile: try again
            if not stale or attempt:
                raise ExperimentBusy(
                    "the experiment file is being written (the rollout controller's transition, or another "
                    "change): read it again and retry"
                ) from None
            log.warning("taking over a stale lock on %s", path)
            lock.unlink(missing_ok=True)
    else:
        raise ExperimentBusy("the experiment file is being written: read it again and retry")
    try:
        yield
    finally:
        os.close(handle)
        lock.unlink(missing_ok=True)


def file_version(path: Path) -> str | None:
    """The experiment file's version, as an entity tag (None: no file): what a writer compares before
    writing, and what `GET /v1/experiment` hands out as its `ETag`."""
    try:
        return '"' + hashlib.sha256(path.read_bytes()).hexdigest()[:32] + '"'
    except FileNotFoundError:
        return None


def read_experiment(path: Path) -> Experiment:
    return parse_experiment(path.read_bytes())


def write_experiment(path: Path, experiment: Experiment) -> None:
    """Written whole or not at all: a replica reading mid-write sees the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_whole(path, json.dumps(experiment.model_dump(mode="json"), indent=2) + "\n", durable=True)


class ExperimentFollower:
    """Re-reads the experiment file when it changes and hands each valid new experiment to `apply`;
    an unreadable or invalid file is logged and counted, and the running experiment stays."""

    def __init__(self, path: Path, poll_s: float, apply, on_refused) -> None:
        self.path, self.poll_s, self.apply, self.on_refused = path, poll_s, apply, on_refused
        self.seen = file_stamp(path)

    def mark_written(self) -> None:
        """This replica wrote the file itself (PUT) and applied it already."""
        self.seen = file_stamp(self.path)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                self.check()
            except Exception:  # a poll must never end the follower
                log.exception("experiment check failed")

    def check(self) -> str:
        stamp = file_stamp(self.path)
        if stamp == self.seen:
            return "same"
        self.seen = stamp
        if stamp is None:
            return "same"  # removed: the running experiment stays until a new file is written
        try:
            experiment = read_experiment(self.path)
            self.apply(experiment)
        except (OSError, ValidationError, GatewayError) as exc:
            log.error("experiment file %s refused, keeping the running one: %s", self.path, exc)
            self.on_refused()
            return "refused"
        log.warning("experiment changed: weights %s, shadow %s", experiment.weights, experiment.shadow_fraction)
        return "applied"
