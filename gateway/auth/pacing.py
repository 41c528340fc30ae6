"""Refusals paced: a caller refused again before the time its last refusal named (its Retry-After, to the
millisecond: `CallerRefused.wait_s`) waits until then for that answer, with nothing more of its connection
read meanwhile.

A refusal is cheap for the gateway, but a caller that ignores Retry-After sends again at once, on as many
connections as it likes: each refused request is still read to its end, answered and counted, and the
caller spends the machine's CPU building the next one. On 2 cores, one key sending 64-image requests on 100
connections was refused ~300 times a second, and a second key's one-image classify p99 went to x15-x25 of
quiet; the same attack from a client that waited out its Retry-After read x11, and 64-image JSON tensors
x2.0 instead of x4.8-x13 (`make faults`, the attacking client at normal priority). Here the server makes
every caller wait: while an answer is held, uvicorn stops reading that request's body past 64 kB, so the
caller's sending stops too. A caller that honours Retry-After never waits, a first refusal is answered at
once, and a rate limit's wait is its own (a key over 20 requests/s waits 50 ms, not its Retry-After's
whole second: a client hammering at 4x its rate still gets its rate). Held answers are bounded
(`MAX_HELD`, each with at most uvicorn's 64 kB of body); past the bound, refusals are answered at once.

HTTP only: a gRPC message is read whole before its quota is checked, so holding its answer would hold up to
8 MiB per call, not stop a sender. gRPC's one hold is a key's byte budget, before a call's message is read
(`gateway.grpc.interceptor`).
"""

from __future__ import annotations

import asyncio
import time

from gateway.errors import CallerRefused

MAX_HELD = 1024  # answers held at once, every caller together: at most ~64 MB of bodies buffered
MAX_HOLD_S = 1.0  # the longest one answer is held (a longer Retry-After still paces: one answer a second)


class RefusalPacing:
    def __init__(self, max_held: int = MAX_HELD, max_hold_s: float = MAX_HOLD_S):
        self.max_held, self.max_hold_s = max_held, max_hold_s
        # caller (a key id, or `anonymous`: a bounded set) -> when the wait its last refusal named ends
        self._until: dict[str, float] = {}
        self._held = 0

    @property
    def held(self) -> int:
        """Answers held now."""
        return self._held

    async def answer_when_due(self, refusal: CallerRefused) -> None:
        """Return when `refusal` may be answered: at once, unless its caller was refused before and the wait
        that refusal named is not over (then when it is, or after `max_hold_s`). The wait `refusal` names
        starts when it is answered. Runs on the event loop only: no lock."""
        early = self._until.get(refusal.caller, 0.0) - time.monotonic()
        if early > 0 and self._held < self.max_held:
            self._held += 1
            try:
                await asyncio.sleep(min(early, self.max_hold_s))
            finally:
                self._held -= 1
        due = time.monotonic() + refusal.wait_s
        self._until[refusal.caller] = max(due, self._until.get(refusal.caller, 0.0))
