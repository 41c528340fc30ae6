"""uvicorn's server with a drain before it stops, for rolling updates behind a load balancer.

On SIGTERM (or SIGINT) `/readyz` turns 503 at once, so a load balancer or Kubernetes stops sending;
requests keep being served for `drain_s`; then uvicorn stops accepting and lets the requests in
flight finish (within `shutdown_grace_s`). A second signal skips the rest of the drain.
"""

from __future__ import annotations

import threading
from types import FrameType

import uvicorn
from starlette.datastructures import State


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: State, drain_s: float):
        super().__init__(config)
        self.state, self.drain_s = state, drain_s
        state.draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.state.draining or self.drain_s <= 0:
            self.state.draining = True
            super().handle_exit(sig, frame)
            return
        self.state.draining = True
        timer = threading.Timer(self.drain_s, super().handle_exit, (sig, frame))
        timer.daemon = True
        timer.start()
