"""Ground truth for A/B answers: `POST /v1/feedback` items joined to what each arm answered.

An item names a request id a classification returned and its true class name (a list of names for a
request of several images). The answer is looked up in the shared answer store (any replica may have
written it), the one claim on it is taken (so no image is counted twice, whichever replica the
duplicate reaches), and the counts go to Prometheus counters that add up over replicas: per arm, right
or wrong; per pair (arm and shadow), which of the two was right.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from pydantic import BaseModel, ConfigDict, Field

from gateway.auth.keys import RateLimited
from gateway.auth.rate import TokenBucket
from gateway.errors import (
    DuplicateFeedback,
    ExpiredRequest,
    ForeignRequest,
    GatewayError,
    InvalidLabel,
    UnknownRequest,
    echo,
)
from gateway.feedback.answers import LABEL_SUFFIX, PAIR_SUFFIX, AnswerStore, Found, issued_at
from gateway.telemetry.metrics import GatewayMetrics

MAX_ITEMS = 1000  # items in one feedback request
# Feedback for a request this young may overtake its answer (written off the request path): it waits.
JUST_ANSWERED_S = 2.0
OUTCOMES = ("accepted", "unknown", "expired", "duplicate", "invalid_label", "foreign_request")
OUTCOME_OF = {
    UnknownRequest: "unknown",
    ExpiredRequest: "expired",
    DuplicateFeedback: "duplicate",
    InvalidLabel: "invalid_label",
    ForeignRequest: "foreign_request",
}


class FeedbackItem(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # JSON as written: no `true` taken for 1
    request_id: str = Field(min_length=1, max_length=128, description="the X-Request-ID a classification returned")
    label: str | list[str] = Field(description="the true class name; one per image for a request of several")


class FeedbackResult(BaseModel):
    request_id: str
    status: int
    outcome: str
    message: str


class FeedbackBatch(BaseModel):
    results: list[FeedbackResult] = Field(description="one per item, in order, each with its own status")


class FeedbackJoin:
    """Joins feedback to the answer store. File work runs in a small pool of its own, never in the event
    loop's default executor (which shutdown needs), and never waits there: an answer still on its way to
    the store is waited for on the event loop, once per request however many items it carries."""

    def __init__(
        self,
        store: AnswerStore,
        class_names: list[str],
        metrics: GatewayMetrics,
        threads: int = 2,
        gate_keys: Callable[[], list[str] | None] = lambda: None,
        items_per_s: float | None = None,
    ) -> None:
        """`gate_keys`: the API key ids whose labels the experiment's top-1 gate counts now (None: every
        key's); every accepted label still joins the capture and the per-key figures. `items_per_s`: the
        items each key may send per second, above a burst of one full batch (None: unbounded)."""
        self.store, self.metrics, self.gate_keys = store, metrics, gate_keys
        self.class_index = {name: i for i, name in enumerate(class_names)}
        store.on_late_pair = self.count_pairs
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="feedback")
        self.items_per_s = items_per_s
        self._budgets: dict[str, TokenBucket] = {}  # per key id: configured keys and `anonymous`, so bounded
        self._refused_until: dict[str, float] = {}  # per key id: the end of the Retry-After it was given

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _budget(self, key: str) -> TokenBucket | None:
        if self.items_per_s is None:
            return None
        return self._budgets.setdefault(key, TokenBucket(self.items_per_s, float(MAX_ITEMS)))

    def check_budget(self, key: str) -> None:
        """Raise RateLimited when `key` has not one feedback item left now, or sends again before the
        Retry-After it was given: checked before a body is read, so a key past its budget costs no parsing
        (a closed loop of 1,000-item batches refused only after parsing kept the event loop 98% busy)."""
        budget = self._budget(key)
        if budget is None:
            return
        early = self._refused_until.get(key, 0.0) - time.monotonic()
        if early > 0:
            raise self._over_budget(key, early)
        wait = budget.wait()
        if wait > 0:
            raise self._over_budget(key, wait)

    def _spend(self, key: str, items: int) -> None:
        budget = self._budget(key)
        wait = None if budget is None else budget.take(items)
        if wait is not None:
            self._refused_until[key] = time.monotonic() + wait
            raise self._over_budget(key, wait, items)

    def _over_budget(self, key: str, wait: float, items: int | None = None) -> RateLimited:
        asked = f" (this request carries {items})" if items is not None else ""
        return RateLimited(
            f"the API key {key!r} is over its {self.items_per_s:g} feedback items/s{asked}; retry later",
            key,
            wait,
        )

    async def accept_all(self, items: list[FeedbackItem], key: str) -> list[FeedbackResult | GatewayError]:
        """Each item's result, or the error that says why it was not counted (counted too), in order. `key`:
        the caller's API key id; a request another key made is refused (ForeignRequest). A key past its
        feedback budget is refused whole (RateLimited, 429), before any item is looked at."""
        self._spend(key, len(items))
        loop = asyncio.get_running_loop()
        results: list[FeedbackResult | GatewayError | float] = await loop.run_in_executor(
            self._pool, self._try_all, items, key, True
        )
        waiting = [i for i, r in enumerate(results) if isinstance(r, float)]
        if waiting:
            # Answered a moment ago: the answer may still be on its way to the store (written off the
            # request path). One wait for all of them, bounded by JUST_ANSWERED_S.
            until = max(results[i] for i in waiting) + JUST_ANSWERED_S
            await asyncio.sleep(min(JUST_ANSWERED_S, max(0.0, until - time.time())))
            again = await loop.run_in_executor(self._pool, self._try_all, [items[i] for i in waiting], key, False)
            for i, result in zip(waiting, again, strict=True):
                results[i] = result
        return results  # type: ignore[return-value]  # no float is left after the second pass

    def _try_all(
        self, items: list[FeedbackItem], key: str, may_wait: bool
    ) -> list[FeedbackResult | GatewayError | float]:
        results: list[FeedbackResult | GatewayError | float] = []
        for item in items:
            try:
                result = self._accept(item, key, may_wait)
            except GatewayError as exc:
                self.metrics.feedback.labels(OUTCOME_OF.get(type(exc), "invalid_label")).inc()
                results.append(exc)
                continue
            if isinstance(result, FeedbackResult):
                self.metrics.feedback.labels("accepted").inc()
            results.append(result)
        return results

    def _accept(self, item: FeedbackItem, key: str, may_wait: bool) -> FeedbackResult | float:
        """The item joined and counted; or, when its answer may still be on its way (`may_wait`), the time
        its id was issued, to try again after JUST_ANSWERED_S. Raises the error that says why not."""
        labels = [item.label] if isinstance(item.label, str) else item.label
        unknown = [label for label in labels if label not in self.class_index]
        if unknown:
            shown = ", ".join(list(self.class_index)[:20])
            raise InvalidLabel(f"label {echo(unknown[0])} is not a class; classes: {shown}")
        found = self.store.find(item.request_id)
        now = time.time()
        issued = issued_at(item.request_id, now)
        if found is None:
            if issued is not None and may_wait and now - issued < JUST_ANSWERED_S:
                return issued
            if issued is not None and issued < now - self.store.ttl_s:
                raise ExpiredRequest(f"request {item.request_id} was answered more than {self.store.ttl_s:g} s ago")
            raise UnknownRequest(
                f"no A/B answer is recorded for request {item.request_id} (only model=auto requests are kept)"
            )
        answer = found.answer
        if answer.key is not None and answer.key != key:
            raise ForeignRequest(
                f"request {item.request_id} was made with another API key: only its caller may label it"
            )
        if answer.at < now - self.store.ttl_s:
            raise ExpiredRequest(f"request {item.request_id} was answered more than {self.store.ttl_s:g} s ago")
        if len(labels) != len(answer.top1):
            raise InvalidLabel(f"{len(labels)} labels for a request of {len(answer.top1)} images")
        if not self.store.claim(found, LABEL_SUFFIX, ",".join(labels)):
            raise DuplicateFeedback(f"feedback for request {item.request_id} was already counted")
        truth = [self.class_index[label] for label in labels]
        judged = self._judged(key)
        for i, y in enumerate(truth):
            if judged:
                self.metrics.feedback_top1.labels(answer.arm, _flag(answer.top1[i] == y)).inc()
            self.metrics.feedback_key_labels.labels(key, _flag(answer.top1[i] == y)).inc()
        # The label is claimed before the shadow's answer is read (see AnswerStore._pair_if_labelled).
        shadow_top1 = found.shadow_top1()
        if shadow_top1 is not None and self.store.claim(found, PAIR_SUFFIX):
            self.count_pairs(found, shadow_top1, ",".join(labels))
        return FeedbackResult(
            request_id=item.request_id,
            status=200,
            outcome="accepted",
            message=f"{len(truth)} label(s) joined to arm {answer.arm}",
        )

    def _judged(self, key: str | None) -> bool:
        """Whether a label from `key` counts in the gates (the experiment's `gates.label_keys`)."""
        return _judged_by(self.gate_keys(), key)

    def count_pairs(self, found: Found, shadow_top1: list[int], labels: str) -> None:
        """Both arms' answers against the labels, image by image (on whichever replica saw both first)."""
        answer = found.answer
        if not self._judged(answer.key):
            return
        for primary, shadow, label in zip(answer.top1, shadow_top1, labels.split(","), strict=True):
            y = self.class_index[label]
            self.metrics.feedback_pairs.labels(
                answer.arm, answer.shadow_arm, _flag(primary == y), _flag(shadow == y)
            ).inc()


def _judged_by(allowed: list[str] | None, key: str | None) -> bool:
    return allowed is None or key in allowed


def _flag(value: bool) -> str:
    return "true" if value else "false"
