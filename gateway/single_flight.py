"""One computation at a time, in a thread of its own, shared by everyone who asks while it runs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

T = TypeVar("T")


class SingleFlight(Generic[T]):
    """`read(compute)` runs `compute` in this object's one thread, off the event loop; callers that arrive
    while it runs get the same result (a page polling, or a flood of readers, costs one computation at a
    time, and never the default executor that shutdown needs)."""

    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._running: asyncio.Future[T] | None = None

    async def read(self, compute: Callable[[], T]) -> T:
        if self._running is None or self._running.done():
            self._running = asyncio.get_running_loop().run_in_executor(self._pool, compute)
        return await asyncio.shield(self._running)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
