"""A/B assignment (sticky by client key) and the per-arm statistics behind /v1/ab/summary."""

from __future__ import annotations

import hashlib
import random
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from kdcontract.stats import percentiles


class ABRouter:
    def __init__(self, weights: dict[str, float], shadow_fraction: float = 0.0, seed: int | None = None):
        self.arms = list(weights)
        self.cumulative = np.cumsum([weights[a] for a in self.arms])
        self.shadow_fraction = shadow_fraction
        self._random = random.Random(seed)

    def _arm_at(self, u: float) -> str:
        return self.arms[min(int(np.searchsorted(self.cumulative, u, side="right")), len(self.arms) - 1)]

    def assign(self, client_key: str | None) -> str:
        """Same key, same arm (a hash of the key is the uniform draw); no key, a random arm."""
        if client_key:
            digest = hashlib.sha256(client_key.encode()).digest()
            u = int.from_bytes(digest[:8], "big") / 2**64
        else:
            u = self._random.random()
        return self._arm_at(u)

    def shadow_arm(self, arm: str) -> str | None:
        """The other arm to mirror this request to, for a `shadow_fraction` share of requests."""
        if self.shadow_fraction <= 0 or self._random.random() >= self.shadow_fraction:
            return None
        others = [a for a in self.arms if a != arm]
        return others[0] if others else None


@dataclass
class ArmStats:
    window: int
    latencies_ms: deque = field(init=False)
    shadow_latencies_ms: deque = field(init=False)
    count: int = 0
    shadow_count: int = 0
    shadow_agreements: int = 0

    def __post_init__(self) -> None:
        self.latencies_ms = deque(maxlen=self.window)
        self.shadow_latencies_ms = deque(maxlen=self.window)


class ABStats:
    """Per-arm latencies over the last `window` requests. Used from the event loop only: no lock."""

    def __init__(self, arms: list[str], window: int):
        self.window = window
        self._arms = {arm: ArmStats(window) for arm in arms}

    def add_arms(self, arms: list[str]) -> None:
        """Arms shown from now on (at zero until they see traffic): an experiment's, when it changes."""
        for arm in arms:
            self._arm(arm)

    def _arm(self, arm: str) -> ArmStats:
        return self._arms.setdefault(arm, ArmStats(self.window))

    def record(self, arm: str, latency_ms: float) -> None:
        stats = self._arm(arm)
        stats.count += 1
        stats.latencies_ms.append(latency_ms)

    def record_shadow(self, arm: str, latency_ms: float, agreed: bool) -> None:
        stats = self._arm(arm)
        stats.shadow_count += 1
        stats.shadow_agreements += int(agreed)
        stats.shadow_latencies_ms.append(latency_ms)

    def summary(self) -> dict:
        return {
            arm: {
                "count": s.count,
                "latency_ms": percentiles(s.latencies_ms),
                "shadow": {
                    "count": s.shadow_count,
                    "agreement_rate": (s.shadow_agreements / s.shadow_count) if s.shadow_count else None,
                    "latency_ms": percentiles(s.shadow_latencies_ms),
                },
            }
            for arm, s in self._arms.items()
        }
