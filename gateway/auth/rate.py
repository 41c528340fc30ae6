"""A token bucket: a sustained rate with a burst above it, for a key's requests, its request bytes and its
feedback items."""

from __future__ import annotations

import time


class TokenBucket:
    """`rate` tokens a second up to `capacity`; starts full. Not thread-safe: each user holds it under its
    own lock or on the event loop."""

    def __init__(self, rate: float, capacity: float):
        self.rate, self.capacity = rate, capacity
        self.tokens, self.updated = capacity, time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def wait(self, tokens: float = 1.0) -> float:
        """Seconds until `tokens` are there (0: now). More than the capacity never is: the wait is then the
        time to fill the bucket. `wait(0)`: the time until a bucket in debt is paid."""
        self._refill()
        return max(0.0, (min(tokens, self.capacity) - self.tokens) / self.rate)

    def take(self, tokens: float = 1.0) -> float | None:
        """None when `tokens` were taken; else the seconds until that many are there (nothing is taken)."""
        wait = self.wait(tokens)
        if self.tokens >= tokens:
            self.tokens -= tokens
            return None
        return wait

    def spend(self, tokens: float) -> None:
        """Take `tokens` whatever is there: what was already received is spent, and a bucket in debt makes
        `wait()` the time until it is paid."""
        self._refill()
        self.tokens -= tokens
