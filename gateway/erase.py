"""Erasure: what kdserve keeps of given requests (captured images, feedback labels, A/B answers) removed
everywhere it is kept, for a person's request to have their data deleted.

Captured images and answers may be personal data: they are written readable by the gateways' group only
(`gateway.files`), kept for a retention, and erased here on request. A capture segment that holds other
requests' rows too is rewritten whole without the erased ones (a reader sees the old file or the new
one, never half); a segment left empty is removed. Requests are named by the ids the gateway returned
(`request_id`, `X-Request-ID`), or by the API key id that made them (every request of that key: captured
images, labels and answers record it). Run it where the capture and the answers are reachable (a Job with the
same volumes, or the object store's credentials).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from gateway.feedback.answers import AnswerStore
from kdcontract.capture import (
    IMAGES_PREFIX,
    IMAGES_SUFFIX,
    LABELS_PREFIX,
    LABELS_SUFFIX,
    capture_files,
    decode_label_lines,
    decode_rows,
    encode_images,
    encode_labels,
)


class SegmentStore(Protocol):
    def put(self, name: str, data: bytes) -> None: ...
    def delete(self, name: str) -> None: ...


@dataclass
class Erased:
    images: int = 0
    labels: int = 0
    answers: int = 0
    segments_rewritten: int = 0
    segments_removed: int = 0

    def summary(self) -> str:
        return (
            f"erased {self.images} captured images, {self.labels} label line(s), {self.answers} A/B answer(s); "
            f"{self.segments_rewritten} segment(s) rewritten, {self.segments_removed} removed"
        )


@dataclass(frozen=True)
class Selection:
    """What is erased: the requests named by their ids, and every request an API key id made."""

    request_ids: frozenset[str] = frozenset()
    keys: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.request_ids or self.keys)

    def holds(self, request_id: str, key: str | None) -> bool:
        return request_id in self.request_ids or (key is not None and key in self.keys)


def erase_capture(location: str, store: SegmentStore, selection: Selection, erased: Erased) -> None:
    """The images and labels of the selected requests out of every segment. Images first: a request an erased
    key made may carry labels written before labels recorded their key, which its id then finds."""
    files = capture_files(location)
    by_key: set[str] = set()
    for name, read in files:
        base = Path(name).name
        if not (base.startswith(IMAGES_PREFIX) and base.endswith(IMAGES_SUFFIX)):
            continue
        class_names, rows = decode_rows(read())
        kept = [row for row in rows if not selection.holds(row.request_id, row.key)]
        by_key.update(row.request_id for row in rows if selection.holds(row.request_id, row.key))
        erased.images += len(rows) - len(kept)
        _rewrite(store, name, kept, len(rows) - len(kept), erased, lambda rows, n=class_names: encode_images(rows, n))
    selection = Selection(selection.request_ids | by_key, selection.keys)
    for name, read in files:
        base = Path(name).name
        if not (base.startswith(LABELS_PREFIX) and base.endswith(LABELS_SUFFIX)):
            continue
        items = decode_label_lines(read())
        kept = [item for item in items if not selection.holds(item.request_id, item.key)]
        erased.labels += len(items) - len(kept)
        _rewrite(store, name, kept, len(items) - len(kept), erased, encode_labels)


def _rewrite(store: SegmentStore, name: str, kept: list, gone: int, erased: Erased, encode) -> None:
    """A segment without its erased rows: rewritten whole, or removed when nothing is left."""
    if not gone:
        return
    if not kept:
        store.delete(name)
        erased.segments_removed += 1
        return
    store.put(name, encode(kept))
    erased.segments_rewritten += 1


def erase_answers(directory: Path, selection: Selection, erased: Erased) -> None:
    # ttl, cap and queue do not matter for erasing: nothing is written.
    store = AnswerStore(directory, ttl_s=1.0, max_records=1, queue_size=1)
    for request_id in selection.request_ids:
        erased.answers += store.erase(request_id)
    if selection.keys:
        erased.answers += store.erase_keys(selection.keys)
