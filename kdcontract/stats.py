"""Latency percentiles: one definition (NumPy's linear interpolation) for the gateway's A/B summary,
the benchmarks and the export report, so a p99 means the same thing in every file kdserve writes."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def percentiles(
    values: Iterable[float], qs: Iterable[float] = (50, 95, 99), digits: int = 3
) -> dict[str, float | None]:
    """{"p50": ..., "p95": ..., "p99": ...} of `values` (None for each when there are none)."""
    qs = list(qs)
    array = np.fromiter(values, dtype=np.float64)
    if array.size == 0:
        return {f"p{q:g}": None for q in qs}
    return {f"p{q:g}": round(float(v), digits) for q, v in zip(qs, np.percentile(array, qs), strict=True)}
