"""The experiment file every replica follows: written whole or not at all, re-read when it changes."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

from pydantic import ValidationError

from gateway.errors import GatewayError
from gateway.experiments.spec import Experiment, parse_experiment
from gateway.files import file_stamp, write_whole

log = logging.getLogger("kdserve.gateway")


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
