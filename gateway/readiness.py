"""Waiting for a started server process to answer: one loop for Triton, the gateway and Prometheus."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal


def wait_until_ready(
    ready: Callable[[], bool], exited: Callable[[], bool], timeout: float, interval: float = 0.25
) -> Literal["ready", "exited", "timeout"]:
    """Poll `ready()` until it is true, the process has `exited()`, or `timeout` seconds pass.

    Exit is checked first on each round, so a process that dies during start-up is reported as such
    at once instead of after the whole timeout.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if exited():
            return "exited"
        if ready():
            return "ready"
        time.sleep(interval)
    return "timeout"
